"""mlx-lm's own quantized folders (MLX affine): weightlock's dequantizer against ``mx.dequantize``, the lock
served by mlx-lm itself on checkpoints mlx-lm quantized, the quantized tensors carried byte for byte, per-layer
settings read as mlx-lm reads them, in-place apply and revert, and every contradictory or unread input refused.

The reference for every served proof is mlx_helpers.mlx_hooked_logits: the unlocked quantized folder in mlx-lm
with the lock's displacement added to each touched o_proj input at run time. Skipped without mlx-lm unless
WEIGHTLOCK_REQUIRE_MLX=1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model, random_lock, rewrite_safetensors, run_cli, stored_bytes, tree_hashes
from mlx_helpers import mlx_float32_logits, mlx_hooked_logits, mlx_logits, quantize_with_mlx, require_mlx

import weightlock.formats.safetensors.quant.dequantize as dequantizers
from weightlock import apply_in_place, apply_lock, open_checkpoint, revert, verify_checkpoint
from weightlock.core.lock import save_lock
from weightlock.formats.safetensors.quant.dequantize import dequantize
from weightlock.formats.safetensors.quant.layouts import (
    MLX_BITS,
    MLX_GROUP_SIZES,
    MLX_OTHER_MODES,
    QUANT_FORMATS,
    QuantSettings,
    quantization_of,
    quantized_linear,
)
from weightlock.io.safetensors_file import TensorData, TensorReaders, read_header

ALPHA = 3.0
FAMILIES = ("llama", "mistral", "qwen2")
# hidden and attention widths of 128: every linear layer divides into groups of 32, 64 and 128
SHAPE = dict(hidden=128, heads=4, kv_heads=2, vocab=96, layers=2)
OVERRIDES = {"mistral": dict(hidden_size=128, head_dim=32), "qwen2": {}, "llama": {}}
SCHEMES = ((4, 32), (4, 64), (8, 128))  # (bits, group size)
O_PROJ = "model.layers.1.self_attn.o_proj"
EPS = 1e-4  # float32 next-token log-probs: the hooked and the baked lock round differently


def _log_probs(logits: np.ndarray) -> np.ndarray:
    last = logits[:, -1].astype(np.float64)
    top = last.max(-1, keepdims=True)
    return last - top - np.log(np.exp(last - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    require_mlx()
    base = tmp_path_factory.mktemp("mlx-sources")
    out = {}
    for family in FAMILIES:
        folder = make_model(base / family, family, **SHAPE, **OVERRIDES[family])
        if family == "qwen2":  # as Qwen2 configs state it: mlx-lm reads only a top-level rope_theta
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory):
    """(family, bits, group, dtype) -> the folder mlx-lm's quantize_model and save_model wrote, made once."""
    base = tmp_path_factory.mktemp("mlx-quantized")
    made: dict = {}

    def get(family, bits, group, dtype="float32"):
        key = (family, bits, group, dtype)
        if key not in made:
            made[key] = quantize_with_mlx(sources[family], base / "-".join(map(str, key)), bits, group, dtype)
        return made[key]

    return get


# ---------------------------------------------------------------------------------------
# The dequantizer against mx.dequantize


def _mlx_layer(tmp_path: Path, bits: int, group: int, dtype: str, rows=24, inputs=384):
    """A layer quantized by mx.quantize and saved by mx.save_safetensors, read back through weightlock."""
    mx, _ = require_mlx()
    w = (mx.random.normal((rows, inputs), key=mx.random.key(bits * 1000 + group)) * 2).astype(getattr(mx, dtype))
    q, s, b = mx.quantize(w, group, bits)
    path = tmp_path / "layer.safetensors"
    mx.save_safetensors(str(path), {"m.weight": q, "m.scales": s, "m.biases": b})
    settings = QuantSettings(QUANT_FORMATS["mlx"], bits, group, symmetric=False, mode="affine")
    settings = dataclasses.replace(settings, layers=(("m", settings),))
    return quantized_linear(read_header(path).tensors, "m", settings), (q, s, b)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group", MLX_GROUP_SIZES)
