"""The central proof: an applied checkpoint, loaded by stock AutoModelForCausalLM with no
missing or unexpected keys, gives the logits of the original model with the lock
applied at run time by forward-pre-hooks on the o_proj input."""

from __future__ import annotations

import json
import os

import pytest
from conftest import logits, make_llama, random_lock, tree_hashes

from weightlock import apply_lock, verify_checkpoint
from weightlock.core.report import report_json
from weightlock.errors import InvalidInputError

# (name, make_llama kwargs, dtype, tolerance as a fraction of the logits' scale)
VARIANTS = [
    ("single-f32-mha", dict(heads=4, kv_heads=4), "float32", 1e-5),
    ("sharded-f32-gqa", dict(heads=4, kv_heads=2, shard_kb=40), "float32", 1e-5),
    ("tied-f32", dict(tie=True), "float32", 1e-5),
    ("single-bf16-gqa", dict(dtype="bfloat16"), "bfloat16", 2e-2),
    ("sharded-bf16-tied", dict(dtype="bfloat16", tie=True, shard_kb=30), "bfloat16", 2e-2),
    ("head-dim-not-hidden-over-heads", dict(hidden=48, heads=4, kv_heads=2, head_dim=16), "float32", 1e-5),
    ("existing-attention-bias", dict(attention_bias=True, shard_kb=40), "float32", 1e-5),
]


@pytest.mark.parametrize("name,kwargs,dtype,rel_tol", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_edit_equals_runtime_hooks(tmp_path, name, kwargs, dtype, rel_tol):
    src = make_llama(tmp_path / "src", **kwargs)
    before = tree_hashes(src)
    lock = random_lock(src, n_heads=6)
    out = tmp_path / "out"
    result = apply_lock(src, lock, out=out, alpha=3.0)

    assert tree_hashes(src) == before, "the source must never be modified"
    assert not (out / "model.safetensors").exists(), "transformers would load it and ignore the index"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    if kwargs.get("attention_bias"):
        assert result.plan.replaced and result.written.rewritten, "existing o_proj biases are replaced"

    reference = logits(src, lock=lock, alpha=3.0, dtype=dtype)
    unlocked = logits(src, dtype=dtype)
    edited = logits(out, dtype=dtype)  # asserts no missing / unexpected / mismatched keys
    scale = unlocked.abs().max().item()
    gap = (edited - reference).abs().max().item()
    moved = (reference - unlocked).abs().max().item()
    assert gap <= rel_tol * scale, f"edited vs hooked logits differ by {gap} (scale {scale})"
    assert moved > 10 * max(gap, rel_tol * scale), "the lock must move the logits well past the tolerance"

    # with existing biases, the originals only the source confirms; the engine here is stock transformers
    report = verify_checkpoint(out, source=src, engines="transformers")
    assert report.ok, report.failures()
    assert {c.name: c.status for c in report.checks}["transformers_names"] == "pass"
    json.loads(report_json(report))  # validates against schemas/report.schema.json


@pytest.mark.parametrize("alpha", [0.0, -0.0, 1e-320, -1e-300])
def test_an_alpha_that_bakes_no_lock_is_refused(tmp_path, alpha):
    """An output whose record names a lock and whose biases carry none of it would read as locked: an alpha
    that makes every displacement zero in float32 (0, -0, a denormal) is refused before anything is written."""
    src = make_llama(tmp_path / "src", shard_kb=40)
    with pytest.raises(InvalidInputError, match="carry no lock"):
        apply_lock(src, random_lock(src), out=tmp_path / "out", alpha=alpha)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plus_then_minus_alpha_restores_logits(tmp_path, dtype):
    src = make_llama(tmp_path / "src", dtype=dtype)
    lock = random_lock(src)
    locked, unlocked = tmp_path / "locked", tmp_path / "unlocked"
    apply_lock(src, lock, out=locked, alpha=4.0)
    result = apply_lock(locked, lock, out=unlocked, alpha=-4.0)
    assert result.plan.replaced, "the second edit adds to the first edit's biases"
    original, restored = logits(src, dtype=dtype), logits(unlocked, dtype=dtype)
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert (restored - original).abs().max().item() <= tol * original.abs().max().item()
    assert (logits(locked, dtype=dtype) - original).abs().max().item() > 0.1
    report = verify_checkpoint(unlocked)
    assert report.ok, report.failures()
    record = json.loads((unlocked / "weightlock" / "provenance.json").read_text())
    assert record["parent"]["alpha"] == 4.0, "the earlier edit's record is kept as parent"
    assert (unlocked / "weightlock" / "originals.wlt").is_file(), "replaced tensors' bytes are kept"


def test_hardlink_and_copy_modes(tmp_path):
    src = make_llama(tmp_path / "src", shard_kb=40)
    lock = random_lock(src)
    linked = apply_lock(src, lock, out=tmp_path / "linked", link_mode="hardlink")
    copied = apply_lock(src, lock, out=tmp_path / "copied", link_mode="copy")
    for shard in sorted(p.name for p in src.glob("*.safetensors")):
        assert os.path.samefile(src / shard, tmp_path / "linked" / shard)
        assert not os.path.samefile(src / shard, tmp_path / "copied" / shard)
        assert (src / shard).read_bytes() == (tmp_path / "copied" / shard).read_bytes()
    assert linked.written.linked > 0 and linked.written.copied == 0
    assert copied.written.copied > 0 and copied.written.linked == 0


def test_an_alpha_that_rounds_away_in_the_stored_dtype_is_refused(tmp_path, capsys):
    """Nonzero displacements can still leave every stored bias as it was (a tiny alpha in F16, or on top of an
    existing F32 bias): refused before anything is written, folder and GGUF alike."""
    from conftest import run_cli
    from gguf_helpers import lock_for_gguf, write_gguf

    from weightlock import save_lock

    src = make_llama(tmp_path / "src", dtype="float16")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    code, _, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "o"), "--alpha", "1e-12"
    )
    assert code == 3 and "rounds away in F16" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    gguf = write_gguf(tmp_path / "m.gguf", bias=True)
    save_lock(lock_for_gguf(gguf), tmp_path / "g.wlock")
    out = tmp_path / "o.gguf"
    code, _, err = run_cli(
        capsys, "apply", str(gguf), "--lock", str(tmp_path / "g.wlock"), "--out", str(out), "--alpha", "1e-20"
    )
    assert code == 3 and "rounds away in F32" in err and not out.exists(), err
    code, _, err = run_cli(
        capsys, "apply", str(gguf), "--lock", str(tmp_path / "g.wlock"), "--out", str(out), "--alpha", "1"
    )
    assert code == 0, err
