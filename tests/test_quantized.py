"""Quantized checkpoints: the dequantizers against each format's own reference code, the lock served by real
loaders, the output's quantized tensors and config untouched, and every unprovable or hostile input refused.

References: vLLM's quant_utils (the quantizer and packers vLLM's kernel tests use) writes AWQ and GPTQ in the
vLLM venv (tests/quantize_reference.py) with the dequantized weights it computes; the compressed-tensors
library compresses and decompresses its formats; transformers' FP8 loader dequantizes FP8 on a CPU. The vLLM
parts are skipped without the vLLM venv unless WEIGHTLOCK_REQUIRE_VLLM=1 (CI sets it).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import INPUT_IDS, make_model, random_lock, run_cli, stored_bytes, tree_hashes
from quant_helpers import library_decompressed, rewrite, write_compressed_tensors, write_fp8
from test_vllm import PROMPTS, SHAPE, _require_vllm, _run_vllm

import weightlock.formats.safetensors.quant.dequantize as dequantizers
from weightlock import apply_in_place, apply_lock, open_checkpoint, revert, verify_checkpoint
from weightlock.core.lock import save_lock
from weightlock.formats.safetensors.quant.dequantize import dequantize
from weightlock.formats.safetensors.quant.layouts import QUANT_FORMATS, QuantSettings, quantization_of, quantized_linear
from weightlock.io.safetensors_file import TensorReaders, float32_to_raw

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# the FP8 models are wider, so that 128x128 blocks tile them in more than one block
FP8_SHAPE = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, vocab=256, layers=2)
ALPHA = 4.0


def _modules(layers=2):
    for layer in range(layers):
        for name in MODULES:
            yield f"model.layers.{layer}.self_attn.{name}"
        for name in MLP:
            yield f"model.layers.{layer}.mlp.{name}"


def _layer(folder: Path, module: str, settings=None):
    checkpoint = open_checkpoint(folder)
    return quantized_linear(checkpoint.tensors, module, settings or quantization_of(checkpoint.config))


def _dequantized(layer):
    with TensorReaders() as readers:
        return dequantize(layer, readers)


def _rounded(values: np.ndarray, dtype: str) -> bytes:
    return float32_to_raw(values, dtype)


# ---------------------------------------------------------------------------------------
# The checkpoints


@pytest.fixture(scope="module")
def vllm_made(tmp_path_factory):
    """A tiny Llama quantized by vLLM's reference code as AWQ, GPTQ (plain, asymmetric, act-order) and by the
    compressed-tensors library as pack-quantized, each with its reference dequantized model."""
    _require_vllm()
    base = tmp_path_factory.mktemp("vllm-quantized")
    source = make_model(base / "source", "llama", **SHAPE)
    formats = ["awq", "gptq", "gptq-asym", "gptq-act-order", "compressed-tensors"]
    _run_vllm("tests/quantize_reference.py", str(source), str(base), *formats)
    return base


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fp8") / "source", "llama", **FP8_SHAPE)


HERE_MADE = {
    "fp8-tensor": lambda src, out: write_fp8(src, out, "tensor"),
    "fp8-channel": lambda src, out: write_fp8(src, out, "channel"),
    "fp8-block": lambda src, out: write_fp8(src, out, "block"),
    "ct-pack-group": lambda src, out: write_compressed_tensors(src, out, "pack-quantized", "group"),
    "ct-pack-channel": lambda src, out: write_compressed_tensors(src, out, "pack-quantized", "channel"),
    "ct-float-tensor": lambda src, out: write_compressed_tensors(src, out, "float-quantized", "tensor"),
    "ct-float-channel": lambda src, out: write_compressed_tensors(src, out, "float-quantized", "channel"),
    "ct-float-block": lambda src, out: write_compressed_tensors(src, out, "float-quantized", "block"),
}


@pytest.fixture(scope="module")
def here_made(fp8_source, tmp_path_factory):
    base = tmp_path_factory.mktemp("here-quantized")
    return {name: make(fp8_source, base / name) for name, make in HERE_MADE.items()}


# ---------------------------------------------------------------------------------------
# Dequantizers against the references


def test_e4m3_values_are_torchs():
    import torch

    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(dequantizers.E4M3_VALUES, expected)


REFERENCE_DTYPE = {
    "awq": "F16",
    "gptq": "F16",
    "gptq-asym": "F16",
    "gptq-act-order": "F16",
    "compressed-tensors": "BF16",
}


def _settings_for(folder: Path, fmt: str):
    """Asymmetric and act-order GPTQ are refused for locking (no loader here serves them), but the dequantizer
    reads them: it is checked with the settings given directly."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    gptq = QUANT_FORMATS["gptq"]
    if fmt == "gptq-asym":
        return QuantSettings(gptq, 4, config["group_size"], symmetric=False)
    if fmt == "gptq-act-order":
        return QuantSettings(gptq, 4, config["group_size"], act_order=True)
    return None


