"""Bad input is refused with a clear message, a non-zero exit, no traceback and no output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_llama, random_lock, rewrite_safetensors, run_cli, tree_hashes

from weightlock import SourceModel, apply_lock, build_lock, save_lock
from weightlock.errors import CheckpointError, IncompatibleLockError, InvalidInputError, OutputError, UnsupportedError
from weightlock.io.safetensors_file import TensorData


@pytest.fixture
def setup(tmp_path):
    src = make_llama(tmp_path / "src")
    lock_path = tmp_path / "lock.wlock"
    save_lock(random_lock(src), lock_path)
    return src, lock_path


def no_partial_output(parent):
    return not [p for p in parent.iterdir() if "weightlock-partial" in p.name]


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("num_hidden_layers", 5, "layers: lock 5, model 3"),
        ("num_attention_heads", 8, "attention heads"),
        ("head_dim", 8, "head_dim"),
    ],
)
def test_shape_mismatch_is_refused(tmp_path, capsys, field, value, words):
    src = make_llama(tmp_path / "src")
    good = random_lock(src)
    src_model = good.source_model.to_dict() | {field: value}
    lock = build_lock([0], [0], np.ones((1, src_model["head_dim"])), [1.0], SourceModel(**src_model), default_alpha=1.0)
    save_lock(lock, tmp_path / "other.wlock")
    with pytest.raises(IncompatibleLockError, match=words):
        apply_lock(src, tmp_path / "other.wlock", out=tmp_path / "out")
    code, out, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "other.wlock"), "--out", str(tmp_path / "out")
    )
    assert code == 4 and "another shape" in err and "Traceback" not in err + out
    assert not (tmp_path / "out").exists() and no_partial_output(tmp_path)


def test_architecture_mismatch_needs_explicit_consent(tmp_path, setup):
    src, _ = setup
    lock = random_lock(src)
    other = build_lock(
        lock.layers,
        lock.heads,
        lock.directions,
        lock.scales,
        SourceModel(**(lock.source_model.to_dict() | {"architecture": "MistralForCausalLM"})),
        default_alpha=1.0,
    )
    with pytest.raises(IncompatibleLockError, match="allow-architecture-mismatch"):
        apply_lock(src, other, out=tmp_path / "out")
    result = apply_lock(src, other, out=tmp_path / "out", allow_architecture_mismatch=True)
    assert result.plan.warnings


def test_unknown_architecture_is_refused(tmp_path, capsys, setup):
    src, lock_path = setup
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "apply", str(src), "--lock", str(lock_path), "--out", str(tmp_path / "o"))
    assert code == 4 and "'mamba'" in err and "supported model types: llama" in err
    assert "Traceback" not in err


def test_missing_o_proj_is_refused(tmp_path, capsys, setup):
    src, lock_path = setup
    rewrite_safetensors(
        src / "model.safetensors", lambda ts: [t for t in ts if t.name != "model.layers.1.self_attn.o_proj.weight"]
    )
    code, out, err = run_cli(
        capsys, "apply", str(src), "--lock", str(lock_path), "--out", str(tmp_path / "o"), "--json"
    )
    assert code == 3 and "model.layers.1.self_attn.o_proj.weight" in err
    assert json.loads(out)["ok"] is False and json.loads(out)["error"] == "invalid_checkpoint"


def test_non_finite_weights_are_refused(tmp_path, setup):
    src, lock_path = setup
    lock = random_lock(src)
    layer = int(lock.layers[0])
    name = f"model.layers.{layer}.self_attn.o_proj.weight"

    def poison(ts):
        out = []
        for t in ts:
            if t.name == name:
                values = np.frombuffer(t.data, np.float32).copy()
                values[:] = np.nan
                t = TensorData(t.name, t.dtype, t.shape, values.tobytes())
            out.append(t)
        return out

    rewrite_safetensors(src / "model.safetensors", poison)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        apply_lock(src, lock, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_partial_output(tmp_path)


def test_output_inside_source_is_refused(tmp_path, capsys, setup):
    src, lock_path = setup
    before = tree_hashes(src)
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock_path), "--out", str(src / "locked"))
    assert code == 5 and "inside the source" in err
    with pytest.raises(OutputError, match="source folder"):
        apply_lock(src, lock_path, out=src)
    with pytest.raises(OutputError, match="contains the source"):
        apply_lock(src, lock_path, out=tmp_path, force=True)
    assert tree_hashes(src) == before


def test_existing_output_needs_force(tmp_path, capsys, setup):
    src, lock_path = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock_path), "--out", str(out))
    assert code == 5 and "already exists" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, _ = run_cli(capsys, "apply", str(src), "--lock", str(lock_path), "--out", str(out), "--force")
    assert code == 0 and not (out / "precious.txt").exists() and (out / "weightlock").is_dir()


def test_overflowing_alpha_is_refused(tmp_path):
    src = make_llama(tmp_path / "src", dtype="bfloat16")
    lock = random_lock(src)
    with pytest.raises(UnsupportedError, match="smaller alpha"):
        apply_lock(src, lock, out=tmp_path / "out", alpha=1e38)


def test_non_finite_alpha_is_refused(tmp_path, setup):
    src, lock_path = setup
    with pytest.raises(InvalidInputError, match="finite"):
        apply_lock(src, lock_path, out=tmp_path / "out", alpha=float("nan"))


def test_both_single_file_and_index_is_ambiguous(tmp_path, setup):
    """A model.safetensors beside an index naming other shards: transformers and vLLM would load different
    weights. (An index naming model.safetensors alone is mlx-lm's layout: tests/test_mlx_quantized.py.)"""
    src, lock_path = setup
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ambiguous"):
        apply_lock(src, lock_path, out=tmp_path / "out")
    (src / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # and an index naming nothing
    with pytest.raises(CheckpointError, match="should be non-empty"):
        apply_lock(src, lock_path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_and_tensors_disagreeing_is_refused(tmp_path, setup):
    src, lock_path = setup
    config = json.loads((src / "config.json").read_text())
    config["attention_bias"] = True  # says biases exist; the tensors have none
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="disagree"):
        apply_lock(src, lock_path, out=tmp_path / "out")


def test_alternative_weight_files_are_left_out(tmp_path, setup):
    src, lock_path = setup
    (src / "consolidated.safetensors").write_bytes(b"mistral format")
    (src / "params.json").write_text("{}")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"pickle")
    (src / "original" / "tokenizer.model").write_bytes(b"spm")
    result = apply_lock(src, lock_path, out=tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "consolidated.safetensors").exists() and not (out / "params.json").exists()
    assert not (out / "original" / "consolidated.00.pth").exists()
    assert (out / "original" / "tokenizer.model").read_bytes() == b"spm"
    assert sorted(result.written.left_out) == [
        "consolidated.safetensors",
        "original/consolidated.00.pth",
        "params.json",
    ]
