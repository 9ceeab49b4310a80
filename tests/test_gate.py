"""Gated locks: the gate's arithmetic, the lock format v2, and the gate baked into grown SwiGLU MLPs.

The central test: stock AutoModelForCausalLM on the baked checkpoint equals the source with the gate applied
by hooks (engines/hooks.py gate_hooks), in float32 and bfloat16, for Llama, Mistral and Qwen2, and the gate is
open at some positions and shut at others so the comparison proves the gating, not a constant. vLLM serves the
baked output exactly as transformers does (its LlamaMLP with mlp_bias). Tampering with any new or original
part is caught by verify; every input that cannot hold a gate is refused with nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import INPUT_IDS, logits, make_model, random_lock, run_cli, tree_hashes
from gate_helpers import gated_lock

from weightlock import apply_lock, load_lock, save_lock, verify_checkpoint
from weightlock.core.gate import RAMP, Gate, added_neurons, gate_value, silu
from weightlock.errors import LockFormatError, WeightlockError

GATED_FAMILIES = ("llama", "mistral", "qwen2")


def test_the_two_neurons_compute_the_gate():
    rng = np.random.default_rng(0)
    probe = rng.normal(size=16)
    probe /= np.linalg.norm(probe)
    gate = Gate(np.array([0]), probe[None].astype(np.float32), np.array([0.5], np.float32), np.array([2.0], np.float32))
    rows, gate_bias, up_bias = gate.neuron_parameters(0)
    x = rng.normal(size=(200, 16)) * 2
    neurons = silu(x @ rows.T.astype(np.float64) + gate_bias) * up_bias  # what the baked MLP computes
    np.testing.assert_allclose(neurons.sum(1), gate_value(x @ probe, 0.5, 2.0), atol=1e-5)
    values = gate_value(np.array([-50.0, 0.5, 1.25, 2.0, 50.0]), 0.5, 2.0)
    assert abs(values[0]) < 1e-6 and values[-1] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < values[1] < 0.1 and 0.4 < values[2] < 0.6 and 0.9 < values[3] <= 1.0
    assert gate_value(np.linspace(-100, 100, 2001), 0.5, 2.0).min() > -0.036  # silu's dip, divided by RAMP
    assert RAMP == 8.0


@pytest.mark.parametrize("intermediate", [14336, 11008, 8192, 1536, 128, 96, 6, 5, 4])
def test_the_mlp_grows_by_a_block_that_keeps_its_divisors(intermediate):
    added = added_neurons(intermediate)
    assert added >= 2
    for divisor in (2, 4, 8, 16, 32, 64, 128, 256):
        if intermediate % divisor == 0:
            assert (intermediate + added) % divisor == 0, divisor
    assert added <= 256


def test_a_gated_lock_is_format_2_and_a_plain_lock_stays_format_1(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    plain = random_lock(src)
    save_lock(plain, tmp_path / "plain.wlock")
    back = load_lock(tmp_path / "plain.wlock")
    assert back.manifest()["format_version"] == 1 and back.gate is None
    # the same bytes as before gates existed: a v1 reader reads it
    from safetensors import safe_open

    with safe_open(tmp_path / "plain.wlock", "np") as f:
        assert set(f.keys()) == {"layer", "head", "direction", "scale"}

    gated = gated_lock(src)
    save_lock(gated, tmp_path / "gated.wlock")
    loaded = load_lock(tmp_path / "gated.wlock")
    assert loaded.manifest()["format_version"] == 2 and loaded.gate is not None
    np.testing.assert_array_equal(loaded.gate.probes, gated.gate.probes)
    np.testing.assert_array_equal(loaded.gate.layers, gated.gate.layers)
    assert loaded.without_gate().gate is None

    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "gated.wlock"), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["gate"]["layers"] == gated.gate.layers.tolist()


def _rewrite_lock(path, out, *, manifest=None, tensors=None, drop=()):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(path, "np") as f:
        metadata = f.metadata()
    arrays = {k: v for k, v in load_file(path).items() if k not in drop}
    arrays.update(tensors or {})
    if manifest is not None:
        metadata["weightlock"] = json.dumps(manifest(json.loads(metadata["weightlock"])))
    save_file(arrays, out, metadata)


@pytest.mark.parametrize(
    "case",
    [
        "v2-without-gate-tensors",
        "v1-with-gate-tensors",
        "gate-on-other-layers",
        "nan-probe",
        "low-above-high",
        "probe-too-short",
        "gate-count-mismatch",
    ],
)
def test_a_malformed_gated_lock_is_refused(tmp_path, case):
    src = make_model(tmp_path / "src")
    lock = gated_lock(src)
    path = tmp_path / "gated.wlock"
    save_lock(lock, path)
    g = lock.gate
    edits = {
        "v2-without-gate-tensors": dict(drop=("gate_layer", "gate_probe", "gate_low", "gate_high")),
        "v1-with-gate-tensors": dict(
            manifest=lambda m: {k: v for k, v in {**m, "format_version": 1}.items() if k != "gate"}
        ),
        "gate-on-other-layers": dict(tensors={"gate_layer": (g.layers + 100).astype(np.int64)}),
        "nan-probe": dict(tensors={"gate_probe": np.full_like(g.probes, np.nan)}),
        "low-above-high": dict(tensors={"gate_low": g.high + 1}),
        "probe-too-short": dict(tensors={"gate_probe": g.probes[:, :-1].copy()}),
        "gate-count-mismatch": dict(manifest=lambda m: {**m, "gate": {**m["gate"], "num_gates": 99}}),
    }[case]
    bad = tmp_path / "bad.wlock"
    _rewrite_lock(path, bad, **edits)
    with pytest.raises(LockFormatError):
        load_lock(bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", GATED_FAMILIES)
def test_stock_transformers_on_the_baked_gate_equals_the_source_with_the_gate_by_hooks(tmp_path, family, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from weightlock.engines.hooks import gate_hooks

    src = make_model(tmp_path / "src", family, dtype=dtype)
    before = tree_hashes(src)
    lock = gated_lock(src, n_heads=6)
    out = tmp_path / "out"
    result = apply_lock(src, lock, out=out, alpha=3.0)
    assert tree_hashes(src) == before
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True and config["model_type"] == "llama"
    assert config["intermediate_size"] == 128 + added_neurons(128)
    assert result.summary()["gate"]["added_neurons"] == added_neurons(128)

    # the gate is open at some positions and shut at others (else this would prove a constant or nothing)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
    opened: dict = {}
    with torch.no_grad(), gate_hooks(model, lock.gate, lock.displacements(3.0, 4), record=opened):
        model(torch.tensor(INPUT_IDS))
    values = torch.cat([torch.cat(v).flatten() for v in opened.values()])
    assert values.min() < 0.05 and values.max() > 0.95, values

    reference = logits(src, lock=lock, alpha=3.0, dtype=dtype)
    constant = logits(src, lock=lock.without_gate(), alpha=3.0, dtype=dtype)
    unlocked = logits(src, dtype=dtype)
    baked = logits(out, dtype=dtype)  # no missing, unexpected or mismatched keys
    gap = (baked - reference).abs().max().item()
    moved = (reference - unlocked).abs().max().item()
    # float32: summation order only; bfloat16: the model's own rounding, as for the constant lock's test
    tolerance = 1e-4 if dtype == "float32" else 2e-2 * unlocked.abs().max().item()
    assert gap <= tolerance, (gap, tolerance)
    assert moved > 10 * tolerance, "the gate must move the logits well past the tolerance"
    assert (reference - constant).abs().max().item() > 10 * tolerance, "a gate that equals the constant lock"

    report = verify_checkpoint(out, source=src, engines="transformers")
    assert report.ok, report.failures()
    statuses = {c.name: c.status for c in report.checks}
    assert statuses["gate_neurons"] == "pass" and statuses["transformers_names"] == "pass"


@pytest.fixture
def baked(tmp_path):
    src = make_model(tmp_path / "src", shard_kb=40)
    lock = gated_lock(src)
    out = tmp_path / "out"
    apply_lock(src, lock, out=out, alpha=3.0)
    return src, lock, out


def _flip(entry, offset):
    with open(entry.path, "r+b") as f:
        f.seek(entry.begin + offset)
        byte = f.read(1)
        f.seek(entry.begin + offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize(
    "where",
    [
        "new-gate-row",
        "original-gate-row",
        "new-down-column",
        "original-down-column",
        "up-bias",
        "zero-up-row",
        "down-bias",
        "recorded-hash",
    ],
)
def test_verify_catches_any_change_to_the_grown_mlps(baked, where):
    from weightlock import open_checkpoint

    src, lock, out = baked
    checkpoint = open_checkpoint(out)
    t = checkpoint.tensors
    layer = int(lock.gate.layers[0])
    mlp = f"model.layers.{layer}.mlp"
    row = 64 * 4  # one float32 row of the hidden size 64
    width = 128 + added_neurons(128)
    if where == "recorded-hash":
        record_path = out / "weightlock" / "provenance.json"
        record = json.loads(record_path.read_text())
        name = f"{mlp}.up_proj.weight"
        record["gate"]["original_sha256"][name] = "0" * 64
        record_path.write_text(json.dumps(record))
    else:
        entry, offset = {
            "new-gate-row": (t[f"{mlp}.gate_proj.weight"], 128 * row + 4),
            "original-gate-row": (t[f"{mlp}.gate_proj.weight"], 3 * row + 4),
            "new-down-column": (t[f"{mlp}.down_proj.weight"], 5 * width * 4 + 128 * 4 + 1),
            "original-down-column": (t[f"{mlp}.down_proj.weight"], 5 * width * 4 + 7 * 4 + 1),
            "up-bias": (t[f"{mlp}.up_proj.bias"], 128 * 4 + 3),
            "zero-up-row": (t[f"{mlp}.up_proj.weight"], 130 * row + 3),
            "down-bias": (t[f"{mlp}.down_proj.bias"], 3),
        }[where]
        _flip(entry, offset)
    report = verify_checkpoint(out, engines="transformers")
    assert not report.ok
    failed = {c.name for c in report.checks if c.status == "fail"}
    assert failed & {"gate_neurons", "provenance"}, failed


def test_verify_with_another_source_fails(baked, tmp_path):
    src, lock, out = baked
    other = make_model(tmp_path / "other", seed=5, shard_kb=40)
    assert verify_checkpoint(out, source=src, engines="transformers").ok
    report = verify_checkpoint(out, source=other, engines="transformers")
    assert not report.ok


def _nothing_written(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("family", ["gemma", "phi3", "qwen3", "gpt_neox"])
def test_a_family_that_cannot_hold_the_gate_is_refused(tmp_path, family, capsys):
    src = make_model(tmp_path / "src", family)
    lock = gated_lock(src)
    save_lock(lock, tmp_path / "g.wlock")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4, err
    assert "--no-gate" in err and _nothing_written(out)
    # --no-gate bakes its heads as the constant lock, recorded as such
    code, _, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "g.wlock"), "--out", str(out), "--no-gate"
    )
    assert code == 0, err
    report = verify_checkpoint(out, source=src, engines="transformers")  # gpt_neox's own biases: the source
    assert report.ok, report.failures()
    assert load_lock(out / "weightlock" / "lock.wlock").gate is None


def test_no_gate_bakes_exactly_the_constant_lock(tmp_path):
    src = make_model(tmp_path / "src")
    lock = gated_lock(src)
    apply_lock(src, lock, out=tmp_path / "a", alpha=3.0, gate=False)
    apply_lock(src, lock.without_gate(), out=tmp_path / "b", alpha=3.0)
    assert (logits(tmp_path / "a") == logits(tmp_path / "b")).all()


def test_second_gated_apply_relock_quantized_and_in_place_are_refused(baked, tmp_path, capsys):
    src, lock, out = baked
    save_lock(lock, tmp_path / "g.wlock")
    again = tmp_path / "again"
    # a second gated apply on the gated output
    code, _, err = run_cli(capsys, "apply", str(out), "--lock", str(tmp_path / "g.wlock"), "--out", str(again))
    assert code in (3, 4) and _nothing_written(again), err
    # a constant lock on the gated output
    save_lock(lock.without_gate(), tmp_path / "c.wlock")
    code, _, err = run_cli(capsys, "apply", str(out), "--lock", str(tmp_path / "c.wlock"), "--out", str(again))
    assert code == 4 and "gated" in err and _nothing_written(again), err
    # a gated lock on a checkpoint a constant lock was baked into
    constant = tmp_path / "constant"
    apply_lock(src, lock.without_gate(), out=constant)
    code, _, err = run_cli(capsys, "apply", str(constant), "--lock", str(tmp_path / "g.wlock"), "--out", str(again))
    assert code == 4 and "unedited" in err and _nothing_written(again), err
    # in place
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    before = tree_hashes(copy)
    code, _, err = run_cli(capsys, "apply", str(copy), "--lock", str(tmp_path / "g.wlock"), "--in-place")
    assert code == 4 and "--out" in err, err
    assert tree_hashes(copy) == before


def test_a_model_with_mlp_biases_is_refused(tmp_path, capsys):
    src = make_model(tmp_path / "src", mlp_bias=True)
    lock = gated_lock(src)
    save_lock(lock, tmp_path / "g.wlock")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4 and "MLP biases" in err and "--no-gate" in err and _nothing_written(out), err


def test_a_gguf_input_is_refused_with_the_reason(tmp_path, capsys):
    from gguf_helpers import lock_for_gguf, write_gguf

    gguf_path = write_gguf(tmp_path / "m.gguf")
    constant = lock_for_gguf(gguf_path)
    src = make_model(tmp_path / "src", hidden=32, heads=4, kv_heads=2, layers=2)
    lock = gated_lock(src)
    lock = type(lock)(
        constant.layers,
        constant.heads,
        constant.directions,
        constant.scales,
        constant.source_model,
        constant.creation,
        constant.default_alpha,
        gate=None,
    )
    from weightlock.core.gate import Gate

    layers = np.array(sorted(set(lock.layers.tolist())))
    probes = np.eye(1, lock.source_model.hidden_size, dtype=np.float32).repeat(len(layers), 0)
    lock.gate = Gate(layers, probes, np.zeros(len(layers), np.float32), np.ones(len(layers), np.float32))
    save_lock(lock, tmp_path / "g.wlock")
    out = tmp_path / "out.gguf"
    code, _, err = run_cli(capsys, "apply", str(gguf_path), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4 and "GGUF" in err and "--no-gate" in err and not out.exists(), err
    code, _, err = run_cli(
        capsys, "apply", str(gguf_path), "--lock", str(tmp_path / "g.wlock"), "--out", str(out), "--no-gate"
    )
    assert code == 0 and out.exists(), err


def test_a_quantized_checkpoint_is_refused(tmp_path, capsys):
    from quant_helpers import write_fp8

    src = make_model(tmp_path / "src")
    quantized = write_fp8(src, tmp_path / "q", "channel")
    lock = gated_lock(src)
    save_lock(lock, tmp_path / "g.wlock")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", str(quantized), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4 and "quantized" in err and _nothing_written(out), err


def test_forge_gate_fits_probes_on_the_prompts_and_apply_bakes_them(tmp_path, capsys):
    from test_eval import make_chat_model
    from test_selection import chat_pairs

    model = make_chat_model(tmp_path / "model", layers=3)
    pairs = chat_pairs(tmp_path / "pairs.jsonl", 16)
    lock_path = tmp_path / "g.wlock"
    code, out, err = run_cli(
        capsys,
        "forge",
        str(model),
        "--data",
        str(pairs),
        "--out",
        str(lock_path),
        "--heads",
        "3",
        "--select",
        "accuracy",
        "--gate",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["gate"] and all(0.0 <= entry["heldout_auc"] <= 1.0 for entry in report["gate"])
    lock = load_lock(lock_path)
    assert lock.gate is not None and lock.manifest()["format_version"] == 2
    assert lock.gate.layers.tolist() == sorted(set(lock.layers.tolist()))
    assert np.all(lock.gate.high > lock.gate.low)
    locked = tmp_path / "locked"
    code, _, err = run_cli(capsys, "apply", str(model), "--lock", str(lock_path), "--out", str(locked), "--alpha", "2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", str(locked), "--source", str(model), "--engines", "transformers,vllm")
    assert code == 0, out + err
    # SGLang's LlamaMLP has no biases: verify for every engine fails, naming it
    code, out, err = run_cli(capsys, "verify", str(locked))
    assert code == 1 and "serving-gate:sglang" in out and "WITHOUT the gate" in out, out + err
    code, out, err = run_cli(capsys, "inspect", str(lock_path))
    assert code == 0 and "gate" in out


def test_hooks_refuse_nothing_silently_a_gated_eval_uses_the_gate(tmp_path):
    """eval's hooks apply the gate of a gated lock (lock_hooks), and gate=False gives the constant lock."""
    src = make_model(tmp_path / "src")
    lock = gated_lock(src)
    assert not (logits(src, lock=lock, alpha=3.0) == logits(src, lock=lock.without_gate(), alpha=3.0)).all()


