"""The nine published SafetyLock locks, each applied to a checkpoint with the exact shapes of its source
model (Llama-3/3.1 8B and 70B, Mistral-Nemo-12B, Mistral-Large-123B).

A full 123B checkpoint does not fit this disk, so the checkpoints are sparse files: real safetensors headers
with every tensor of the stock model class at its real shape and dtype, and data areas that are holes (read as
zeros, occupying no disk). apply reads only the locked layers' o_proj ranges, so this exercises the real shapes
end to end; the arithmetic itself is proven on real values by the tiny-model tests. Reads
../shared/data/legacy-locks."""

from __future__ import annotations

import json
import math

import pytest
from conftest import LEGACY_LOCKS

from weightlock import apply_lock, import_legacy, verify_checkpoint
from weightlock.errors import IncompatibleLockError
from weightlock.io.safetensors_file import encode_header

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
NEMO_12B = dict(
    architectures=["MistralForCausalLM"],
    model_type="mistral",
    vocab_size=131072,
    hidden_size=5120,
    intermediate_size=14336,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=1024000,
    rope_theta=1000000.0,
    sliding_window=None,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LARGE_123B = dict(
    NEMO_12B,
    vocab_size=32768,
    hidden_size=12288,
    intermediate_size=28672,
    num_hidden_layers=88,
    num_attention_heads=96,
    max_position_embeddings=131072,
)
CONFIGS = {
    "Meta-Llama-3-8B-Instruct": LLAMA3_8B,
    "Meta-Llama-3__1-8B-Instruct": LLAMA3_8B,
    "Meta-Llama-3-70B-Instruct": LLAMA3_70B,
    "Meta-Llama-3-70B-Instruct_48": LLAMA3_70B,
    "Meta-Llama-3__1-70B-Instruct": LLAMA3_70B,
    "Meta-Llama-3__1-70B-Instruct_48": LLAMA3_70B,
    "Mistral_Nemo_12B": NEMO_12B,
    "Mistral_large_123B": LARGE_123B,
    "Mistral_large_123B_48": LARGE_123B,
}
SHARD_BYTES = 5 << 30


def write_sparse_checkpoint(folder, config: dict) -> None:
    """Every tensor the stock class has, at its real shape in bf16, as holes in 5 GB shards."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model_config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    tensors = sorted((n, tuple(t.shape)) for n, t in model.state_dict().items())
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, nbytes))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = encode_header((name, "BF16", shape) for name, shape, _ in shard)
        weight_map.update({name: file_name for name, _, _ in shard})
        with open(folder / file_name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + offset)  # a hole: no disk used
            # the first row of each o_proj weight holds ones (bf16 0x3F80), the rest stays a hole: an all-zero
            # W_o would give a lock no effect, and apply refuses to publish a lock that changes no stored bias
            start = len(header)
            for name, shape, nbytes in shard:
                if name.endswith("o_proj.weight"):
                    f.seek(start)
                    f.write(b"\x80\x3f" * shape[1])
                start += nbytes
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("published-shapes")
    made = {}
    for key, config in (
        ("llama3-8b", LLAMA3_8B),
        ("llama3-70b", LLAMA3_70B),
        ("nemo-12b", NEMO_12B),
        ("large-123b", LARGE_123B),
    ):
        write_sparse_checkpoint(root / key, config)
        made[id(config)] = root / key
    return made


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_published_lock_applies_to_its_own_shape(tmp_path, sparse_models, stem):
    config = CONFIGS[stem]
    lock = import_legacy(LEGACY_LOCKS / f"{stem}.safelock")
    src = sparse_models[id(config)]
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=6.0)
    layers = lock.heads_by_layer()
    assert (
        result.plan.weight_bytes_to_read
        == len(layers) * config["hidden_size"] * config["num_attention_heads"] * 128 * 2
    ), "exactly the locked layers' o_proj weights are read"
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["model_type"] == "llama" and out_config["attention_bias"] is True
    if config["model_type"] == "mistral":
        assert out_config["head_dim"] == 128 and "sliding_window" not in out_config
    report = verify_checkpoint(tmp_path / "out")
    assert report.ok, report.failures()
    assert {c.name: c.status for c in report.checks}["transformers_names"] == "pass"


@pytest.mark.slow
@pytest.mark.parametrize(
    "stem,other",
    [
        ("Meta-Llama-3__1-8B-Instruct", NEMO_12B),
        ("Meta-Llama-3__1-70B-Instruct", LARGE_123B),
        ("Mistral_Nemo_12B", LLAMA3_8B),
        ("Mistral_large_123B", LLAMA3_70B),
    ],
)
def test_published_lock_on_the_wrong_shape_is_refused(tmp_path, sparse_models, stem, other):
    lock = import_legacy(LEGACY_LOCKS / f"{stem}.safelock")
    with pytest.raises(IncompatibleLockError, match="another shape"):
        apply_lock(sparse_models[id(other)], lock, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
