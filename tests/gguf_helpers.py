"""Helpers for the GGUF tests: small GGUF files written by the gguf package's own writer, llama.cpp's
converter run on tiny transformers checkpoints, and log-probabilities from both sides."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def require_llama_cpp():
    """Skip without llama.cpp, unless WEIGHTLOCK_REQUIRE_LLAMA_CPP=1 (CI sets it: it cannot pass by skipping)."""
    from weightlock.engines.llama_cpp import available

    if available() and CONVERTER.exists():
        return
    message = f"llama-cpp-python or the converter ({CONVERTER}) is missing (bash scripts/install_llama_cpp.sh)"
    if os.environ.get("WEIGHTLOCK_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(message + "; WEIGHTLOCK_REQUIRE_LLAMA_CPP=1 forbids skipping")
    pytest.skip(message)


def write_gguf(
    path: Path,
    *,
    arch="llama",
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=8,
    hidden=32,
    out_type="F32",
    bias=False,
    seed=0,
    extra=None,
) -> Path:
    """A small GGUF written by gguf.GGUFWriter: the shape keys llama.cpp reads, an embedding and, per layer,
    attn_output.weight (F32, F16 or any quantized type the gguf package can quantize) and a norm."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(hidden)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", rng.normal(size=(64, hidden)).astype(np.float32))
    for layer in range(layers):
        weight = rng.normal(0, 0.2, size=(hidden, heads * head_dim)).astype(np.float32)
        name = f"blk.{layer}.attn_output.weight"
        qtype = gguf.GGMLQuantizationType[out_type]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, weight)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        if bias:
            writer.add_tensor(f"blk.{layer}.attn_output.bias", rng.normal(0, 0.1, size=hidden).astype(np.float32))
    finish(writer)
    return path


def lock_for_gguf(path: Path, *, n_heads=3, seed=1, model_type="llama", default_alpha=3.0):
    """A random lock that fits the GGUF model at ``path``."""
    from conftest import random_lock_for

    from weightlock.core.lock import SourceModel
    from weightlock.formats.gguf.architectures import gguf_architecture
    from weightlock.formats.gguf.edit import gguf_shape
    from weightlock.formats.gguf.file import open_gguf

    model = open_gguf(path)
    shape = gguf_shape(model, gguf_architecture(model.text("general.architecture")))
    source = SourceModel(
        "LlamaForCausalLM", model_type, shape.num_layers, shape.num_heads, shape.head_dim, shape.hidden_size
    )
    return random_lock_for(source, n_heads, seed, default_alpha)


def finish(writer) -> None:
    """Write out a gguf.GGUFWriter whose keys and tensors were all added."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# The converter names a BPE tokenizer's pre-tokenizer from a hash of its output, and knows SmolLM2's only when
# the model is converted through the Llama path; for other families (Qwen2) it is told "smollm" instead.
# Only the tokenizer metadata depends on it: the tensors are converted by the converter's own code.
_PRE_TOKENIZER = """
import runpy, sys
sys.path.insert(0, {share!r}); sys.path.insert(1, {share!r} + '/gguf-py')
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv = [{converter!r}, *sys.argv[1:]]
runpy.run_path({converter!r}, run_name="__main__")
"""


def convert(folder: Path, out: Path, *extra: str, outtype: str = "f32", name_pre_tokenizer: bool = False) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py, from the same llama-cpp-python sdist (to F32 by default)."""
    program = (
        ["-c", _PRE_TOKENIZER.format(share=str(CONVERTER.parent), converter=str(CONVERTER))]
        if name_pre_tokenizer
        else [str(CONVERTER)]
    )
    result = subprocess.run(
        [sys.executable, *program, str(folder), "--outtype", outtype, "--outfile", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def llama_cpp_log_probs(path: Path, token_lists) -> np.ndarray:
    from weightlock.engines import llama_cpp

    return np.stack([log_softmax(rows) for rows in llama_cpp.logits(path, token_lists)])


def quantized_lock_effect(folder: Path, quantized: Path, locked: Path, lock, alpha: float):
    """A lock's effect on a quantized GGUF in llama.cpp against its effect by hooks on the same quantized weights
    dequantized by transformers' own GGUF loader (``folder`` holds ``quantized``): (engine gap on the unlocked
    model, effect error, effect, correlation of the two effects)."""
    import torch
    from conftest import INPUT_IDS
    from transformers import AutoModelForCausalLM

    from weightlock.engines.hooks import lock_hooks

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=quantized.name, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor(INPUT_IDS)).logits, -1).double().numpy()
        with lock_hooks(model, lock, alpha):
            hooked = torch.log_softmax(model(torch.tensor(INPUT_IDS)).logits, -1).double().numpy()
    unlocked_cpp = llama_cpp_log_probs(quantized, INPUT_IDS)
    locked_cpp = llama_cpp_log_probs(locked, INPUT_IDS)
    engine_gap = np.abs(unlocked_cpp - reference).max()
    effect_error = np.abs((locked_cpp - unlocked_cpp) - (hooked - reference)).max()
    effect = np.abs(hooked - reference).max()
    correlation = np.corrcoef((locked_cpp - unlocked_cpp).ravel(), (hooked - reference).ravel())[0, 1]
    return engine_gap, effect_error, effect, correlation


def make_convertible(folder: Path, tokenizer: Path) -> Path:
    """Give a tiny transformers checkpoint a tokenizer llama.cpp's converter recognises (SmolLM2's)."""
    (folder / "tokenizer_config.json").unlink(missing_ok=True)
    for item in tokenizer.iterdir():
        shutil.copy(item, folder / item.name)
    return folder
