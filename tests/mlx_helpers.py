"""mlx-lm as the reference for MLX checkpoints: its own loader's logits, and the lock applied at run time inside
mlx-lm (the unlocked folder, each touched layer's output projection wrapped to add the lock's displacement to its
input). Needs mlx-lm (scripts/install_mlx.sh); :func:`require_mlx` skips without it unless
WEIGHTLOCK_REQUIRE_MLX=1, which fails instead (it cannot pass by skipping)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import INPUT_IDS


def require_mlx():
    """mlx.core and mlx_lm.utils, or a skip (a failure under WEIGHTLOCK_REQUIRE_MLX=1)."""
    try:
        import mlx.core as mx
        import mlx_lm.utils as mlx_utils
    except ImportError:
        message = "mlx-lm is not installed (bash scripts/install_mlx.sh)"
        if os.environ.get("WEIGHTLOCK_REQUIRE_MLX") == "1":
            pytest.fail(message + "; WEIGHTLOCK_REQUIRE_MLX=1 forbids skipping")
        pytest.skip(message)
    return mx, mlx_utils


def _load(folder: Path):
    _, mlx_utils = require_mlx()
    model, config = mlx_utils.load_model(Path(folder), strict=True)
    return model, config


def _run(model, input_ids) -> np.ndarray:
    mx, _ = require_mlx()
    return np.array(model(mx.array(input_ids)).astype(mx.float32))


def mlx_logits(folder: Path, input_ids=INPUT_IDS) -> np.ndarray:
    """Logits of ``folder`` as mlx-lm's strict load_model builds it, as float32."""
    model, _ = _load(folder)
    return _run(model, input_ids)


def _module(root, path: str):
    """An mlx module by its dotted path ("model.layers.3.self_attn.o_proj"): mlx-lm names modules as the
    checkpoint names tensors, lists indexed by number."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def mlx_hooked_logits(folder: Path, lock, alpha: float, input_ids=INPUT_IDS) -> np.ndarray:
    """The reference for every mlx proof: the UNLOCKED ``folder`` in mlx-lm, each touched layer's output
    projection (found by family through weightlock's table: self_attn.o_proj for Llama, Mistral, Qwen2,
    Mixtral; self_attn.dense for Phi) wrapped so that the lock's displacement, cast to the model's dtype, is
    added to its input before the wrapped (quantized or not) layer runs."""
    mx, _ = require_mlx()
    import mlx.nn as nn

    from weightlock.core.families import shape_from_config, spec_for_config
    from weightlock.engines.mlx import served_name

    class Displaced(nn.Module):
        def __init__(self, inner, displacement):
            super().__init__()
            self.inner = inner
            self.displacement = displacement

        def __call__(self, x):
            return self.inner(x + self.displacement)

    model, config = _load(folder)
    spec = spec_for_config(config)
    shape = shape_from_config(config, spec)
    for layer, d in lock.displacements(alpha, shape.num_heads).items():
        # mlx-lm's name for the module: what the class's sanitize makes of the stored name (GPT-NeoX renames)
        path = served_name(model, spec.output_module(layer) + ".bias", mx.zeros((1,))).removesuffix(".bias")
        parent_path, _, name = path.rpartition(".")
        parent = _module(model, parent_path)
        inner = getattr(parent, name)
        # the model's dtype: an affine layer's scales are in it, a float layer's weight is
        model_dtype = inner.scales.dtype if "scales" in inner else inner.weight.dtype
        setattr(parent, name, Displaced(inner, mx.array(d).astype(model_dtype)))
    return _run(model, input_ids)


def quantize_with_mlx(source: Path, out: Path, bits: int, group_size: int, dtype: str | None = None, predicate=None):
    """``source`` (a transformers folder) quantized by mlx-lm's own API: load_model, quantize_model (affine),
    save_model and save_config, as mlx_lm.convert does; ``dtype`` casts the float weights first (convert's
    --dtype); ``predicate`` is quantize_model's quant_predicate (per-layer settings)."""
    mx, mlx_utils = require_mlx()
    from mlx.utils import tree_map

    model, config = mlx_utils.load_model(Path(source), lazy=False)
    if dtype is not None:
        target = getattr(mx, dtype)
        cast = tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
        model.update(cast)
        config["torch_dtype"] = dtype
    model, config = mlx_utils.quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    mlx_utils.save_model(out, model)
    mlx_utils.save_config(config, out / "config.json")
    if (Path(source) / "tokenizer_config.json").exists():  # what convert carries besides (a stub here)
        (out / "tokenizer_config.json").write_text((Path(source) / "tokenizer_config.json").read_text())
    return out


def mlx_float32_logits(folder: Path, input_ids=INPUT_IDS) -> np.ndarray:
    """``folder`` in mlx-lm with every floating-point parameter (affine scales and biases included) cast to
    float32, the packed codes unchanged: the same quantized model without its dtype's rounding."""
    mx, _ = require_mlx()
    from mlx.utils import tree_map

    model, _ = _load(folder)
    model.update(
        tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
    )
    return _run(model, input_ids)
