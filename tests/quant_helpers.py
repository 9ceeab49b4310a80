"""Quantized copies of tiny float checkpoints, written in this venv by the formats' own code: FP8 in the layout
transformers' FineGrainedFP8 reads (torch's float8_e4m3fn cast, ``weight_scale_inv``), and compressed-tensors
pack-quantized / float-quantized by the compressed-tensors library's own compressors. (AWQ and GPTQ are written
by vLLM's reference code in the vLLM venv: tests/quantize_reference.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
FP8_MAX = 448.0
BLOCK = 128


def _scales(w, strategy: str):
    """amax / 448 per tensor ([] for transformers' layout, [1] for compressed-tensors'), per output channel
    ([out, 1]) or per 128x128 block ([out/128, in/128])."""
    w = w.float().abs()
    if strategy == "tensor":
        return w.amax() / FP8_MAX
    if strategy == "channel":
        return w.amax(1, keepdim=True) / FP8_MAX
    rows, cols = w.shape
    return w.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).amax((1, 3)) / FP8_MAX


def _write(source: Path, out: Path, tensors: dict, quantization_config: dict, dtype: str) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in json.loads((source / "config.json").read_text()).items() if k not in ("dtype",)}
    config.update(torch_dtype=dtype, quantization_config=quantization_config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_fp8(source: Path, out: Path, strategy: str) -> Path:
    """FP8 e4m3 in transformers' fine-grained layout: weight + weight_scale_inv (the dequantization scale)."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for name, w in load_file(source / "model.safetensors").items():
        if not LINEAR.match(name):
            tensors[name] = w.to(torch.bfloat16)
            continue
        scale = _scales(w, strategy)
        full = scale if strategy != "block" else scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        tensors[name] = (w.float() / full).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv")] = scale.float().contiguous()
    block = [BLOCK, BLOCK] if strategy == "block" else None
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    return _write(source, out, tensors, config, "bfloat16")


def compressed_tensors_scheme(kind: str, strategy: str, group: int = 32, dynamic_inputs: bool = False):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if kind == "pack-quantized":
        size = group if strategy == "group" else None
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy, group_size=size)
    else:
        args = QuantizationArgs(
            num_bits=8,
            type="float",
            symmetric=True,
            strategy=strategy,
            block_structure=[BLOCK, BLOCK] if strategy == "block" else None,
        )
    inputs = None
    if dynamic_inputs:  # FP8_DYNAMIC: activations quantized per token at run time, no stored scales
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=args, input_activations=inputs, format=kind)


def write_compressed_tensors(
    source: Path, out: Path, kind: str, strategy: str, group: int = 32, dynamic_inputs: bool = False
) -> Path:
    """compressed-tensors ``kind`` (pack-quantized int4 or float-quantized FP8), compressed by the library."""
    import torch
    from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file

    scheme = compressed_tensors_scheme(kind, strategy, group, dynamic_inputs)
    compressor = PackedQuantizationCompressor if kind == "pack-quantized" else FloatQuantizationCompressor
    tensors = {}
    for name, w in load_file(source / "model.safetensors").items():
        w = w.to(torch.bfloat16)
        if not LINEAR.match(name):
            tensors[name] = w
            continue
        if kind == "pack-quantized":
            grouped = w.float().reshape(w.shape[0], -1, group if strategy == "group" else w.shape[1])
            scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
        else:
            scale = _scales(w, strategy).reshape(1) if strategy == "tensor" else _scales(w, strategy)
        compressed = compressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme)
        module = name.removesuffix(".weight")
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in compressed.items()})
    group_config = json.loads(scheme.model_dump_json())
    config = {
        "quant_method": "compressed-tensors",
        "format": kind,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group_config},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    return _write(source, out, tensors, config, "bfloat16")


def library_decompressed(folder: Path, module: str):
    """A module's weight as the compressed-tensors library decompresses it (float32)."""
    from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**config["config_groups"]["group_0"])
    compressor = PackedQuantizationCompressor if config["format"] == "pack-quantized" else FloatQuantizationCompressor
    tensors = load_file(folder / "model.safetensors")
    local = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
    return compressor.decompress(local, scheme)["weight"].float()


def rewrite(folder: Path, tensors=None, config=None) -> None:
    """Replace a single-file checkpoint's tensors (name -> tensor, None drops it) and config keys, in place."""
    from safetensors.torch import load_file, save_file

    if tensors:
        stored = load_file(folder / "model.safetensors")
        for name, value in tensors.items():
            if value is None:
                stored.pop(name)
            else:
                stored[name] = value
        save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    if config:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data, indent=2))