@pytest.mark.parametrize("bits", MLX_BITS)
def test_dequantizer_equals_mx_dequantize(tmp_path, bits, group, dtype, monkeypatch):
    """Bit for bit against mx.dequantize of the same stored codes, scales and biases in float32 (for float32
    scales that is mx.dequantize itself). mx.dequantize of half-precision scales computes in their dtype,
    rounding q * scale and then the sum: ours (exact float32 arithmetic) is within those two roundings of it."""
    mx, _ = require_mlx()
    layer, (q, s, b) = _mlx_layer(tmp_path, bits, group, dtype)
    with TensorReaders() as readers:
        ours = dequantize(layer, readers)
    f32 = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group, bits))
    assert ours.tobytes() == f32.tobytes()
    theirs = np.array(mx.dequantize(q, s, b, group, bits).astype(mx.float32))
    if dtype == "float32":
        assert ours.tobytes() == theirs.tobytes()
    else:
        eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
        scale = np.repeat(np.abs(np.array(s.astype(mx.float32))), group, axis=1)
        bias = np.repeat(np.abs(np.array(b.astype(mx.float32))), group, axis=1)
        assert np.all(np.abs(ours - theirs) <= eps * (scale * (2**bits - 1) + bias))
    # the product reads row blocks of the touched columns only: the same in blocks of a few rows
    monkeypatch.setattr(dequantizers, "BLOCK_TARGET_BYTES", 4096)
    d = np.zeros(layer.shape[1], dtype=np.float32)
    d[96:160] = np.random.default_rng(bits).normal(size=64)
    with TensorReaders() as readers:
        np.testing.assert_allclose(layer.product(readers, d, 32), ours @ d, rtol=1e-5, atol=1e-5)
        assert readers.bytes_read == layer.bytes_to_read(d, 32) == layer.nbytes


# ---------------------------------------------------------------------------------------
# The lock in mlx-lm


def _served(quantized_folder: Path, lock, out: Path):
    apply_lock(quantized_folder, lock, out=out, alpha=ALPHA, loader_check=False)
    plain = _log_probs(mlx_logits(quantized_folder))
    hooked = _log_probs(mlx_hooked_logits(quantized_folder, lock, ALPHA))
    locked = _log_probs(mlx_logits(out))
    # the same comparison without a lock: mlx run to run, and the model's dtype against float32
    gap = max(
        np.abs(plain - _log_probs(mlx_logits(quantized_folder))).max(),
        np.abs(plain - _log_probs(mlx_float32_logits(quantized_folder))).max(),
    )
    return np.abs(locked - hooked).max(), np.abs(hooked - plain).max(), gap


def _carried_untouched(source: Path, out: Path) -> None:
    src, locked = open_checkpoint(source), open_checkpoint(out)
    for name, entry in src.tensors.items():  # every stored tensor (packed weights, scales, biases) byte for byte
        assert stored_bytes(locked.tensors[name]) == stored_bytes(entry), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == src.config["quantization"] == config["quantization_config"]
    added = sorted(set(locked.tensors) - set(src.tensors))
    assert added and all(name.endswith(".bias") for name in added)
    scales = {src.tensors[f"{n.removesuffix('.bias')}.scales"].dtype for n in added}
    assert {locked.tensors[n].dtype for n in added} == scales  # the model's dtype, unquantized
    # verify (every check; the engines: mlx-lm, the one loader that reads MLX folders), and with the source
    for report in (verify_checkpoint(out, loader_check=False, engines="mlx-lm"),) + (
        verify_checkpoint(out, loader_check=False, source=source, engines="mlx-lm"),
    ):
        assert report.ok, [c for c in report.checks if c.status == "fail"]
        biases = next(c for c in report.checks if c.name == "lock_biases")
        assert biases.status == "pass" and "recomputed" in biases.message