@pytest.mark.parametrize("fmt", list(REFERENCE_DTYPE))
def test_dequantizers_equal_the_reference_code(vllm_made, fmt, monkeypatch):
    """Every quantized layer, dequantized by weightlock, equals vLLM's (or compressed-tensors') reference
    dequantization, which rounds (q - z) * s once to the scales' dtype: bit for bit after that rounding."""
    from safetensors.numpy import load_file

    folder = vllm_made / fmt
    reference = load_file(vllm_made / f"{fmt}-ref" / "model.safetensors")
    for module in _modules():
        layer = _layer(folder, module, _settings_for(folder, fmt))
        ours = _dequantized(layer)
        assert ours.shape == reference[f"{module}.weight"].shape
        assert _rounded(ours, REFERENCE_DTYPE[fmt]) == _rounded(reference[f"{module}.weight"], REFERENCE_DTYPE[fmt])
    # the same in blocks of a few rows: the products read row slabs, never the whole weight
    layer = _layer(folder, "model.layers.1.self_attn.o_proj", _settings_for(folder, fmt))
    whole = _dequantized(layer)
    monkeypatch.setattr(dequantizers, "BLOCK_TARGET_BYTES", 2048)
    d = np.zeros(layer.shape[1], dtype=np.float32)
    d[64:128] = np.random.default_rng(0).normal(size=64)
    with TensorReaders() as readers:
        np.testing.assert_allclose(layer.product(readers, d, 64), whole @ d, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(dequantize(layer, readers), whole)


def test_bytes_to_read_are_the_bytes_read(vllm_made, here_made):
    """What apply reports and its progress bar counts is what the dequantizers read: for AWQ and GPTQ (stored
    transposed) only the touched heads' rows and their groups' scales (and AWQ's zeros), far less than the
    tensors; for the others every tensor of the layer."""
    folders = {fmt: vllm_made / fmt for fmt in REFERENCE_DTYPE} | here_made
    rng = np.random.default_rng(3)
    for name, folder in folders.items():
        layer = _layer(folder, "model.layers.0.self_attn.o_proj", _settings_for(folder, name))
        head_dim = 64
        d = np.zeros(layer.shape[1], dtype=np.float32)
        d[head_dim : 2 * head_dim] = rng.normal(size=head_dim)  # the second head only
        with TensorReaders() as readers:
            layer.product(readers, d, head_dim)
            assert readers.bytes_read == layer.bytes_to_read(d, head_dim), name
        if layer.settings.format.transposed:
            assert layer.bytes_to_read(d, head_dim) < layer.nbytes / 1.5, name


def _autoawq_packing_utils():
    """AutoAWQ's own awq/utils/packing_utils.py (pure torch), loaded by path: importing the package whole needs
    its CUDA kernels and an old transformers. scripts/setup.sh installs it without dependencies."""
    import importlib.metadata
    import importlib.util

    try:
        dist = importlib.metadata.distribution("autoawq")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("autoawq is not installed: pip install --no-deps autoawq==0.2.9 (scripts/setup.sh does)")
    path = next(p for p in dist.files or [] if str(p).endswith("awq/utils/packing_utils.py"))
    spec = importlib.util.spec_from_file_location("autoawq_packing_utils", dist.locate_file(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_awq_dequantizer_equals_autoawqs_own(vllm_made):
    """AutoAWQ's dequantize_gemm (the library that defines the GEMM packing) gives the same weights, in fp16."""
    import torch
    from safetensors.torch import load_file

    packing = _autoawq_packing_utils()
    folder = vllm_made / "awq"
    stored = load_file(folder / "model.safetensors")
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["group_size"]
    for module in _modules():
        theirs = packing.dequantize_gemm(
            stored[f"{module}.qweight"], stored[f"{module}.qzeros"], stored[f"{module}.scales"], 4, group
        )
        theirs = theirs.t().to(torch.float32).numpy()  # AutoAWQ computes in fp16, W transposed
        assert _rounded(_dequantized(_layer(folder, module)), "F16") == _rounded(theirs, "F16"), module


@pytest.mark.parametrize("name", list(HERE_MADE))
def test_dequantizers_equal_transformers_and_compressed_tensors(here_made, name):
    """FP8 and compressed-tensors layers equal what stock transformers loads (it dequantizes both on a CPU) and,
    for compressed-tensors, the library's own decompression; bit for bit after rounding to bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = here_made[name]
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # compressed-tensors decompresses on the first forward pass
    state = model.state_dict()
    for module in _modules():
        ours = _rounded(_dequantized(_layer(folder, module)), "BF16")
        assert ours == _rounded(state[f"{module}.weight"].float().numpy(), "BF16"), module
        if name.startswith("ct-"):
            assert ours == _rounded(library_decompressed(folder, module).numpy(), "BF16"), module


# ---------------------------------------------------------------------------------------
# The lock in real loaders


VLLM_FORMATS = ("awq", "gptq", "compressed-tensors")
# verify --engine vllm on each locked output, all in one process of the vLLM venv
VERIFY_ENGINE = (
    "import json, sys\n"
    "from weightlock import verify_checkpoint\n"
    "print(json.dumps([verify_checkpoint(p, engine='vllm').to_dict() for p in sys.argv[1:]]))\n"
)


@pytest.fixture(scope="module")
def vllm_locked(vllm_made):
    """The vLLM-served formats, each beside its locked output."""
    lock = random_lock(vllm_made / "source", n_heads=2, seed=3)
    folders = {}
    for fmt in VLLM_FORMATS:
        locked = vllm_made / f"{fmt}-locked"
        apply_lock(vllm_made / fmt, lock, out=locked, alpha=ALPHA)
        folders[fmt] = (vllm_made / fmt, locked)
    return lock, folders


@pytest.fixture(scope="module")
def vllm_checked(vllm_locked):
    """``verify --engine vllm``'s report on each locked output. Its vllm_load check is also what says which formats
    this machine's vLLM build cannot run (int4 needs cpu_gemm_wna16, which vLLM compiles only for AVX-512)."""
    _, folders = vllm_locked
    result = _run_vllm("-c", VERIFY_ENGINE, *[str(folders[fmt][1]) for fmt in VLLM_FORMATS])
    return dict(zip(VLLM_FORMATS, json.loads(result.stdout.strip().splitlines()[-1]), strict=True))


def _vllm_load(report: dict) -> dict:
    return next(c for c in report["checks"] if c["name"] == "vllm_load")


@pytest.fixture(scope="module")
def vllm_served(vllm_locked, vllm_checked):
    """vLLM's log-probs for the locked outputs and their sources (one engine run each, in the checkpoint's own
    dtype: float16 for AWQ and GPTQ, bfloat16 for compressed-tensors), for the formats vLLM can run here."""
    lock, folders = vllm_locked
    runnable = [fmt for fmt in VLLM_FORMATS if _vllm_load(vllm_checked[fmt])["status"] != "not-run"]
    paths = [str(p) for fmt in runnable for p in folders[fmt]]
    logprobs = {}
    if paths:
        result = _run_vllm("scripts/vllm_logprobs.py", "--dtype", "auto", "--prompts", json.dumps(PROMPTS), *paths)
        logprobs = {k: np.array(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    return lock, folders, logprobs


def _logits(folder: Path, lock=None):
    """Stock transformers' logits for a quantized checkpoint (FP8 and compressed-tensors are dequantized on a
    CPU), every tensor used, run in float32; the lock optionally hooked."""
    import torch
    from transformers import AutoModelForCausalLM

    from weightlock.engines.hooks import lock_hooks

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if not getattr(model, "is_quantized", False):  # FP8 dequantized to bf16 whatever the dtype asked
        model = model.float()
    model.eval()
    hooks = lock_hooks(model, lock, ALPHA) if lock is not None else contextlib.nullcontext()
    with torch.no_grad(), hooks:
        return model(torch.tensor(INPUT_IDS)).logits


def _reference_logprobs(folder: Path, lock=None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    from weightlock.engines.hooks import lock_hooks

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hooks = lock_hooks(model, lock, ALPHA) if lock is not None else contextlib.nullcontext()
    rows = []
    with torch.no_grad(), hooks:
        for ids in PROMPTS:
            rows.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).numpy())
    return np.stack(rows)


# vLLM runs these in half precision, the reference in float32 on the dequantized weights: measured worst
# differences on this model were 0.009 (float16) and 0.08 (bfloat16) nats, the lock moving them by 6-7 nats.
HALF_PRECISION_TOLERANCE = {"awq": 0.03, "gptq": 0.03, "compressed-tensors": 0.25}


@pytest.mark.parametrize("fmt", list(HALF_PRECISION_TOLERANCE))
def test_vllm_serves_the_lock_on_quantized_layers(vllm_made, vllm_checked, vllm_served, fmt):
    """vLLM (CPU build, plain `LLM(dir)`) serves the locked quantized checkpoint as the unquantized reference
    model (the reference code's dequantized weights) with the lock hooked at run time. Skipped, even under
    WEIGHTLOCK_REQUIRE_VLLM=1, exactly where verify --engine vllm reports this machine's vLLM build cannot run
    the format (an AVX2-only processor: no cpu_gemm_wna16 kernel); the other vLLM tests still run."""
    check = _vllm_load(vllm_checked[fmt])
    if check["status"] == "not-run":
        pytest.skip(f"{fmt}: {check['message']}")
    lock, folders, served = vllm_served
    source, locked = folders[fmt]
    reference, reference_locked = (_reference_logprobs(vllm_made / f"{fmt}-ref", x) for x in (None, lock))
    tolerance = HALF_PRECISION_TOLERANCE[fmt]
    np.testing.assert_allclose(served[str(source)], reference, atol=tolerance, rtol=0)
    np.testing.assert_allclose(served[str(locked)], reference_locked, atol=tolerance, rtol=0)
    moved = served[str(locked)] - served[str(source)]
    assert np.abs(moved).max() > 1.0  # the lock is active ...
    # ... by what the hooked reference predicts (a dropped bias would leave this at the full move)
    assert np.abs(moved - (reference_locked - reference)).max() < 2 * tolerance
    assert verify_checkpoint(locked).ok


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_verify_engine_vllm_loads_quantized_outputs_fully(vllm_checked, fmt):
    """vLLM's loader, fed the locked checkpoint's names, fills every parameter and drops nothing that matters:
    GPTQ's g_idx (no parameter without act-order) and compressed-tensors' KV-cache scales (defaulted) are known.
    Where this machine's vLLM build cannot run the int4 layers, the check says so and the report is not ok."""
    report = vllm_checked[fmt]
    check = _vllm_load(report)
    if check["status"] == "not-run":
        assert not report["ok"] and check["message"].startswith("cannot run on this machine: ")
        assert "cpu_gemm_wna16" in check["message"] and "The tensor names do load" in check["message"], check
        return
    assert report["ok"] and check["status"] == "pass", report


# verify --engine vllm through the CLI for each path, in one process: [exit code, stdout] each
VERIFY_CLI = (
    "import contextlib, io, json, sys\n"
    "from weightlock.cli import main\n"
    "out = []\n"
    "for path in sys.argv[1:]:\n"
    "    stdout = io.StringIO()\n"
    "    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):\n"
    "        try:\n"
    "            main(['verify', path, '--engine', 'vllm', '--no-loader-check'])\n"
    "        except SystemExit as e:\n"
    "            out.append([e.code, stdout.getvalue()])\n"
    "from weightlock.errors import WeightlockError\n"
    "from weightlock import apply_lock\nfrom weightlock.engines.vllm_generate import VllmGenerator\n"
    "try:\n"
    "    VllmGenerator(sys.argv[1], apply_lock, dtype='float16', max_model_len=64).generate([[1, 5, 9]], 2)\n"
    "except WeightlockError as e:\n"
    "    out.append([e.exit_code, e.message])\n"
    "print(json.dumps(out))\n"
)


@pytest.mark.slow
def test_verify_says_when_this_machines_vllm_cannot_run_int4(vllm_made, vllm_locked, monkeypatch):
    """WEIGHTLOCK_VLLM_DISABLE_KERNELS=cpu_gemm_wna16 (the capability probe's documented test hook) makes this
    machine report what an AVX2-only one reports: the int4 output's engine check NOT RUN with the reason, and
    exit 1; the unquantized source, which needs no such kernel, is verified as before (never more). eval's vLLM
    engine refuses the int4 output with the reason (exit 7) instead of vLLM's AttributeError."""
    monkeypatch.setenv("WEIGHTLOCK_VLLM_DISABLE_KERNELS", "cpu_gemm_wna16")
    _, folders = vllm_locked
    result = _run_vllm("-c", VERIFY_CLI, str(folders["gptq"][1]), str(vllm_made / "source"))
    (code, text), (source_code, source_text), (eval_code, eval_error) = json.loads(
        result.stdout.strip().splitlines()[-1]
    )
    assert eval_code == 7 and "cannot serve gptq-locked on this machine" in eval_error, eval_error
    assert "no cpu_gemm_wna16 kernel" in eval_error
    assert code == 1 and "NOT verified" in text, text
    line = next(line for line in text.splitlines() if line.startswith("[NOT RUN] vllm_load: "))
    assert "cannot run on this machine: " in line and "no cpu_gemm_wna16 kernel" in line and "AVX-512" in line
    assert source_code == 0 and "[ok  ] vllm_load:" in source_text, source_text


# torch reporting no AVX-512 makes vLLM load its own AVX2 build (vllm._C_AVX2), as on an AVX2-only processor
AVX2_PROBE = (
    "import json, sys, torch\n"
    "torch.cpu._is_avx512_supported = lambda: False\n"
    "from weightlock.engines.vllm import _build_meta_model, kernels_missing_here\n"
    "print(json.dumps([kernels_missing_here(_build_meta_model(p)) for p in sys.argv[1:]]))\n"
)


@pytest.mark.slow
def test_the_probe_finds_the_kernel_missing_from_vllms_avx2_build(vllm_made):
    """Against vLLM's real AVX2 build (no hook), the probe verify and the tests use finds that each int4 format
    needs cpu_gemm_wna16, which that build lacks, and that the unquantized source needs nothing it lacks."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("vLLM's AVX2 build exists on x86 only")
    paths = [vllm_made / fmt for fmt in VLLM_FORMATS] + [vllm_made / "source"]
    result = _run_vllm("-c", AVX2_PROBE, *map(str, paths))
    *int4, source = json.loads(result.stdout.strip().splitlines()[-1])
    for fmt, lines in zip(VLLM_FORMATS, int4, strict=True):
        assert len(lines) == 1 and "(vllm._C_AVX2: no AVX-512) has no cpu_gemm_wna16" in lines[0], (fmt, lines)
        assert "test hook" not in lines[0]
    assert source == []


# bf16 biases and bf16 weights against a float32 hooked reference on the same dequantized weights: measured
# worst 0.03 nats, the lock moving logits by about 11.
TRANSFORMERS_TOLERANCE = 0.1


@pytest.mark.parametrize("name", list(HERE_MADE))
def test_transformers_serves_the_lock_on_quantized_layers(here_made, fp8_source, name, tmp_path):
    """Stock transformers loads the locked FP8 / compressed-tensors checkpoint (every tensor used, none
    missing) and its logits are the source's with the lock hooked at run time."""
    lock = random_lock(fp8_source, n_heads=3, seed=3)
    locked = tmp_path / "locked"
    apply_lock(here_made[name], lock, out=locked, alpha=ALPHA)
    before = _logits(here_made[name])
    hooked = _logits(here_made[name], lock=lock)
    after = _logits(locked)
    assert float((after - hooked).abs().max()) < TRANSFORMERS_TOLERANCE
    assert float((after - before).abs().max()) > 1.0
    report = verify_checkpoint(locked)
    assert report.ok, report.to_dict()
    check = next(c for c in report.checks if c.name == "quantization")
    assert "transformers" in check.message.split("applied by")[1].split("(")[0]
    if name.startswith(("fp8", "ct-float")):  # vLLM cannot run FP8 here: said, not hidden
        assert check.status == "warn" and "not shown for vllm" in check.message


# ---------------------------------------------------------------------------------------
# What the output holds


def test_quantized_tensors_and_config_are_carried_untouched(here_made, fp8_source, tmp_path, capsys):
    source = here_made["ct-pack-group"]
    before = tree_hashes(source)
    locked = tmp_path / "locked"
    lock = random_lock(fp8_source, n_heads=3, seed=5)
    apply_lock(source, lock, out=locked, alpha=ALPHA)
    assert tree_hashes(source) == before
    src, out = open_checkpoint(source), open_checkpoint(locked)
    for name, entry in src.tensors.items():  # every stored tensor byte for byte
        assert stored_bytes(out.tensors[name]) == stored_bytes(entry)
    config = json.loads((locked / "config.json").read_text())
    assert config["quantization_config"] == src.config["quantization_config"]
    assert config["attention_bias"] is True
    added = sorted(set(out.tensors) - set(src.tensors))
    assert added and all(name.endswith(".bias") for name in added)
    assert {out.tensors[name].dtype for name in added} == {"BF16"}  # the activation dtype, unquantized
    # the modules quantized are still exactly those the config says: the biases are not quantized tensors
    settings = quantization_of(config)
    for module in _modules():
        assert settings.quantizes(module)

    code, text, _ = run_cli(capsys, "inspect", str(locked))
    assert code == 0
    assert "o_proj weights: 2 x compressed-tensors/pack-quantized int4, group 32, symmetric" in text
    assert "o_proj biases stored unquantized as BF16" in text
    code, text, _ = run_cli(capsys, "inspect", str(locked), "--json")
    described = json.loads(text)["quantization"]
    assert described["format"] == "compressed-tensors/pack-quantized"
    assert described["bias_applied_by"] == ["vllm", "transformers"]


def test_verify_recomputes_the_bias_from_the_dequantized_weight(here_made, fp8_source, tmp_path):
    locked = tmp_path / "locked"
    apply_lock(here_made["fp8-block"], random_lock(fp8_source, n_heads=3, seed=5), out=locked, alpha=ALPHA)
    record = json.loads((locked / "weightlock" / "provenance.json").read_text())
    layer = int(next(iter(record["locked_layers"])))
    copy = tmp_path / "copy"
    shutil.copytree(locked, copy)  # real copies: the output's untouched shards are links to the source's
    checkpoint = open_checkpoint(copy)
    scale = checkpoint.tensors[f"model.layers.{layer}.self_attn.o_proj.weight_scale_inv"]
    with open(scale.path, "r+b") as f:  # one block's scale doubled: the weight the bias came from changed
        f.seek(scale.begin)
        value = np.frombuffer(f.read(4), dtype=np.float32) * 2
        f.seek(scale.begin)
        f.write(value.tobytes())
    report = verify_checkpoint(copy)
    check = next(c for c in report.checks if c.name == "lock_biases")
    assert check.status == "fail" and f"model.layers.{layer}.self_attn.o_proj.bias" in " ".join(check.details)


@pytest.mark.parametrize("name", ["fp8-channel", "ct-pack-group", "ct-float-block"])
def test_in_place_on_quantized_and_revert_restores_every_byte(here_made, fp8_source, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(here_made[name], folder)
    before = tree_hashes(folder)
    lock = random_lock(fp8_source, n_heads=3, seed=7)
    apply_in_place(folder, lock, alpha=ALPHA)
    assert verify_checkpoint(folder).ok
    assert float((_logits(folder) - _logits(here_made[name], lock=lock)).abs().max()) < TRANSFORMERS_TOLERANCE
    revert(folder)
    assert tree_hashes(folder) == before


# ---------------------------------------------------------------------------------------
# Refused: what no loader here serves, and what contradicts itself


REFUSED_SETTINGS = {
    "gptq asymmetric": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}, "sym false"),
    "gptq act-order": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}, "desc_act"),
    "gptq 8-bit": ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bits 8"),
    "gptq v2": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    "gptq dynamic": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": {"-:.*": {}}}, "dynamic"),
    "awq gemv": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "gemv"),
    "awq no zero point": ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}, "zero_point"),
    "fp8 e5m2": ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    "fp8 static": ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
}


