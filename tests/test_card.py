"""The model card a locked checkpoint carries (issue 14, part 1): made with huggingface_hub's ModelCard, the
source's card kept and added to, the lock named, behaviour claimed only from a given eval report, checked by
verify, and undone with the rest of an in-place edit."""

from __future__ import annotations

import json
import os

import pytest
from conftest import apply_cli, make_llama, random_lock, tree_hashes
from huggingface_hub import ModelCard

from weightlock import apply_in_place, apply_lock, revert, save_lock, verify_checkpoint
from weightlock.formats.safetensors.card import BEGIN, card_lock_sha256

SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage: en\ntags:\n- tiny\n---\n# Tiny\n\nA tiny test model.\n"


def strict_card(text: str) -> ModelCard:
    """Parsed as the Hub parses a card's YAML front matter (errors raised, not ignored)."""
    return ModelCard(text, ignore_metadata_errors=False)


def test_the_source_card_is_kept_and_extended(tmp_path):
    src = make_llama(tmp_path / "src")
    (src / "README.md").write_text(SOURCE_CARD)
    lock = random_lock(src)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=2.5)
    text = (tmp_path / "out" / "README.md").read_text()
    card = strict_card(text)
    assert card.data.license == "apache-2.0" and card.data.language == "en"
    assert card.data.tags == ["tiny", "weightlock", "safety-lock"]
    assert card.data.base_model is None, "a local folder has no Hub id to name"
    assert "A tiny test model." in card.text and text.splitlines().count("---") == 2
    assert card_lock_sha256(text) == result.provenance["lock"]["sha256"]
    assert "| alpha | 2.5 |" in text and "--alpha -2.5" in text
    assert "Behaviour was not measured" in text
    checks = {c.name: c.status for c in verify_checkpoint(tmp_path / "out").checks}
    assert checks["model_card"] == "pass"
    assert (src / "README.md").read_text() == SOURCE_CARD, "the source is only read"


