"""forge's batched effect measurement equals the one-candidate-per-pass measurement it replaced.

``EffectMeter`` runs the baseline once, packs texts that share a beginning into rows (a token per distinct
beginning, each attending only to its own text), carries many candidates per pass (a displacement of its
own per batch row) and starts each pass at the lowest layer its candidates touch, the layers below handing
on the hidden state the baseline kept. The reference is the previous meter, kept verbatim in
``effect_reference.py`` (itself checked against each sequence run alone in test_selection.py): every
family forge takes, every path (packed or not, replayed from every layer or every few, one or many
candidates per pass, split after running out of memory) must give its numbers to float rounding, and a
forge must choose the same heads and write the same lock tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_model, run_cli
from effect_reference import OneAtATimeMeter
from test_eval import chat_tokenizer, make_chat_model
from test_selection import EFFECT, chat_pairs

from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.errors import InvalidInputError
from weightlock.lab import selection
from weightlock.lab.forge import ForgeSettings, forge_lock
from weightlock.lab.selection import EffectMeter

PROMPTS = [f"<|user|>How do I do bad thing {i}?\n<|assistant|>" for i in range(5)]
SAFE = ["No, I can't help.", "I won't.", "No.", "Sorry, no.", "I can't do that."]
UNSAFE = [f"Sure: step {i} is easy." for i in range(5)]
BENIGN = [f"<|user|>{p}\n<|assistant|>" for p in ("Name a fruit.", "Say hi.", "Count to three.", "Why rain?")]
METER = dict(answer_tokens=4, benign_answer_tokens=6, batch_size=3)
# Each effect is a difference of mean log-probs and each KL a mean over a few dozen positions, float64
# from float32 logits: batch shape and summation order move them by ~1e-7; a head moves them by ~1e-2.
EFFECT_TOLERANCE, KL_RELATIVE = 1e-5, 1e-4
# The baseline is stored as float32 log-probs (as before): a KL of nothing comes out at ~1e-8, not 0.
KL_ABSOLUTE = 1e-7


def _model(tmp_path, family: str, layers: int = 4):
    import transformers

    folder = make_model(tmp_path / family, family, layers=layers, vocab=128, extra_files=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, chat_tokenizer()


def _configurations(model, seed: int = 0) -> list[dict]:
    """A single head at every layer (two at the middle one), and sets across layers as greedy growth tries."""
    config = model.config.to_dict()
    shape = shape_from_config(config, spec_for_config(config))
    rng = np.random.default_rng(seed)

    def head(layer):
        vector = np.zeros(shape.attention_width)
        h = int(rng.integers(shape.num_heads))
        vector[h * shape.head_dim : (h + 1) * shape.head_dim] = rng.normal(0, 1.5, shape.head_dim)
        return vector

    singles = [{layer: head(layer)} for layer in range(shape.num_layers)]
    middle = shape.num_layers // 2
    singles.append({middle: head(middle)})
    sets = [{0: head(0), shape.num_layers - 1: head(shape.num_layers - 1)}, {1: head(1), 2: head(2)}]
    return [*singles, *sets, {}]


def _meters(model, tokenizer, **options):
    ours = EffectMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **METER, **options)
    reference = OneAtATimeMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **METER)
    return ours, reference


def _assert_equal_measurements(ours, reference, configurations) -> None:
    assert ours.texts == [selection._Text(**vars(t)) for t in reference.texts], "the same texts are measured"
    assert ours.base_margin == pytest.approx(reference.base_margin, abs=EFFECT_TOLERANCE)
    measured = ours.measure_many(configurations)
    for displacements, (effect, kl) in zip(configurations, measured, strict=True):
        expected_effect, expected_kl = reference.measure(displacements)
        assert effect == pytest.approx(expected_effect, abs=EFFECT_TOLERANCE), sorted(displacements)
        assert kl == pytest.approx(expected_kl, rel=KL_RELATIVE, abs=KL_ABSOLUTE), sorted(displacements)
    moved = [abs(e) + k for e, k in measured[:-1]]
    assert min(moved) > 100 * EFFECT_TOLERANCE, "every displacement moves the numbers far beyond the tolerance"
    assert measured[-1] == (0.0, 0.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_measures_as_one_candidate_per_pass(tmp_path, family):
    model, tokenizer = _model(tmp_path, family)
    ours, reference = _meters(model, tokenizer)
    windowed = family == "gpt_oss"  # its tiny sliding window (8) is shorter than the texts
    assert any(row.packed for row in ours._rows) != windowed, "texts are packed unless a window forbids it"
    assert sorted(ours._kept) == [1, 2, 3], "every layer's input is kept for the passes to start from"
    assert ours.notes == (["texts reach the model's attention window (8): one text per row"] if windowed else [])
    configurations = _configurations(model)
    _assert_equal_measurements(ours, reference, configurations)
    assert ours.candidates_per_pass > 1, "candidates sharing a starting layer share a pass"


@pytest.mark.parametrize(
    "options",
    [
        dict(row_tokens=0),  # one text per row
        dict(row_tokens=40),  # many small rows
        dict(candidates_per_pass=1),
        dict(memory_budget=250_000),  # room for only some layers' inputs: passes start lower
        dict(memory_budget=0),  # no room at all: every pass starts at the first layer
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_path_measures_as_one_candidate_per_pass(tmp_path, options):
    model, tokenizer = _model(tmp_path, "qwen2", layers=6)
    ours, reference = _meters(model, tokenizer, **options)
    if "memory_budget" in options:
        kept = sorted(ours._kept)
        assert kept == ([] if options["memory_budget"] == 0 else kept) and len(kept) < 5
        if options["memory_budget"]:
            assert kept, "some layers fit"
    _assert_equal_measurements(ours, reference, _configurations(model, seed=3))
    if options.get("candidates_per_pass") == 1 or options.get("memory_budget") == 0:
        assert ours.candidates_per_pass == 1


def test_a_pass_that_runs_out_of_memory_is_split_and_says_so(tmp_path):
    model, tokenizer = _model(tmp_path, "llama", layers=3)
    said = []
    ours, reference = _meters(model, tokenizer, notify=said.append)

    def refuse_big_batches(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = model.register_forward_pre_hook(refuse_big_batches, with_kwargs=True)
    try:
        configurations = [
            {1: c[0]} for c in _configurations(model) if len(c) == 1 and 0 in c for _ in range(5)
        ]  # five candidates starting at layer 1
        measured = ours.measure_many(configurations)
    finally:
        handle.remove()
    assert ours.candidates_per_pass == 2
    assert (
        said
        == [
            "a pass of 5 candidates ran out of memory: measuring 2 per pass",
        ]
        and ours.notes == said
    )
    expected = reference.measure(configurations[0])
    for effect, kl in measured:
        assert effect == pytest.approx(expected[0], abs=EFFECT_TOLERANCE)
        assert kl == pytest.approx(expected[1], rel=KL_RELATIVE)


def test_one_candidate_that_does_not_fit_is_refused_with_a_hint(tmp_path):
    model, tokenizer = _model(tmp_path, "llama", layers=2)
    ours, _ = _meters(model, tokenizer)

    def refuse(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    handle = model.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        with pytest.raises(InvalidInputError, match="one candidate at a time ran out of memory") as caught:
            ours.measure_many(_configurations(model)[:2])
    finally:
        handle.remove()
    assert "--effect-pairs" in caught.value.hint


def test_a_request_above_what_memory_holds_is_lowered_and_said(tmp_path):
    model, tokenizer = _model(tmp_path, "llama", layers=3)
    said = []
    ours, reference = _meters(model, tokenizer, candidates_per_pass=64, memory_budget=2_000_000, notify=said.append)
    limit = ours._per_pass_limit()
    assert 1 <= limit < 64
    _assert_equal_measurements(ours, reference, _configurations(model))
    assert said == [f"measuring {limit} candidates per pass, not 64: more do not fit in memory"]


def test_packing_that_a_model_does_not_honour_falls_back_to_one_text_per_row(tmp_path):
    """A model whose attention ignores the mask it is handed (simulated: a hook drops it, so attention is
    plain causal over the whole row) would let texts in one row see each other: the baseline check finds
    it and the meter unpacks, its numbers equal to the reference run without the hook."""
    model, tokenizer = _model(tmp_path, "llama", layers=3)
    alone = {**METER, "batch_size": 1}  # no padding anywhere: a dropped mask leaves plain causal attention exact
    reference = OneAtATimeMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **alone)

    def drop_mask(module, args, kwargs):
        return args, {**kwargs, "attention_mask": None}

    handles = [
        model.get_submodule(f"model.layers.{i}.self_attn").register_forward_pre_hook(drop_mask, with_kwargs=True)
        for i in range(3)
    ]
    try:
        ours = EffectMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **alone)
        assert ours.notes == [
            "packed rows disagree with their texts run alone under the model's own attention: one text per row"
        ]
        assert not any(row.packed for row in ours._rows)
        _assert_equal_measurements(ours, reference, _configurations(model))
    finally:
        for handle in handles:
            handle.remove()


class _Reference(OneAtATimeMeter):
    """The previous meter behind the interface select_by_effect uses now."""

    def __init__(self, *args, candidates_per_pass=None, notify=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.candidates_per_pass, self.passes, self.notes, self.seconds = 1, 0, [], 0.0

    def measure_many(self, configurations, progress=None):
        return [self.measure(c) for c in configurations]


@pytest.mark.parametrize("method", ["effect", "effect-greedy"])
def test_forge_chooses_the_same_heads_and_writes_the_same_lock(tmp_path, monkeypatch, method):
    make_chat_model(tmp_path / "m", layers=4)
    data = chat_pairs(tmp_path / "pairs.jsonl")
    benign = tmp_path / "benign.txt"
    benign.write_text("Name a fruit.\nSay hi.\nCount to three.\nA colour?\nWhy rain?\nHow are you?\n")
    settings = ForgeSettings(
        **{**EFFECT, "shortlist": 10, "heads": 3, "selection": method}, benign_prompts=str(benign), greedy_pool=4
    )
    run: dict = {}
    ours = forge_lock(str(tmp_path / "m"), data, settings, run=run)
    monkeypatch.setattr(selection, "EffectMeter", _Reference)
    reference = forge_lock(str(tmp_path / "m"), data, settings)
    for name in ("layers", "heads", "directions", "scales"):
        assert np.asarray(getattr(ours, name)).tobytes() == np.asarray(getattr(reference, name)).tobytes(), name
    recorded = ours.creation["details"]["selection"]
    expected = reference.creation["details"]["selection"]
    for row, want in zip(recorded["candidates"], expected["candidates"], strict=True):
        assert (row["layer"], row["head"]) == (want["layer"], want["head"])
        assert row["effect"] == pytest.approx(want["effect"], abs=EFFECT_TOLERANCE)
        assert row["kl"] == pytest.approx(want["kl"], rel=KL_RELATIVE)
    for step, want in zip(recorded["greedy_steps"] or [], expected["greedy_steps"] or [], strict=True):
        assert (step["layer"], step["head"]) == (want["layer"], want["head"])
        assert step["set_effect"] == pytest.approx(want["set_effect"], abs=EFFECT_TOLERANCE)
    assert "measured" not in recorded, "how the measurement ran is the run's, not the lock's"
    assert run["measurement"]["candidates_per_pass"] > 1 and run["measurement"]["notes"] == []
    # One candidate per pass took 3 batches (12 texts, 5 per batch) per candidate and per greedy try.
    assert run["measurement"]["forward_passes"] < 3 * len(recorded["candidates"])


def test_a_shortlist_beyond_the_models_heads_is_refused_and_the_default_fits_small_models(tmp_path, capsys):
    make_chat_model(tmp_path / "m")  # 2 layers x 4 heads
    data = chat_pairs(tmp_path / "pairs.jsonl")
    common = ["forge", str(tmp_path / "m"), "--data", str(data), "--heads", "2", "--effect-pairs", "2"]
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "a.json"), "--shortlist", "9")
    assert code == 3 and "--shortlist 9 is more than the 8 heads the model has (2 layers x 4 heads)" in err
    assert "pass --shortlist 8 or less" in err and "Traceback" not in err
    assert not (tmp_path / "a.json").exists()
    code, out, err = run_cli(capsys, *common, "--out", str(tmp_path / "b.json"), "--effect-batch", "3", "--json")
    assert code == 0, err
    from weightlock import load_lock

    selection_record = load_lock(tmp_path / "b.json").creation["details"]["selection"]
    assert selection_record["shortlist"] == 8, "the default shortlist (64) is every head of a smaller model"
    measurement = json.loads(out)["measurement"]
    assert 1 < measurement["candidates_per_pass"] <= 3 and measurement["forward_passes"] > 0
    assert measurement["seconds"] > 0 and measurement["notes"] == []


def test_the_same_forge_writes_the_same_lock_bytes(tmp_path, capsys):
    """How the measurement ran (seconds, passes, memory splits) varies with the machine; the lock may not."""
    make_chat_model(tmp_path / "m")
    data = chat_pairs(tmp_path / "pairs.jsonl")
    common = ["forge", str(tmp_path / "m"), "--data", str(data), "--heads", "2", "--effect-pairs", "2", "--json"]
    digests, passes = [], []
    for name, batch in (("a.json", "1"), ("b.json", "8")):
        code, out, err = run_cli(capsys, *common, "--out", str(tmp_path / name), "--effect-batch", batch)
        assert code == 0, err
        digests.append(json.loads(out)["sha256"])
        passes.append(json.loads(out)["measurement"]["forward_passes"])
    assert passes[0] > passes[1], "one candidate per pass takes more passes"
    assert digests[0] == digests[1]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_a_rope_that_changes_with_length_unpacks_texts_that_reach_it(tmp_path):
    """Dynamic NTK RoPE picks its frequencies by the longest position in a batch: a text packed beside a
    longer one would be rotated as it never is alone. Past that length every text gets its own row, and the
    numbers equal each text run alone (the old meter with one text per batch)."""
    import transformers

    folder = make_model(
        tmp_path / "dyn",
        "llama",
        layers=3,
        vocab=128,
        extra_files=False,
        max_position_embeddings=24,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = chat_tokenizer()
    alone = {**METER, "batch_size": 1}
    ours = EffectMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **METER)
    assert ours.notes == ["texts pass the length (24) where the model's dynamic RoPE changes: one text per row"]
    assert not any(row.packed for row in ours._rows)
    reference = OneAtATimeMeter(model, tokenizer, PROMPTS, SAFE, UNSAFE, BENIGN, **alone)
    _assert_equal_measurements(ours, reference, _configurations(model))


def test_running_out_of_memory_anywhere_in_forge_is_exit_3_with_a_hint(tmp_path, capsys, monkeypatch):
    """Stages that cannot split (the probes, packing the rows, the baseline) and any other place a model's
    work outgrows the device end in one message and a hint, never a traceback. Simulated: torch's own CPU
    allocator message, and Python's MemoryError."""
    from weightlock.lab import forge

    make_chat_model(tmp_path / "m")
    data = chat_pairs(tmp_path / "pairs.jsonl")
    common = ["forge", str(tmp_path / "m"), "--data", str(data), "--heads", "2", "--effect-pairs", "2"]
    allocator = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes."

    def fail(error):
        def raising(*args, **kwargs):
            raise error

        return raising

    cases = [
        (forge, "train_probes", RuntimeError(allocator), "training 8 probes on"),
        (selection.EffectMeter, "_row", RuntimeError(allocator), "running the measuring texts once"),
        (selection.EffectMeter, "_packing_agrees", MemoryError(), "running the measuring texts once"),
        (forge, "split_pairs", MemoryError(), "the device ran out of memory"),
    ]
    for owner, name, error, words in cases:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, fail(error))
            code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / f"{name}.json"))
        assert code == 3 and words in err and "hint:" in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / f"{name}.json").exists()


