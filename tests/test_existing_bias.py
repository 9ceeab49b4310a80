"""Checkpoints whose o_proj already has a bias (gpt-oss, GPT-NeoX, StarCoder2, Phi): the lock is added to it.
(The in-place crash test also covers Mixtral, whose shards are swapped for its stacked experts.)

gpt-oss's experts may be stored as MXFP4 blocks and scales: they are never read or rewritten, and stock
transformers (which dequantizes them on a CPU) loads the output with the lock active. ``--in-place`` works for
these families too: a shard holding a replaced bias is swapped for its rewrite and the original kept for
``revert``, which restores every byte; a crash at any step is undone by ``revert``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import logits, make_model, random_lock, stored_bytes, tree_hashes

from weightlock import apply_in_place, apply_lock, revert, verify_checkpoint

EXISTING_BIAS = ["gpt_oss", "gpt_neox", "starcoder2", "phi"]


def make_mxfp4_gpt_oss(folder: Path, shard_kb=None) -> Path:
    """A tiny gpt-oss whose experts are stored as real checkpoints store them: MXFP4 blocks (two FP4 values
    per byte, 32 per block) and one power-of-two scale byte per block, with the quantization config."""
    import torch
    from safetensors.torch import load_file, save_file

    dense = make_model(folder.with_name(folder.name + "-dense"), "gpt_oss")
    state = load_file(dense / "model.safetensors")
    config = json.loads((dense / "config.json").read_text())
    rng = np.random.default_rng(0)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape  # stored [experts, in, out]; MXFP4 rows are outputs
        blocks = rng.integers(0, 256, (experts, outputs, inputs // 32, 16), dtype=np.uint8)
        state[f"{name}_blocks"] = torch.from_numpy(blocks)
        state[f"{name}_scales"] = torch.from_numpy(
            rng.integers(122, 129, (experts, outputs, inputs // 32), dtype=np.uint8)
        )
    folder.mkdir()
    if shard_kb is None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:  # one shard per layer and one for the rest, with an index, as real checkpoints are
        shards: dict[str, dict] = {}
        for name, tensor in state.items():
            layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
            shards.setdefault(layer, {})[name] = tensor
        weight_map = {}
        for i, (_, tensors) in enumerate(sorted(shards.items())):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, folder / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in tensors})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return folder


def _entries(folder: Path):
    from weightlock import open_checkpoint

    return open_checkpoint(folder).tensors


def _expert_bytes(folder: Path) -> dict[str, bytes]:
    return {name: stored_bytes(entry) for name, entry in _entries(folder).items() if ".mlp.experts." in name}


@pytest.mark.parametrize("sharded", [False, True])
def test_mxfp4_gpt_oss_lock_adds_to_the_bias_and_leaves_the_experts_alone(tmp_path, sharded):
    src = make_mxfp4_gpt_oss(tmp_path / "src", shard_kb=8 if sharded else None)
    lock = random_lock(src)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=3.0)
    assert result.plan.replaced and all(".self_attn.o_proj.bias" in n for n in result.plan.replaced)
    experts = _expert_bytes(src)
    quantized = [e for n, e in _entries(src).items() if n.endswith(("_blocks", "_scales"))]
    assert quantized and {e.dtype for e in quantized} == {"U8"}
    assert experts and _expert_bytes(tmp_path / "out") == experts, "expert blocks and scales copied byte for byte"
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    if sharded:  # only the shards holding a locked layer's o_proj bias are rewritten
        rewritten = set(result.written.rewritten)
        locked_layers = {b.layer for b in result.plan.biases if b.weight is not None}
        assert len(rewritten) == len(locked_layers)
        for shard in set(result.written.shards.values()) - rewritten:
            assert os.stat(tmp_path / "out" / shard).st_ino == os.stat(src / shard).st_ino  # hardlinked
    # stock transformers dequantizes the experts on a CPU and loads the bias: the lock is active
    reference, unlocked = logits(src, lock=lock, alpha=3.0), logits(src)
    edited = logits(tmp_path / "out")
    gap = (edited - reference).abs().max().item()
    assert gap <= 2e-5 * unlocked.abs().max().item()
    assert (reference - unlocked).abs().max().item() > 100 * max(gap, 1e-6)
    report = verify_checkpoint(tmp_path / "out", source=src)  # the originals only the source can confirm
    assert report.ok, report.failures()
    assert {c.name: c.status for c in report.checks}["transformers_names"] == "pass"


@pytest.mark.parametrize("family", EXISTING_BIAS)
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_in_place_adds_to_existing_biases_and_revert_restores_every_byte(tmp_path, family, layout):
    src = make_model(tmp_path / "src", family, shard_kb=40 if layout == "sharded" else None)
    before = tree_hashes(src)
    original = shutil.copytree(src, tmp_path / "original")  # what verify --source compares the originals with
    lock = random_lock(src)
    reference = logits(src, lock=lock, alpha=2.5)
    result = apply_in_place(src, lock, alpha=2.5)
    assert result.plan.replaced and result.report.ok
    assert (logits(src) - reference).abs().max().item() < 1e-4
    record = json.loads((src / "weightlock" / "in-place.json").read_text())
    assert record["swapped"], "the shards holding the biases were swapped"
    for old in record["swapped"]:
        assert (src / "weightlock" / "backup" / old).is_file()  # the original, moved, not copied
    assert verify_checkpoint(src, source=original).ok
    assert not verify_checkpoint(src).ok  # without the source the originals are unverifiable
    revert(src)
    assert tree_hashes(src) == before


def test_in_place_gpt_oss_mxfp4_and_revert(tmp_path):
    src = make_mxfp4_gpt_oss(tmp_path / "src", shard_kb=8)
    before = tree_hashes(src)
    lock = random_lock(src)
    reference = logits(src, lock=lock, alpha=2.0)
    apply_in_place(src, lock, alpha=2.0)
    assert (logits(src) - reference).abs().max().item() < 1e-4
    revert(src)
    assert tree_hashes(src) == before


@pytest.mark.parametrize(
    "family,shard_kb",
    [
        ("starcoder2", None),  # single file: model.safetensors swapped for model-00001-of-00002
        ("starcoder2", 40),
        ("mixtral", 100),  # experts stacked across shards; 3 of its 12 shards end up empty and only move away
    ],
)
def test_a_crash_at_every_step_of_an_in_place_swap_is_undone_by_revert(tmp_path, family, shard_kb):
    """Kill the in-place apply at its N-th failpoint for every N it reaches; revert then restores the exact
    original bytes (and apply succeeds afterwards)."""
    src = make_model(tmp_path / "src", family, shard_kb=shard_kb)
    lock_path = tmp_path / "l.wlock"
    from weightlock import save_lock

    save_lock(random_lock(src), lock_path)
    before = tree_hashes(src)
    code = f"from weightlock import apply_in_place; apply_in_place({str(src)!r}, {str(lock_path)!r}, alpha=2.0)"
    crashes = 0
    for n in range(1, 200):
        env = dict(os.environ, WEIGHTLOCK_FAILPOINT=f"#{n}")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            break
        assert done.returncode == -9, done.stderr[-2000:]
        crashes += 1
        revert(src)
        assert tree_hashes(src) == before, f"revert after a crash at failpoint #{n} left the folder changed"
    else:
        pytest.fail("the apply never completed")
    assert crashes >= 8  # staging writes, the record, the shard moves and swaps, the file replacements
    revert(src)
    assert tree_hashes(src) == before