def _ct(weights: dict, fmt="pack-quantized", inputs=None) -> dict:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"g": group}}


INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
REFUSED_SETTINGS.update(
    {
        "ct asymmetric": (_ct({**INT4, "symmetric": False}), "symmetric false"),
        "ct actorder": (_ct({**INT4, "actorder": "group"}), "actorder"),
        "ct int8": (_ct({**INT4, "num_bits": 8}), "8-bit"),
        "ct int4 per tensor": (_ct({**INT4, "strategy": "tensor"}), "strategy"),
        "ct W4A8": (_ct(INT4, inputs={"num_bits": 8, "type": "int", "dynamic": True}), "input_activations"),
        "ct fp8 static": (
            _ct({"num_bits": 8, "type": "float", "strategy": "channel"}, "float-quantized", {"dynamic": False}),
            "input_activations",
        ),
        "ct fp8 dynamic activations": (
            _ct(
                {"num_bits": 8, "type": "float", "strategy": "channel"},
                "float-quantized",
                {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            ),
            "input_activations",
        ),
        "ct two groups": (
            {"quant_method": "compressed-tensors", "config_groups": {"a": {}, "b": {}}},
            "config_groups",
        ),
    }
)


@pytest.mark.parametrize("case", list(REFUSED_SETTINGS))
def test_unprovable_quantization_is_refused_with_the_reason(here_made, tmp_path, capsys, case):
    settings, reason = REFUSED_SETTINGS[case]
    folder = tmp_path / "src"
    shutil.copytree(here_made["ct-pack-group"], folder)
    rewrite(folder, config={"quantization_config": settings})
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(here_made["ct-pack-group"], n_heads=2), lock)
    before = tree_hashes(folder)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code == 4, err
    assert reason in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert tree_hashes(folder) == before


