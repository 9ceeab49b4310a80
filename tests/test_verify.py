"""verify: passes complete locked checkpoints, and catches each way one can be wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_llama, random_lock, rewrite_safetensors, run_cli

from weightlock import apply_lock, verify_checkpoint
from weightlock.io.safetensors_file import TensorData, write_safetensors
from weightlock.io.schema import schema_errors


@pytest.fixture
def locked(tmp_path):
    src = make_llama(tmp_path / "src", shard_kb=40)
    apply_lock(src, random_lock(src), out=tmp_path / "out", alpha=2.0)
    return tmp_path / "out"


def statuses(report):
    return {c.name: c.status for c in report.checks}


def test_locked_checkpoint_verifies_and_json_matches_schema(locked, capsys):
    code, out, _ = run_cli(capsys, "verify", str(locked), "--json", "--deep")
    report = json.loads(out)
    assert code == 0 and report["ok"] and not schema_errors(report, "report")
    assert report["locked"]["alpha"] == 2.0
    assert {c["name"]: c["status"] for c in report["checks"]}["finite"] == "pass"


def test_unlocked_source_verifies_without_provenance(tmp_path):
    src = make_llama(tmp_path / "src")
    report = verify_checkpoint(src)
    assert report.ok and statuses(report)["provenance"] == "skip" and report.locked is None


def _edit_added_shard(out, edit):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    rewrite_safetensors(out / index["weight_map"]["model.layers.0.self_attn.o_proj.bias"], edit)


def test_tampered_bias_is_caught(locked, capsys):
    record = json.loads((locked / "weightlock" / "provenance.json").read_text())
    target = record["tensors"]["locked"][0]

    def tamper(tensors):
        return [
            TensorData(t.name, t.dtype, t.shape, (np.frombuffer(t.data, np.float32) + 0.5).tobytes())
            if t.name == target
            else t
            for t in tensors
        ]

    _edit_added_shard(locked, tamper)
    report = verify_checkpoint(locked)
    check = next(c for c in report.checks if c.name == "lock_biases")
    assert check.status == "fail" and target in " ".join(check.details)
    code, _, _ = run_cli(capsys, "verify", str(locked))
    assert code == 1


def test_nan_bias_is_caught(locked):
    def poison(tensors):
        return [
            TensorData(t.name, t.dtype, t.shape, np.full(t.shape, np.nan, np.float32).tobytes())
            if t.name.endswith("q_proj.bias")
            else t
            for t in tensors
        ]

    _edit_added_shard(locked, poison)
    assert statuses(verify_checkpoint(locked))["finite"] == "fail"


def test_missing_bias_is_caught_by_config_and_loader_checks(locked):
    _edit_added_shard(locked, lambda ts: [t for t in ts if t.name != "model.layers.1.self_attn.k_proj.bias"])
    index_path = locked / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.k_proj.bias"]
    index_path.write_text(json.dumps(index))
    s = statuses(verify_checkpoint(locked))
    assert s["config_agrees"] == "fail" and s["transformers_names"] == "fail"


def test_stray_safetensors_is_caught(locked):
    write_safetensors(locked / "consolidated.safetensors", [TensorData("x", "F32", (1,), b"\0" * 4)])
    assert statuses(verify_checkpoint(locked))["stray_weight_files"] == "fail"


def test_missing_shard_is_caught(locked):
    index = json.loads((locked / "model.safetensors.index.json").read_text())
    (locked / index["weight_map"]["model.embed_tokens.weight"]).unlink()
    report = verify_checkpoint(locked)
    assert not report.ok and "missing" in report.failures()[0]


def test_reference_implementations_silent_drop_is_caught(tmp_path):
    """SafetyLock's offline path sets o_proj.bias and save_pretrained()s with attention_bias still off:
    the tensors are saved, and stock transformers drops them on load. verify refuses such a folder."""
    from transformers import AutoModelForCausalLM

    src = make_llama(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    for layer in model.model.layers:
        layer.self_attn.o_proj.bias = torch.nn.Parameter(torch.ones(model.config.hidden_size))
    model.save_pretrained(tmp_path / "reference")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "reference", output_loading_info=True)
    assert reloaded.model.layers[0].self_attn.o_proj.bias is None  # the lock is gone
    assert info["unexpected_keys"]
    s = statuses(verify_checkpoint(tmp_path / "reference"))
    assert s["config_agrees"] == "fail" and s["transformers_names"] == "fail"
