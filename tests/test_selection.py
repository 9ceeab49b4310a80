"""forge's head selection by measured effect, directions from the prompt, tune's relative bounds, and what
inspect shows of them (issue 16).

The effect measurement (batched, left-padded, only the scored logits computed) is checked against an
independent one: each sequence run alone through the stock model with the lock's own run-time hooks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_lock, run_cli
from test_forge import HEADS, PLANTED_HEAD, PLANTED_LAYER, WORDS, planted_model, planted_pairs

from weightlock import build_lock, save_lock
from weightlock.engines.hooks import lock_hooks
from weightlock.errors import InvalidInputError
from weightlock.lab.evaluate import AlphaResult, TuneBounds, choose_alpha
from weightlock.lab.forge import ForgeSettings, forge_lock, load_model, prompt_text, render_prompt
from weightlock.lab.pairs import load_pairs

EFFECT = dict(
    position="answer",
    heads=2,
    last_tokens=3,
    batch_size=5,
    selection="effect",
    shortlist=5,
    effect_pairs=4,
    effect_benign=4,
    effect_answer_tokens=4,
)


def benign_file(path: Path, letter="c", n=8) -> Path:
    rng = np.random.default_rng(7)
    path.write_text("\n".join(" ".join(f"{letter}{i}" for i in rng.integers(0, WORDS, 5)) for _ in range(n)))
    return path


def chat_pairs(path: Path, n=16) -> Path:
    """Pairs for the tiny chat model (character tokens): every head sees the two answers differ."""
    items = [
        {"prompt": f"How do I do bad thing {i}?", "chosen": "No, I can't.", "rejected": f"Sure: step {i}."}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(i) for i in items))
    return path


@pytest.fixture(scope="module")
def effect_lock(tmp_path_factory):
    from test_eval import make_chat_model

    tmp = tmp_path_factory.mktemp("effect")
    make_chat_model(tmp / "m")
    data = chat_pairs(tmp / "pairs.jsonl")
    benign = tmp / "benign.txt"
    benign.write_text(
        "Name a fruit.\nSay hi.\nCount to three.\nA colour?\nWhy rain?\nHow are you?\nTell a joke.\nOk?\n"
    )
    lock = forge_lock(str(tmp / "m"), data, ForgeSettings(**EFFECT, benign_prompts=str(benign)))
    return tmp, lock


def _alone(model, tokenizer, ids: list[int], lock=None, alpha=None) -> torch.Tensor:
    """Next-token log-probabilities of one unpadded sequence, float64, optionally with ``lock`` hooked."""
    from contextlib import nullcontext

    with torch.no_grad(), lock_hooks(model, lock, alpha) if lock is not None else nullcontext():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)


def test_recorded_effects_equal_an_independent_measurement(effect_lock):
    tmp, lock = effect_lock
    details = lock.creation["details"]
    selection = details["selection"]
    settings = ForgeSettings(**EFFECT)
    model, tokenizer = load_model(str(tmp / "m"), settings)
    pairs, _ = load_pairs(tmp / "pairs.jsonl")
    measured = [pairs[i] for i in selection["measured_on"]["heldout_pairs"]]
    assert len(measured) == 4 and set(selection["measured_on"]["heldout_pairs"]) <= set(
        details["split"]["heldout_pairs"]
    ), "the effect is measured on held-out pairs only"
    benign = [
        render_prompt(tokenizer, (("user", p),), "chat", None)
        for p in (tmp / "benign.txt").read_text().splitlines()[:4]
    ]
    answers = []
    for prompt in benign:  # the model's own greedy answer, one prompt at a time
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers.append((ids, out[0, len(ids) :].tolist()))

    def margin(one=None):
        values = []
        for pair in measured:
            prompt = prompt_text(tokenizer, pair, settings)
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            per_answer = []
            for answer in (pair.safe, pair.unsafe):
                ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"][: n + 4]
                lp = _alone(model, tokenizer, ids, one, selection["alpha"])
                per_answer.append(np.mean([lp[t - 1, ids[t]].item() for t in range(n, len(ids))]))
            values.append(per_answer[0] - per_answer[1])
        return float(np.mean(values))

    def kl(one):
        total, count = 0.0, 0
        for prompt_ids, answer in answers:
            ids = prompt_ids + answer
            base, locked = _alone(model, tokenizer, ids), _alone(model, tokenizer, ids, one, selection["alpha"])
            rows = slice(len(prompt_ids) - 1, len(ids) - 1)
            total += (base[rows].exp() * (base[rows] - locked[rows])).sum().item()
            count += len(answer)
        return total / count

    base_margin = margin()
    assert selection["baseline_margin"] == pytest.approx(base_margin, abs=1e-5)
    recorded = {(r["layer"], r["head"]): r for r in selection["candidates"]}
    for i in range(lock.num_heads_selected):
        one = build_lock(
            lock.layers[i : i + 1],
            lock.heads[i : i + 1],
            lock.directions[i : i + 1],
            lock.scales[i : i + 1],
            lock.source_model,
            default_alpha=1.0,
        )
        row = recorded[(int(lock.layers[i]), int(lock.heads[i]))]
        assert row["effect"] == pytest.approx(margin(one) - base_margin, abs=1e-5)
        assert row["kl"] == pytest.approx(kl(one), rel=1e-3, abs=1e-9)
        assert row["kl"] > 0
        assert row["score"] == pytest.approx(row["effect"] / np.sqrt(row["kl"]))


def test_effect_selection_keeps_the_best_scores_of_the_accuracy_shortlist(effect_lock, capsys):
    tmp, lock = effect_lock
    details = lock.creation["details"]
    selection = details["selection"]
    assert selection["method"] == "effect" and details["position"] == "answer"
    accuracy = np.array(details["probe_accuracy"]).reshape(-1)
    shortlist = np.argsort(-accuracy, kind="stable")[: selection["shortlist"]]
    candidates = [(r["layer"], r["head"]) for r in selection["candidates"]]
    assert candidates == [divmod(int(i), HEADS) for i in shortlist]
    best = sorted(selection["candidates"], key=lambda r: -r["score"])[: lock.num_heads_selected]
    assert [(r["layer"], r["head"]) for r in best] == list(zip(lock.layers.tolist(), lock.heads.tolist(), strict=True))
    assert details["benign_prompts"]["count"] == 8 and len(details["benign_prompts"]["sha256"]) == 64

    save_lock(lock, tmp / "effect.wlock")
    code, out, err = run_cli(capsys, "inspect", str(tmp / "effect.wlock"))
    assert code == 0, err
    assert "heads chosen by: effect: effect / sqrt(KL), each head alone at alpha 1.0, from 5 candidates" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp / "effect.wlock"), "--json")
    shown = json.loads(out)["selection"]
    assert [(r["layer"], r["head"]) for r in shown["kept"]] == [(r["layer"], r["head"]) for r in best]
    assert shown["candidates"] == 5


def test_effect_greedy_grows_the_set_from_the_best_single_head(effect_lock):
    tmp, _ = effect_lock
    settings = ForgeSettings(
        **dict(EFFECT, selection="effect-greedy", greedy_pool=3), benign_prompts=str(tmp / "benign.txt")
    )
    lock = forge_lock(str(tmp / "m"), tmp / "pairs.jsonl", settings)
    selection = lock.creation["details"]["selection"]
    steps, rows = selection["greedy_steps"], selection["candidates"]
    assert selection["method"] == "effect-greedy" and len(steps) == 2 and all(s["tried"] == 3 for s in steps)
    top = max(rows, key=lambda r: r["score"])
    # a set of one head is that head: the first step takes the best single score, measured the same way
    assert (steps[0]["layer"], steps[0]["head"]) == (top["layer"], top["head"])
    assert steps[0]["set_score"] == pytest.approx(top["score"], rel=1e-6)
    assert [(s["layer"], s["head"]) for s in steps] == list(zip(lock.layers.tolist(), lock.heads.tolist(), strict=True))


def test_prompt_position_recovers_a_head_planted_in_the_prompt(tmp_path):
    """Harmful prompts are made of a-words, benign prompts of b-words (the same words but for the sign of
    the one embedding dimension only the planted head reads): at the prompt, only that head can tell them
    apart, and the direction towards the harmful side is the planted one."""
    planted = planted_model(tmp_path / "m")
    rng = np.random.default_rng(3)
    items = [
        {
            "prompt": " ".join(f"a{i}" for i in rng.integers(0, WORDS, 5)),
            "chosen": "c1 c2",
            "rejected": "c3 c4",
        }
        for _ in range(24)
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    benign = benign_file(tmp_path / "benign.txt", letter="b", n=24)
    settings = ForgeSettings(
        heads=1, last_tokens=3, template="plain", selection="accuracy", position="prompt", benign_prompts=str(benign)
    )
    lock = forge_lock(str(tmp_path / "m"), tmp_path / "p.jsonl", settings)
    assert lock.heads_by_layer() == {PLANTED_LAYER: [PLANTED_HEAD]}
    assert float(np.dot(lock.directions[0], planted)) > 0.99
    details = lock.creation["details"]
    assert details["position"] == "prompt" and details["selection"] == {"method": "accuracy"}
    split = details["split"]
    assert not set(split["train_benign"]) & set(split["heldout_benign"])
    assert len(split["train_benign"]) + len(split["heldout_benign"]) == 24
    # answers are never read at the prompt: other answers, the same lock
    for item in items:
        item["chosen"], item["rejected"] = "c5 c6 c7", "c8"
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    again = forge_lock(str(tmp_path / "m"), tmp_path / "q.jsonl", settings)
    assert np.array_equal(again.directions, lock.directions) and np.array_equal(again.scales, lock.scales)


def test_forge_refuses_bad_selection_settings(tmp_path, capsys):
    planted_model(tmp_path / "m")
    data = planted_pairs(tmp_path / "p.jsonl")
    (tmp_path / "few.txt").write_text("c1 c2\nc3\n")
    cases = [
        (dict(selection="effect", heads=6, shortlist=5), "more than the --shortlist"),
        # layer 0 cannot see the planted dimension at all: its heads have no direction
        (dict(selection="effect", heads=12, shortlist=12), "of the 12 shortlisted heads see any difference"),
        (dict(selection="best"), "unknown selection"),
        (dict(position="middle"), "unknown position"),
        (dict(position="prompt", benign_prompts=str(tmp_path / "few.txt")), "forge needs at least 4"),
        (dict(benign_prompts=str(tmp_path / "missing.txt")), "cannot read the forge-benign prompt file"),
        (dict(selection="effect", effect_alpha=0.0), "--effect-alpha must be a positive number"),
        (dict(selection="effect", effect_alpha=float("nan")), "--effect-alpha must be a positive number"),
        (dict(effect_pairs=0), "--effect-pairs must be at least 1"),
    ]
    for overrides, words in cases:
        base = dict(last_tokens=3, template="plain", selection="accuracy", position="answer")
        settings = ForgeSettings(**dict(base, **overrides))
        with pytest.raises(InvalidInputError, match=words):
            forge_lock(str(tmp_path / "m"), data, settings)
    common = ["forge", str(tmp_path / "m"), "--data", str(data), "--plain-template", "--out", str(tmp_path / "x.wlock")]
    code, _, err = run_cli(capsys, *common, "--select", "effect", "--shortlist", "0")
    assert code == 3 and "--shortlist must be at least 1" in err and "Traceback" not in err
    code, out, err = run_cli(
        capsys, *common, "--heads", "2", "--select", "effect", "--shortlist", "4", "--effect-pairs", "2",
        "--effect-benign", "2", "--position", "prompt", "--benign-prompts", str(benign_file(tmp_path / "b.txt")),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["selection"] == "effect" and json.loads(out)["position"] == "prompt"


def test_inspect_survives_crafted_selection_records(effect_lock):
    """The manifest's details are free-form: inspect reads the selection record defensively."""
    from weightlock.core.describe import selection_summary

    _, lock = effect_lock
    good = lock.creation["details"]["selection"]
    crafted = [
        "effect",
        {"method": "magic"},
        dict(good, candidates="all"),
        dict(good, candidates=[{"layer": "0", "head": 1, "effect": 1, "kl": 1, "score": 1, "probe_accuracy": 1}]),
        dict(good, candidates=[dict(good["candidates"][0], effect=float("nan"))]),
        dict(good, candidates=[good["candidates"][0]] * 10_000),
        dict(good, candidates=[dict(good["candidates"][0], layer=True)]),
    ]
    for record in crafted:
        forged = build_lock(
            lock.layers,
            lock.heads,
            lock.directions,
            lock.scales,
            lock.source_model,
            default_alpha=1.0,
            creation={"method": "forge", "tool": "x", "details": {"selection": record, "position": 5}},
        )
        summary = selection_summary(forged)
        assert summary is None or "kept" not in summary
    assert selection_summary(lock)["kept"]


