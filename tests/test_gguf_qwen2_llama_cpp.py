"""A locked Qwen2 GGUF is served locked by llama.cpp itself (llama-cpp-python 0.3.36), through its llama graph.

Tiny random Qwen2 checkpoints (Q/K/V biases, grouped-query attention, head sizes 24 and 32, never 64) are saved
by stock transformers and converted by llama.cpp's own convert_hf_to_gguf.py, which writes them as ``qwen2``
(unpermuted Q/K rows); quantized files come from llama.cpp's own quantizer. weightlock rewrites each as
``llama`` with the lock's attn_output.bias. The reference is stock transformers' Qwen2 with the lock by hooks.

Tolerances as in tests/test_gguf_llama_cpp.py: each comparison is set against the same comparison without a
lock (the two engines' arithmetic gap on the unlocked model, measured in the same run); the lock must move
the log-probs far more. Skipped without llama.cpp unless WEIGHTLOCK_REQUIRE_LLAMA_CPP=1 (CI sets it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import INPUT_IDS, logits, make_model, random_lock, run_cli
from gguf_helpers import convert, llama_cpp_log_probs, make_convertible, quantized_lock_effect
from test_gguf_llama_cpp import tokenizer_dir  # noqa: F401  (the session fixture: SmolLM2's tokenizer)

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.engines import llama_cpp
from weightlock.formats.gguf.file import open_gguf

pytestmark = pytest.mark.slow
VOCAB = 49152
ALPHA = 3.0

# a Qwen2.5-shaped config (tied embeddings, 131072 positions, rope_theta 1e6) and an untied one with head size 24
SHAPES = {
    "qwen2.5-shaped": dict(hidden=96, heads=4, kv_heads=2, tie=True, max_position_embeddings=131072, rope_theta=1e6),
    "untied-head24": dict(hidden=96, heads=4, kv_heads=2, tie=False),
}


def _hf_log_probs(folder, lock=None, alpha=None) -> np.ndarray:
    return torch.log_softmax(logits(folder, lock=lock, alpha=alpha), -1).double().numpy()


def _qwen2(tmp_path, tokenizer_dir, name="qwen2", convert_args=(), **shape):  # noqa: F811
    folder = make_model(tmp_path / name, "qwen2", vocab=VOCAB, layers=3, **shape)
    make_convertible(folder, tokenizer_dir)
    gguf = convert(folder, tmp_path / f"{name}.gguf", *convert_args, name_pre_tokenizer=True)
    assert open_gguf(gguf).text("general.architecture") == "qwen2"  # the converter's own choice
    return folder, gguf


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_locked_qwen2_gguf_in_llama_cpp_equals_hooked_transformers(tmp_path, tokenizer_dir, shape):  # noqa: F811
    folder, gguf = _qwen2(tmp_path, tokenizer_dir, **SHAPES[shape])
    lock = random_lock(folder, n_heads=5)
    locked = apply_lock(gguf, lock, out=tmp_path / "locked.gguf", alpha=ALPHA)
    assert locked.report.ok and locked.summary()["architecture"] == "llama"
    assert verify_checkpoint(tmp_path / "locked.gguf", engine="llama-cpp", source=gguf, engines="llama.cpp").ok

    engine_gap = np.abs(llama_cpp_log_probs(gguf, INPUT_IDS) - _hf_log_probs(folder)).max()
    hooked = _hf_log_probs(folder, lock, ALPHA)
    error = np.abs(llama_cpp_log_probs(tmp_path / "locked.gguf", INPUT_IDS) - hooked).max()
    effect = np.abs(hooked - _hf_log_probs(folder)).max()
    print(f"{shape}: engine gap {engine_gap:.2e}, locked error {error:.2e}, lock effect {effect:.2f}")
    assert error <= 2 * engine_gap + 1e-3, (error, engine_gap)
    assert effect > 100 * error, (effect, error)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_quantized_qwen2_gguf_lock_effect_matches_hooks(tmp_path, tokenizer_dir, file_type):  # noqa: F811
    """Quantized by llama.cpp's quantizer: the reference is the same quantized weights dequantized by
    transformers' own GGUF loader (as Qwen2, unpermuted), with the lock by hooks; llama.cpp's effect (locked
    minus unlocked) must match the hooked effect within the engines' own gap on the unlocked model."""
    # hidden 256 (K-quants pack rows in blocks of 256), 8 heads of 32, 2 KV heads
    folder, f32 = _qwen2(tmp_path, tokenizer_dir, hidden=256, heads=8, kv_heads=2, tie=True, init_std=0.05)
    quantized = tmp_path / f"{file_type}.gguf"
    llama_cpp.quantize(f32, quantized, file_type)
    qk = ("attn_q.weight", "attn_k.weight")
    types = {t.type_name for name, t in open_gguf(quantized).tensors.items() if name.endswith(qk)}
    if file_type == "Q8_0":
        assert types == {"Q8_0"}
    else:
        assert types & {"Q4_K", "Q5_K", "Q6_K"}, types  # Q4_K_M keeps some layers at higher precision
    lock = random_lock(folder, n_heads=5)
    apply_lock(quantized, lock, out=tmp_path / "locked.gguf", alpha=ALPHA)
    assert verify_checkpoint(tmp_path / "locked.gguf", source=quantized, engines="llama.cpp").ok

    engine_gap, effect_error, effect, correlation = quantized_lock_effect(
        tmp_path, quantized, tmp_path / "locked.gguf", lock, ALPHA
    )
    print(f"{file_type}: engine gap {engine_gap:.2e}, effect error {effect_error:.2e}, effect {effect:.2f}")
    assert effect_error <= 2 * engine_gap + 1e-3, (effect_error, engine_gap)
    assert effect > 10 * effect_error, (effect, effect_error)
    assert correlation > 0.99