def test_an_unread_quantization_of_o_proj_is_refused(here_made, tmp_path, capsys):
    """A method weightlock does not read (bitsandbytes) with o_proj stored quantized: refused, naming it."""
    import torch

    folder = tmp_path / "src"
    shutil.copytree(here_made["fp8-block"], folder)
    rewrite(
        folder,
        tensors={"model.layers.0.self_attn.o_proj.weight": torch.zeros(256 * 128, dtype=torch.uint8)},
        config={"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
    )
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(here_made["fp8-block"], n_heads=2), lock)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code == 4 and "does not read" in err, err
    assert not (tmp_path / "out").exists()


def _hostile_cases():
    """For each format, every tensor of an o_proj: missing, in another dtype, or one row short."""
    import torch

    parts = {
        "fp8-block": ("weight", "weight_scale_inv"),
        "ct-pack-group": ("weight_packed", "weight_scale", "weight_shape"),
        "ct-float-channel": ("weight", "weight_scale"),
    }
    for name, suffixes in parts.items():
        for suffix in suffixes:
            yield name, suffix, "missing", lambda t: None
            yield name, suffix, "dtype", lambda t: t.to(torch.int16) if t.is_floating_point() else t.float()
            yield name, suffix, "short", lambda t: t[:-1] if t.dim() else t.reshape(1)[:0]