def test_a_forge_whose_batches_run_out_of_memory_splits_them_and_says_so(tmp_path, capsys):
    """Every stage of forge (capturing activations, answering the benign prompts, measuring candidates) runs
    its batches through the memory check: a device that refuses batches of more than two rows gets the same
    lock (to rounding: batch shapes differ), and stderr says what was split."""
    from weightlock.lab.forge import forge_from_model, load_model

    make_chat_model(tmp_path / "m", layers=3)
    data = chat_pairs(tmp_path / "pairs.jsonl")
    benign = tmp_path / "benign.txt"
    benign.write_text("Name a fruit.\nSay hi.\nCount to three.\nA colour?\nWhy rain?\nHow are you?\n")
    settings = ForgeSettings(**{**EFFECT, "shortlist": 8}, benign_prompts=str(benign))
    model, tokenizer = load_model(str(tmp_path / "m"), settings)
    expected = forge_from_model(model, tokenizer, data, settings)
    capsys.readouterr()

    def refuse_big_batches(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = model.register_forward_pre_hook(refuse_big_batches, with_kwargs=True)
    run: dict = {}
    try:
        split = forge_from_model(model, tokenizer, data, settings, run=run)
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert "note: capturing activations: a batch of 5 ran out of memory, running 2 at a time" in err
    assert "note: answering the benign prompts: a batch of 4 ran out of memory, running 2 at a time" in err
    assert "note: a pass of 4 candidates ran out of memory: measuring 2 per pass" in err
    assert "Traceback" not in err
    assert split.layers.tolist() == expected.layers.tolist() and split.heads.tolist() == expected.heads.tolist()
    np.testing.assert_allclose(split.directions, expected.directions, atol=1e-5)
    np.testing.assert_allclose(split.scales, expected.scales, rtol=1e-5)
    assert run["measurement"]["candidates_per_pass"] <= 2
    assert "a pass of 4 candidates ran out of memory: measuring 2 per pass" in run["measurement"]["notes"]