def test_split_qwen2_gguf_is_rewritten_as_a_set(tmp_path, tokenizer_dir):  # noqa: F811
    folder, single = _qwen2(tmp_path, tokenizer_dir, hidden=96, heads=4, kv_heads=2)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    convert(folder, split_dir / "tiny.gguf", "--split-max-tensors", "14", name_pre_tokenizer=True)
    first = sorted(split_dir.iterdir())[0]
    assert open_gguf(first).split_count >= 3
    lock = random_lock(folder, n_heads=5)
    result = apply_lock(first, lock, out=tmp_path / "out" / "locked.gguf", alpha=ALPHA)
    assert all(open_gguf(p).files[0].metadata.get("qwen2.block_count") is None for p in result.outputs[:1])
    assert verify_checkpoint(result.outputs[0], source=first, engines="llama.cpp").ok
    apply_lock(single, lock, out=tmp_path / "single-locked.gguf", alpha=ALPHA)
    from_split = llama_cpp_log_probs(result.outputs[0], INPUT_IDS)
    np.testing.assert_allclose(from_split, llama_cpp_log_probs(tmp_path / "single-locked.gguf", INPUT_IDS), atol=1e-5)
    assert np.abs(from_split - _hf_log_probs(folder, lock, ALPHA)).max() < 1e-2


def test_locked_qwen2_safetensors_converted_to_gguf_keeps_the_lock(tmp_path, tokenizer_dir):  # noqa: F811
    """The other route: the safetensors Qwen2 output (declared Llama, with its real Q/K biases) converted by
    llama.cpp's converter, which permutes Q/K weights and biases for Llama; llama.cpp serves it locked."""
    folder = make_convertible(make_model(tmp_path / "src", "qwen2", vocab=VOCAB, layers=3, hidden=96), tokenizer_dir)
    lock = random_lock(folder, n_heads=5)
    apply_lock(folder, lock, out=tmp_path / "locked", alpha=ALPHA)
    gguf = convert(tmp_path / "locked", tmp_path / "locked.gguf", name_pre_tokenizer=True)
    model = open_gguf(gguf)
    assert model.text("general.architecture") == "llama"
    assert {f"blk.{i}.attn_output.bias" for i in range(3)} <= set(model.tensors)
    hooked = _hf_log_probs(folder, lock, ALPHA)
    error = np.abs(llama_cpp_log_probs(gguf, INPUT_IDS) - hooked).max()
    assert error < 1e-2 and np.abs(hooked - _hf_log_probs(folder)).max() > 100 * error


def test_relocked_rewritten_file_with_minus_alpha_serves_the_source(tmp_path, tokenizer_dir):  # noqa: F811
    folder, gguf = _qwen2(tmp_path, tokenizer_dir, hidden=96, heads=4, kv_heads=2)
    lock = random_lock(folder, n_heads=5)
    apply_lock(gguf, lock, out=tmp_path / "locked.gguf", alpha=ALPHA)
    apply_lock(tmp_path / "locked.gguf", lock, out=tmp_path / "unlocked.gguf", alpha=-ALPHA)
    assert verify_checkpoint(tmp_path / "unlocked.gguf", source=gguf, engines="llama.cpp").ok
    np.testing.assert_allclose(
        llama_cpp_log_probs(tmp_path / "unlocked.gguf", INPUT_IDS), llama_cpp_log_probs(gguf, INPUT_IDS), atol=1e-4
    )


def test_tune_with_llama_cpp_on_a_qwen2_gguf(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    """tune --engine llama-cpp bakes each alpha into a temporary (rewritten) GGUF and serves it in llama.cpp."""
    folder, gguf = _qwen2(tmp_path, tokenizer_dir, hidden=96, heads=4, kv_heads=2)
    save_lock(random_lock(folder, n_heads=5), tmp_path / "lock.wlock")
    code, text, err = run_cli(
        capsys,
        "tune",
        str(gguf),
        "--lock",
        str(tmp_path / "lock.wlock"),
        "--alphas",
        "0,6",
        "--engine",
        "llama-cpp",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert code in (0, 1), err  # 1: no alpha met tune's bounds (a random model)
    by_alpha = {r["alpha"]: r for r in json.loads(text)["results"]}
    assert by_alpha[0.0]["kl"] < 1e-6 < by_alpha[6.0]["kl"]
    assert not list(gguf.parent.glob(".weightlock-eval-*"))