def test_a_source_without_a_card_gets_one(tmp_path):
    src = make_llama(tmp_path / "src", extra_files=False)
    apply_lock(src, random_lock(src), out=tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    card = strict_card(text)
    assert card.data.tags == ["weightlock", "safety-lock"] and "Safety lock (weightlock)" in card.text
    assert text.splitlines().count("---") == 2 and card.text.lstrip().startswith("# ")


def test_a_hub_source_is_named_as_base_model_with_its_revision(tmp_path, monkeypatch):
    from test_checkpoint_io import _hub_cache

    src = make_llama(tmp_path / "src")
    cache, commit = _hub_cache(tmp_path, src)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    apply_lock("org/tiny", random_lock(src), out=tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    card = strict_card(text)
    assert card.data.base_model == "org/tiny" and f"revision {commit}" in card.text
    assert "tiny test model" in card.text and text.splitlines().count("---") == 2, "a card without metadata"


def test_locking_again_replaces_the_section(tmp_path):
    src = make_llama(tmp_path / "src")
    apply_lock(src, random_lock(src, seed=1), out=tmp_path / "once")
    second = apply_lock(tmp_path / "once", random_lock(src, seed=2), out=tmp_path / "twice")
    text = (tmp_path / "twice" / "README.md").read_text()
    assert text.count(BEGIN) == 1 and card_lock_sha256(text) == second.provenance["lock"]["sha256"]
    assert strict_card(text).data.tags.count("weightlock") == 1


def test_verify_fails_when_the_card_does_not_name_the_lock(tmp_path):
    src = make_llama(tmp_path / "src")
    result = apply_lock(src, random_lock(src), out=tmp_path / "out")
    card = tmp_path / "out" / "README.md"
    good = card.read_text()
    for bad in (
        good.replace(result.provenance["lock"]["sha256"], "0" * 64),
        good.split(BEGIN)[0],
        None,
        good.replace("- weightlock\n", ""),
    ):
        if bad is None:
            card.unlink()
        else:
            card.write_text(bad)
        checks = {c.name: c.status for c in verify_checkpoint(tmp_path / "out").checks}
        assert checks["model_card"] == "fail", bad
    card.write_text(good)
    assert verify_checkpoint(tmp_path / "out").ok


def _eval_report(path):
    report = {
        "weightlock_version": "0.1.0",
        "model": "src",
        "lock": "l.wlock",
        "sets": {"harmful": {"source": "advbench.csv", "count": 40}},
        "settings": {},
        "judge": "refusal phrases",
        "choice": None,
        "results": [
            {
                "alpha": 0.0,
                "harmful_compliance": 0.72,
                "over_refusal": 0.42,
                "degenerate": 0.0,
                "qa_accuracy": 0.58,
                "kl": 0.0,
                "seconds": 1.0,
            },
            {
                "alpha": 1.0,
                "harmful_compliance": 0.35,
                "over_refusal": 0.68,
                "degenerate": 0.01,
                "qa_accuracy": 0.5,
                "kl": 0.11,
                "seconds": 1.0,
            },
        ],
    }
    path.write_text(json.dumps(report))
    return path


def test_an_eval_report_is_quoted_and_a_bad_one_refused(tmp_path, capsys):
    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    report = _eval_report(tmp_path / "eval.json")
    code, _, err = apply_cli(
        capsys,
        src,
        tmp_path / "l.wlock",
        tmp_path / "out",
        "--eval-report",
        str(report),
    )
    assert code == 0, err
    text = (tmp_path / "out" / "README.md").read_text().replace("\u200b", "")  # md()'s zero-width link breaks
    assert "| 1 | 35% | 68% | 1% | 50% | 0.1100 |" in text and "advbench.csv (40)" in text
    assert "not measured" not in text
    report.write_text('{"results": "many"}')
    code, _, err = apply_cli(
        capsys,
        src,
        tmp_path / "l.wlock",
        tmp_path / "out2",
        "--eval-report",
        str(report),
    )
    assert code == 3 and "eval report" in err and "hint:" in err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("with_card", [True, False])
def test_in_place_edits_the_card_and_revert_restores_it(tmp_path, with_card):
    src = make_llama(tmp_path / "src", extra_files=False)
    if with_card:
        (src / "README.md").write_text(SOURCE_CARD)
    before = tree_hashes(src)
    apply_in_place(src, random_lock(src))
    text = (src / "README.md").read_text()
    assert card_lock_sha256(text) and "weightlock revert" in text
    assert verify_checkpoint(src).ok
    revert(src)
    assert tree_hashes(src) == before
    assert os.path.exists(src / "README.md") == with_card


def test_text_from_a_lock_cannot_forge_the_card(tmp_path):
    from weightlock import SourceModel, build_lock

    src = make_llama(tmp_path / "src")
    lock = random_lock(src)
    forged = SourceModel(
        **{**lock.source_model.to_dict(), "name": "x\n<!-- weightlock:end -->\n| lock sha256 | `" + "1" * 64}
    )
    lock = build_lock(lock.layers, lock.heads, lock.directions, lock.scales, forged, default_alpha=1.0)
    result = apply_lock(src, lock, out=tmp_path / "out", allow_architecture_mismatch=True)
    text = (tmp_path / "out" / "README.md").read_text()
    assert text.count("<!-- weightlock:end -->") == 1
    assert card_lock_sha256(text) == result.provenance["lock"]["sha256"]
    assert verify_checkpoint(tmp_path / "out").ok


def test_a_refused_card_wins_over_a_refused_computation(tmp_path, capsys):
    """apply imports what the card needs while it computes the biases (the two overlap); a card it must refuse is
    still the refusal reported when the computation is refused too (an alpha that rounds away), as when the card
    was built first, and nothing is written."""
    src = make_llama(tmp_path / "src", dtype="float16")
    (src / "README.md").write_text("---\n- a list, not a mapping\n---\n# Tiny\n")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    code, _, err = apply_cli(capsys, src, tmp_path / "l.wlock", tmp_path / "out", "--alpha", "1e-12")
    assert code == 3 and "front matter is a YAML list" in err and "rounds away" not in err, err
    assert not (tmp_path / "out").exists()
    (src / "README.md").write_text(SOURCE_CARD)
    code, _, err = apply_cli(capsys, src, tmp_path / "l.wlock", tmp_path / "out", "--alpha", "1e-12")
    assert code == 3 and "rounds away in F16" in err and not (tmp_path / "out").exists(), err
