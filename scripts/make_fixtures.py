"""Write the demo fixtures: a tiny random Llama checkpoint and a lock for it.

Deterministic (seeded numpy, weightlock's own safetensors writer), so the lock
committed under fixtures/ can be checked against a fresh run. The checkpoint is
generated rather than shipped; it needs no transformers to write.

    python scripts/make_fixtures.py [--out fixtures]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from weightlock import SourceModel, build_lock, save_lock
from weightlock.io.safetensors_file import TensorData, write_safetensors

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def checkpoint_tensors(rng: np.random.Generator) -> list[TensorData]:
    c = CONFIG
    hidden, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_width, kv_width = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (c["vocab_size"], hidden),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (hidden,),
                f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (q_width, hidden),
                f"{p}.self_attn.k_proj.weight": (kv_width, hidden),
                f"{p}.self_attn.v_proj.weight": (kv_width, hidden),
                f"{p}.self_attn.o_proj.weight": (hidden, q_width),
                f"{p}.mlp.gate_proj.weight": (inter, hidden),
                f"{p}.mlp.up_proj.weight": (inter, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, inter),
            }
        )
    tensors = []
    for name, shape in sorted(shapes.items()):
        values = (
            np.ones(shape, np.float32)
            if name.endswith("norm.weight")
            else rng.normal(0, 0.15, size=shape).astype(np.float32)
        )
        tensors.append(TensorData(name, "F32", shape, values.tobytes()))
    return tensors


def make_lock():
    rng = np.random.default_rng(7)
    c = CONFIG
    source = SourceModel(
        "LlamaForCausalLM",
        "llama",
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["head_dim"],
        c["hidden_size"],
        name="weightlock/tiny-llama-demo",
    )
    layers, heads = [1, 2, 2, 3], [0, 1, 3, 2]
    return build_lock(
        layers,
        heads,
        rng.normal(size=(len(layers), c["head_dim"])),
        rng.uniform(0.5, 1.5, size=len(layers)),
        source,
        default_alpha=4.0,
        description="demo lock with random directions for the tiny demo checkpoint",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    args = parser.parse_args()
    folder = args.out / "tiny-llama"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    write_safetensors(folder / "model.safetensors", checkpoint_tensors(np.random.default_rng(0)))
    digest = save_lock(make_lock(), args.out / "tiny-llama.wlock")
    print(f"wrote {folder} and {args.out / 'tiny-llama.wlock'} (sha256 {digest[:16]}...)")


if __name__ == "__main__":
    main()