# ------------------------------------------------------------------------------------------ tune bounds


def _row(alpha, compliance, over, qa):
    return AlphaResult(alpha, compliance, over, 0.0, qa, 0.0, 0.0)


def test_tune_relative_bounds_judge_against_alpha_zero():
    sweep = [
        _row(0, 0.7, 0.4, 0.6),
        _row(1, 0.3, 0.45, 0.55),  # refuses 70%: below the target
        _row(2, 0.15, 0.5, 0.5),  # meets everything relative: QA -10 pts is within 0.1, over-refusal +10 pts
        _row(3, 0.1, 0.8, 0.5),  # over-refusal +40 pts
        _row(4, 0.0, 0.5, 0.2),  # QA -40 pts
    ]
    relative = TuneBounds(target_refusal=0.8, max_over_refusal=1.0, max_qa_drop=0.1, max_over_refusal_rise=0.1)
    choice = choose_alpha(sweep, relative)
    assert choice["alpha"] == 2
    verdicts = {v["alpha"]: v["problems"] for v in choice["verdicts"]}
    assert verdicts[3] == ["over-refusal up 40% from 40% > 10%"]
    assert verdicts[4] == ["QA down 40% from 60% > 10%"]
    # the same sweep with the absolute default bound on over-refusal: nothing qualifies
    assert choose_alpha(sweep, TuneBounds(target_refusal=0.8))["alpha"] is None
    with pytest.raises(InvalidInputError, match="need alpha 0"):
        choose_alpha(sweep[1:], relative)


def test_tune_cli_adds_alpha_zero_for_relative_bounds(tmp_path, capsys):
    from test_eval import make_chat_model, small_sets

    model = make_chat_model(tmp_path / "chat")
    files = small_sets(tmp_path)
    save_lock(random_lock(model, n_heads=3, seed=5), tmp_path / "l.wlock")
    code, out, err = run_cli(
        capsys, "tune", str(model), "--lock", str(tmp_path / "l.wlock"), "--alphas", "2", "--target-refusal", "0",
        "--max-qa-drop", "1", "--max-over-refusal-rise", "1", "--max-kl", "100", "--max-degenerate", "1",
        "--harmful", str(files["harmful"]), "--benign", str(files["benign"]), "--qa", str(files["qa"]),
        "--kl-text", str(files["kl"]), "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert [r["alpha"] for r in report["results"]] == [0, 2]
    assert report["choice"]["bounds"]["max_qa_drop"] == 1 and report["choice"]["bounds"]["max_over_refusal"] == 1.0
    code, _, err = run_cli(capsys, "tune", str(model), "--lock", str(tmp_path / "l.wlock"), "--max-qa-drop", "5")
    assert code == 3 and "--max-qa-drop must be a number in [0, 1]" in err