def test_gate_shapes_that_do_not_match_the_model_are_refused(tmp_path):
    src = make_model(tmp_path / "src")
    other = make_model(tmp_path / "wide", hidden=96, heads=4, kv_heads=2)
    lock = gated_lock(other)
    with pytest.raises(WeightlockError):
        apply_lock(src, lock, out=tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_vllm_serves_the_baked_gate_as_transformers_does(tmp_path):
    from test_vllm import PROMPTS, SHAPE, TOLERANCE, _require_vllm, _run_vllm, _transformers_logprobs

    _require_vllm()
    source = make_model(tmp_path / "src", "llama", **SHAPE)
    lock = gated_lock(source, n_heads=2, seed=3)
    locked = tmp_path / "locked"
    apply_lock(source, lock, out=locked, alpha=4.0)
    result = _run_vllm("scripts/vllm_logprobs.py", "--prompts", json.dumps(PROMPTS), str(source), str(locked))
    served = {k: np.array(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    hf_source, hf_locked = _transformers_logprobs(source), _transformers_logprobs(locked)
    np.testing.assert_allclose(served[str(source)], hf_source, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served[str(locked)], hf_locked, atol=TOLERANCE, rtol=0)
    assert np.abs(served[str(locked)] - served[str(source)]).max() > 0.05


def test_mlx_lm_serves_the_baked_gate_as_transformers_does(tmp_path):
    from mlx_helpers import mlx_logits, require_mlx

    require_mlx()
    source = make_model(tmp_path / "src", "llama")
    lock = gated_lock(source)
    locked = tmp_path / "locked"
    apply_lock(source, lock, out=locked, alpha=3.0)
    reference = logits(source, lock=lock, alpha=3.0).numpy()
    served = mlx_logits(locked)
    unlocked = mlx_logits(source)
    assert np.abs(served - reference).max() < 1e-4
    assert np.abs(served - unlocked).max() > 0.1


@pytest.mark.parametrize("gated", [False, True])
def test_a_lock_whose_header_length_starts_with_a_pickle_byte_still_loads(tmp_path, gated):
    """A safetensors header length of 128 mod 256 begins the file with 0x80, a pickle's first byte: the lock is
    read as what it is (found by the hostile review: forge --gate wrote such locks)."""
    import struct

    src = make_model(tmp_path / "src")
    lock = gated_lock(src) if gated else random_lock(src)
    path = tmp_path / "lock.wlock"
    for pad in range(400):
        lock.description = "x" * (pad + 1)
        save_lock(lock, path)
        if struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 128:
            break
    else:
        pytest.fail("no description length gave a header of 128 mod 256")
    assert path.read_bytes()[:1] == b"\x80"
    assert load_lock(path).description == lock.description


@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_a_model_whose_mlp_is_not_silu_is_refused(tmp_path, capsys, act):
    src = make_model(tmp_path / "src", hidden_act=act)
    save_lock(gated_lock(src), tmp_path / "g.wlock")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4 and "silu" in err and _nothing_written(out), err


def test_thresholds_that_round_away_in_bf16_are_refused(tmp_path, capsys):
    src = make_model(tmp_path / "src", dtype="bfloat16")
    lock = gated_lock(src, low=10.0, high=10.01)
    save_lock(lock, tmp_path / "g.wlock")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 4 and "does not survive rounding to BF16" in err and _nothing_written(out), err
    # the same gate in a float32 model is exact
    src32 = make_model(tmp_path / "src32")
    code, _, err = run_cli(capsys, "apply", str(src32), "--lock", str(tmp_path / "g.wlock"), "--out", str(out))
    assert code == 0, err


@pytest.mark.parametrize(
    "lie",
    [
        ("layers", [0]),
        ("layers", []),
        ("first_neuron", 5),
        ("mlp_biases", []),
    ],
)
def test_verify_refuses_a_gate_record_that_lies(baked, lie):
    src, lock, out = baked
    record_path = out / "weightlock" / "provenance.json"
    record = json.loads(record_path.read_text())
    record["gate"][lie[0]] = lie[1]
    record_path.write_text(json.dumps(record))
    report = verify_checkpoint(out, engines="transformers")
    assert not report.ok
    assert {c.name for c in report.checks if c.status == "fail"} & {"gate_neurons", "provenance"}


def test_inspect_shows_a_crafted_gate_record_safely(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    lock = gated_lock(src)
    lock.gate.details = {"layers": [{"layer": "0\nFAKE: ok\r", "heldout_auc": "\x1b[31m"}, 7, None]}
    save_lock(lock, tmp_path / "g.wlock")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "g.wlock"))
    assert code == 0, err
    assert not any(line.startswith("FAKE") for line in out.splitlines()) and "\x1b" not in out
    lock.gate.details = {"layers": 5}
    save_lock(lock, tmp_path / "g2.wlock")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "g2.wlock"))
    assert code == 0 and "gate: " in out, err


def test_no_gate_names_the_gated_lock_it_came_from(tmp_path):
    import hashlib

    src = make_model(tmp_path / "src")
    save_lock(gated_lock(src), tmp_path / "g.wlock")
    digest = hashlib.sha256((tmp_path / "g.wlock").read_bytes()).hexdigest()
    result = apply_lock(src, tmp_path / "g.wlock", out=tmp_path / "out", gate=False)
    assert any("--no-gate" in w and digest[:16] in w for w in result.summary()["warnings"])
    recorded = load_lock(tmp_path / "out" / "weightlock" / "lock.wlock")
    assert recorded.gate is None and digest in recorded.description