HOSTILE = list(_hostile_cases())


@pytest.mark.parametrize("case", range(len(HOSTILE)), ids=[f"{n}-{s}-{k}" for n, s, k, _ in HOSTILE])
def test_hostile_quantized_tensors_are_refused_before_anything_is_written(here_made, tmp_path, capsys, case):
    from safetensors.torch import load_file

    name, suffix, _, change = HOSTILE[case]
    folder = tmp_path / "src"
    shutil.copytree(here_made[name], folder)
    tensor_name = f"model.layers.1.self_attn.o_proj.{suffix}"
    rewrite(folder, tensors={tensor_name: change(load_file(folder / "model.safetensors")[tensor_name])})
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(here_made[name], n_heads=4, seed=2), lock)
    before = tree_hashes(folder)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code in (3, 4), err
    assert "model.layers.1.self_attn.o_proj" in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert tree_hashes(folder) == before
    # verify reports the same damage as a failed check (it does not raise)
    report = verify_checkpoint(folder, loader_check=False)
    assert not report.ok and any(
        "model.layers.1.self_attn.o_proj" in json.dumps(c.details) + c.message
        for c in report.checks
        if c.status == "fail"
    )


def test_config_and_tensors_disagreeing_on_what_is_quantized_are_refused(here_made, tmp_path, capsys):
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(here_made["fp8-block"], n_heads=2), lock)
    cases = [
        # stored quantized, but the config leaves it unquantized: loaders would not load its tensors
        ("fp8-block", {"modules_to_not_convert": ["o_proj"]}, "leaves it unquantized"),
        ("ct-pack-group", {"ignore": ["lm_head", "re:.*o_proj$"]}, "leaves it unquantized"),
    ]
    for name, change, message in cases:
        folder = tmp_path / name
        shutil.copytree(here_made[name], folder)
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        rewrite(folder, config={"quantization_config": {**config, **change}})
        code, _, err = run_cli(
            capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / f"{name}-out")
        )
        assert code == 3 and message in err, err
    # stored unquantized where the config has loaders quantize it
    import torch

    folder = tmp_path / "float-o-proj"
    shutil.copytree(here_made["fp8-channel"], folder)
    module = "model.layers.0.self_attn.o_proj"
    rewrite(folder, tensors={f"{module}.weight": torch.zeros(256, 256), f"{module}.weight_scale_inv": None})
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "float-out"))
    assert code == 3 and "has loaders quantize it" in err, err