@pytest.mark.parametrize(("bits", "group"), SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_serves_the_lock_on_its_quantized_checkpoints(quantized, sources, tmp_path, family, bits, group):
    """float32 checkpoints: mlx-lm's next-token log-probs on the locked output equal the hooked reference
    within twice the gap of the same comparison without a lock (+1e-4), while the lock moves them 100x more."""
    folder = quantized(family, bits, group)
    lock = random_lock(sources[family], n_heads=3, seed=bits + group)
    error, effect, gap = _served(folder, lock, tmp_path / "locked")
    print(f"\n{family} int{bits} g{group} float32: gap {gap:.2e}, error {error:.2e}, effect {effect:.2f}")
    assert error <= 2 * gap + EPS, (error, gap)
    assert effect >= 100 * error, (effect, error)
    _carried_untouched(folder, tmp_path / "locked")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_serves_the_lock_in_half_precision(quantized, sources, tmp_path, family, dtype):
    """Half-precision checkpoints (as mlx_lm.convert writes them): the biases are stored in the model's dtype,
    and the locked output is within twice the model's own half-precision rounding (its log-probs against the
    same quantized model in float32) of the hooked reference; the lock moves them more than that."""
    folder = quantized(family, 4, 64, dtype)
    lock = random_lock(sources[family], n_heads=3, seed=5)
    error, effect, gap = _served(folder, lock, tmp_path / "locked")
    print(f"\n{family} int4 g64 {dtype}: gap {gap:.2e}, error {error:.2e}, effect {effect:.2f}")
    assert error <= 2 * gap + EPS, (error, gap)
    assert effect > 2 * error, (effect, error)
    _carried_untouched(folder, tmp_path / "locked")


def test_per_layer_settings_are_read_as_mlx_lm_reads_them(sources, tmp_path, capsys):
    """quantize_model with a per-layer predicate (one o_proj 8-bit in groups of 128, the rest 4-bit in groups of
    32) records the layer in config.json quantization; weightlock reads that layer with them, and mlx-lm serves
    the lock."""
    special = {"group_size": 128, "bits": 8, "mode": "affine"}
    folder = quantize_with_mlx(
        sources["llama"], tmp_path / "mixed", 4, 32, predicate=lambda path, _: dict(special) if path == O_PROJ else True
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"][O_PROJ] == special
    checkpoint = open_checkpoint(folder)
    settings = quantization_of(checkpoint.config)
    layers = {m: quantized_linear(checkpoint.tensors, m, settings) for m in ("model.layers.0.self_attn.o_proj", O_PROJ)}
    assert [layer.dtype for layer in layers.values()] == ["mlx affine int4, group 32", "mlx affine int8, group 128"]
    lock = random_lock(sources["llama"], n_heads=4, seed=11)
    assert {layer for layer, _ in lock.displacements(ALPHA, 4).items()} == {0, 1}
    error, effect, gap = _served(folder, lock, tmp_path / "locked")
    print(f"\nper-layer: gap {gap:.2e}, error {error:.2e}, effect {effect:.2f}")
    assert error <= 2 * gap + EPS and effect >= 100 * error
    code, text, _ = run_cli(capsys, "inspect", str(tmp_path / "locked"))
    assert code == 0 and "1 x mlx affine int4, group 32, 1 x mlx affine int8, group 128" in text, text
    assert "a bias on these layers is applied by: mlx-lm" in text


def test_inspect_shows_the_mlx_quantization(quantized, capsys):
    code, text, _ = run_cli(capsys, "inspect", str(quantized("llama", 4, 64)))
    assert code == 0 and "quantization: mlx; o_proj weights: 2 x mlx affine int4, group 64" in text, text
    assert "not shown for transformers" in text and "not shown for vllm" in text


def test_in_place_on_mlx_and_revert_restores_every_byte(quantized, sources, tmp_path):
    """mlx-lm's layout (model.safetensors with an index naming it) locked in place: served by mlx-lm, and
    revert puts back every file, the index included."""
    folder = tmp_path / "mlx"
    shutil.copytree(quantized("qwen2", 4, 32), folder)
    before = tree_hashes(folder)
    lock = random_lock(sources["qwen2"], n_heads=3, seed=7)
    hooked = _log_probs(mlx_hooked_logits(folder, lock, ALPHA))
    apply_in_place(folder, lock, alpha=ALPHA, loader_check=False)
    assert verify_checkpoint(folder, loader_check=False, engines="mlx-lm").ok
    assert np.abs(_log_probs(mlx_logits(folder)) - hooked).max() < EPS
    revert(folder)
    assert tree_hashes(folder) == before


def test_transformers_cannot_load_mlx_folders(quantized):
    """What the format's ``unproven`` says of transformers (vLLM's ModelConfig reads quantization_config's
    quant_method the same way: vllm/config/model.py, _verify_quantization)."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(quantized("llama", 4, 32))
    assert QUANT_FORMATS["mlx"].bias_honoured_by == ("mlx-lm",)


# ---------------------------------------------------------------------------------------
# Refused, nothing written, the source unchanged


def _tensor(name: str, change):
    """Change one stored tensor of O_PROJ: ``change(TensorData) -> TensorData | None`` (None drops it, from
    mlx-lm's index too)."""

    def edit(tensors):
        out = []
        for t in tensors:
            t = change(t) if t.name == f"{O_PROJ}.{name}" else t
            if t is not None:
                out.append(t)
        return out

    def apply(folder):
        rewrite_safetensors(folder / "model.safetensors", edit)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        if f"{O_PROJ}.{name}" not in {e.name for e in read_header(folder / "model.safetensors").tensors.values()}:
            del index["weight_map"][f"{O_PROJ}.{name}"]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return apply


def _columns(t: TensorData, columns: int) -> TensorData:
    rows = t.shape[0]
    width = len(t.data) // (rows * t.shape[1])
    data = np.frombuffer(t.data, np.uint8).reshape(rows, t.shape[1] * width)
    data = np.concatenate([data] * 2, axis=1)[:, : columns * width]
    return TensorData(t.name, t.dtype, (rows, columns), data.tobytes())


def _retyped(dtype: str):
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "U32": 4, "I32": 4}

    def change(t: TensorData) -> TensorData:
        count = len(t.data) // sizes[t.dtype]
        return TensorData(t.name, dtype, t.shape, (t.data * 4)[: count * sizes[dtype]])

    return change


def _quantization(change):
    """Change config.json quantization (and quantization_config, which mlx-lm writes equal to it)."""

    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        quant = change(dict(config["quantization"]))
        config.update(quantization=quant, quantization_config=quant)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _set(**values):
    return _quantization(lambda q: {**q, **values})


def _stray(folder):
    shutil.copyfile(folder / "model.safetensors", folder / "model-extra.safetensors")


# case -> (change to a float32 4-bit group-32 Llama, exit code, what the message names)
REFUSED = {
    "scales one column short": (_tensor("scales", lambda t: _columns(t, t.shape[1] - 1)), 3, "groups of 42"),
    "scales one column more": (_tensor("scales", lambda t: _columns(t, t.shape[1] + 1)), 3, "groups of 25"),
    "scales float16": (_tensor("scales", _retyped("F16")), 3, "biases is F32 [128, 4], expected F16"),
    "scales uint8 (a floating-point mode)": (_tensor("scales", _retyped("U8")), 4, "uint8 scales"),
    "scales int32": (_tensor("scales", _retyped("I32")), 3, "scales"),
    "biases one column short": (_tensor("biases", lambda t: _columns(t, t.shape[1] - 1)), 3, "biases"),
    "biases float16": (_tensor("biases", _retyped("F16")), 3, "biases"),
    "biases missing": (_tensor("biases", lambda t: None), 3, "biases is missing"),
    "weight float32": (_tensor("weight", _retyped("F32")), 3, "weight is F32"),
    "weight one word short": (_tensor("weight", lambda t: _columns(t, t.shape[1] - 1)), 3, O_PROJ),
    "group size 48": (_set(group_size=48), 3, "group_size is 48"),
    "group size 256": (_set(group_size=256), 3, "group_size is 256"),
    "bits 7": (_set(bits=7), 3, "bits is 7"),
    "bits 16": (_set(bits=16), 3, "bits is 16"),
    "bits 0": (_set(bits=0), 3, "bits is 0"),
    "bits -4": (_set(bits=-4), 3, "bits is -4"),
    "bits huge": (_set(bits=2**70), 3, "bits is 1180591620717411303424"),
    "bits a string": (_set(bits="4"), 3, "bits is '4'"),
    "bits true": (_set(bits=True), 3, "bits is True"),
    "group size null": (_set(group_size=None), 3, "group_size is None"),
    "no bits": (_quantization(lambda q: {k: v for k, v in q.items() if k != "bits"}), 3, "has no bits"),
    "not an object": (_config(quantization=[{"bits": 4}]), 3, "quantization is list, not an object"),
    "a string": (_config(quantization="affine"), 3, "quantization is str, not an object"),
    "quantization_config not an object": (_quantization(lambda q: [q]), 3, "is not of type 'object'"),
    "nested junk": (_set(junk={"a": {"b": []}}), 3, "'a'"),
    "an entry of the wrong type": (_set(**{O_PROJ: "8bit"}), 3, "neither a layer's settings"),
    "a layer entry with a string": (_set(**{O_PROJ: {"bits": "8"}}), 3, f"{O_PROJ}.bits is '8'"),
    "a layer entry contradicting the stored layer": (_set(**{O_PROJ: {"bits": 8, "group_size": 32}}), 3, O_PROJ),
    "a layer entry naming no module": (
        _set(**{"model.layers.9.self_attn.o_proj": {"bits": 4, "group_size": 32}}),
        3,
        "model.layers.9.self_attn.o_proj, a layer the checkpoint does not hold",
    ),
    "o_proj set false but stored quantized": (_set(**{O_PROJ: False}), 3, "sets it false"),
    "an unknown mode": (_set(mode="int4"), 3, "mode is 'int4'"),
    "a layer in an unknown mode": (_set(**{O_PROJ: {"mode": "weird"}}), 3, "mode is 'weird'"),
    "activation quantization": (
        _set(**{O_PROJ: {"bits": 4, "group_size": 32, "quantize_input": True}}),
        4,
        "quantize_input",
    ),
    "quantize_activations": (_config(quantize_activations=True), 4, "quantize_activations"),
    "quantization_config differs": (_config(quantization_config={"group_size": 64, "bits": 4}), 3, "differ"),
    "a stray model*.safetensors": (_stray, 3, "model-extra.safetensors"),
}
REFUSED.update(
    {f"mode {mode}": (_set(mode=mode), 4, f"mode {mode!r}") for mode in MLX_OTHER_MODES}
    | {f"layer mode {mode}": (_set(**{O_PROJ: {"mode": mode}}), 4, f"mode {mode!r}") for mode in MLX_OTHER_MODES}
)


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_mlx_input_is_refused_before_anything_is_written(quantized, sources, tmp_path, capsys, case):
    change, exit_code, named = REFUSED[case]
    folder = tmp_path / "src"
    shutil.copytree(quantized("llama", 4, 32), folder)
    change(folder)
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(sources["llama"], n_heads=8, seed=2), lock)
    before = tree_hashes(folder)
    code, _, err = run_cli(
        capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"), "--no-loader-check"
    )
    assert code == exit_code, err
    assert named in err and "hint:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert tree_hashes(folder) == before
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--in-place", "--no-loader-check")
    assert code in (3, 4, 5) and "hint:" in err and tree_hashes(folder) == before, err  # 5: refused as an output


def test_qwen2_rope_theta_as_mlx_lm_reads_it(sources, tmp_path, capsys):
    """mlx-lm reads only a top-level rope_theta, defaulting to 1e6 in its Qwen2 class and 1e4 in the Llama class
    weightlock declares Qwen2 as, and it is the only engine that loads an MLX folder: the model is what it serves.
    A theta under transformers 5's rope_parameters only that equals mlx-lm's default is written at the top of the
    output (served the same); one that differs, or none at all, is refused: the locked model would rotate
    otherwise than mlx-lm serves the source."""
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(sources["qwen2"], n_heads=2), lock)
    for case, nested in (("default", 1e6), ("other", 1e4), ("none", None)):
        folder = quantize_with_mlx(sources["qwen2"], tmp_path / f"q-{case}", 4, 32)
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_theta", None)
        config.pop("rope_parameters", None)
        if nested is not None:
            config["rope_parameters"] = {"rope_theta": nested, "rope_type": "default"}
        (folder / "config.json").write_text(json.dumps(config))
        out = tmp_path / f"out-{case}"
        code, _, err = run_cli(
            capsys, "apply", str(folder), "--lock", str(lock), "--out", str(out), "--no-loader-check"
        )
        if case == "default":
            assert code == 0, err
            assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6
        else:
            assert code == 4 and "rope_theta" in err and "hint:" in err, (case, err)
            assert not out.exists()


def test_mixtral_quantized_by_mlx_is_refused(tmp_path, capsys):
    """Mixtral's redeclaration stacks its experts' weights, which weightlock does for float tensors only."""
    require_mlx()
    source = make_model(tmp_path / "mixtral", "mixtral", **SHAPE)
    folder = quantize_with_mlx(source, tmp_path / "q", 4, 32)
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(source, n_heads=2), lock)
    code, _, err = run_cli(
        capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"), "--no-loader-check"
    )
    assert code == 4 and "quantized mixtral checkpoints are not proven" in err, err