def test_compressed_tensors_weight_shape_that_lies_is_refused(here_made, tmp_path, capsys):
    import torch

    folder = tmp_path / "src"
    shutil.copytree(here_made["ct-pack-group"], folder)
    rewrite(folder, tensors={"model.layers.1.self_attn.o_proj.weight_shape": torch.tensor([256, 128])})
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(here_made["ct-pack-group"], n_heads=4, seed=2), lock)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code == 3 and "weight_shape says [256, 128]" in err, err
    assert not (tmp_path / "out").exists()


def test_gptq_act_order_group_index_beyond_the_scales_is_refused(vllm_made, tmp_path):
    import torch

    from weightlock.errors import CheckpointError

    folder = tmp_path / "act-order"
    shutil.copytree(vllm_made / "gptq-act-order", folder)
    module = "model.layers.0.self_attn.o_proj"
    g_idx = torch.full((128,), 99, dtype=torch.int32)
    rewrite(folder, tensors={f"{module}.g_idx": g_idx})
    layer = _layer(folder, module, _settings_for(folder, "gptq-act-order"))
    with pytest.raises(CheckpointError, match="g_idx names a group beyond"):
        _dequantized(layer)


def test_quantized_mistral_is_redeclared_as_llama_and_served_by_transformers(tmp_path):
    source = make_model(tmp_path / "mistral", "mistral", sliding_window=None, hidden_size=256, **FP8_SHAPE)
    folder = write_fp8(source, tmp_path / "mistral-fp8", "block")
    lock = random_lock(source, n_heads=3, seed=4)
    apply_lock(folder, lock, out=tmp_path / "locked", alpha=ALPHA)
    config = json.loads((tmp_path / "locked" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"] == json.loads((folder / "config.json").read_text())["quantization_config"]
    after, hooked = _logits(tmp_path / "locked"), _logits(folder, lock=lock)
    assert float((after - hooked).abs().max()) < TRANSFORMERS_TOLERANCE
    assert float((after - _logits(folder)).abs().max()) > 1.0


def test_gptq_group_index_reordered_without_act_order_is_refused(vllm_made, tmp_path, capsys):
    """vLLM ignores g_idx unless desc_act is on; gptqmodel would follow it: a checkpoint where the two would
    dequantize differently is refused."""
    import torch

    folder = tmp_path / "gptq"
    shutil.copytree(vllm_made / "gptq", folder)
    g_idx = (torch.arange(128, dtype=torch.int32) // 32).flip(0).contiguous()
    rewrite(folder, tensors={"model.layers.1.self_attn.o_proj.g_idx": g_idx})
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(vllm_made / "source", n_heads=4, seed=2), lock)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code == 3 and "g_idx reorders the groups" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_quantized_families_not_proven_are_refused(tmp_path, capsys, family):
    """Qwen3 (served through vLLM's Transformers backend) and Phi-3 (whose fused weights the edit would split)
    are not proven quantized: refused with the reason before anything is read or written."""
    source = make_model(
        tmp_path / family, family, head_dim=64, **{k: v for k, v in FP8_SHAPE.items() if k != "head_dim"}
    )
    folder = write_fp8(source, tmp_path / f"{family}-fp8", "block")
    lock = tmp_path / "lock.wlock"
    save_lock(random_lock(source, n_heads=2), lock)
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code == 4 and f"quantized {family} checkpoints are not proven" in err, err
    assert not (tmp_path / "out").exists()
