"""``inspect`` data for a GGUF model: its files, llama.cpp architecture and shape, how attn_output is stored, and
what its edit record claims (``verify`` checks those claims)."""

from __future__ import annotations

from weightlock.errors import WeightlockError
from weightlock.formats.gguf.architectures import (
    OUTPUT_WEIGHT,
    architecture_row,
    gguf_edit_architectures,
    layer_tensor_pattern,
)
from weightlock.formats.gguf.edit import gguf_shape
from weightlock.formats.gguf.file import GGUFModel
from weightlock.formats.gguf.record import read_record
from weightlock.formats.gguf.verify import gguf_traces

OUTPUT_WEIGHT_NAME = layer_tensor_pattern(OUTPUT_WEIGHT)


def describe_gguf(model: GGUFModel) -> dict:
    """What ``inspect`` shows for a GGUF model."""
    name = model.text("general.architecture")
    row = architecture_row(name)
    info: dict = {
        "path": str(model.path),
        "format": "gguf",
        "files": [f.path.name for f in model.files],
        "bytes": model.total_size,
        "gguf_version": model.files[0].version,
        "architecture": name,
        "model_name": model.text("general.name"),
        "tensors": len(model.tensors),
        "llama_cpp_output_bias": None if row is None else (row.bias or f"refused: {row.refuse}"),
    }
    if row is not None and row.rewrite is not None:
        info["locked_as"] = row.rewrite.target  # apply rewrites the file as this architecture
    try:
        stored, _ = gguf_edit_architectures(name)
        shape = gguf_shape(model, stored)
        info["shape"] = {
            "layers": shape.num_layers,
            "heads": shape.num_heads,
            "kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "hidden_size": shape.hidden_size,
        }
        types: dict[str, int] = {}
        # from the tensor names: a damaged block_count (2**31 - 1) must not make inspect count up to it
        for name, weight in model.tensors.items():
            match = OUTPUT_WEIGHT_NAME.fullmatch(name)
            if match is not None and int(match.group(1)) < shape.num_layers:
                types[weight.type_name] = types.get(weight.type_name, 0) + 1
        info["attn_output_types"] = types
    except WeightlockError as e:
        info["shape"] = None
        info["problem"] = e.message
    info["attn_output_biases"] = sum(1 for n in model.tensors if n.endswith(".attn_output.bias"))
    record = read_record(model)
    info["locked"] = None
    info["edit_traces"] = gguf_traces(model) if record is None else []
    if record is not None:
        from weightlock.core.records import net_alphas

        depth, parent = 1, record["parent"]
        while isinstance(parent, dict) and depth < 64:
            depth, parent = depth + 1, parent.get("parent")
        info["locked"] = {
            "alpha": record["alpha"],
            "net_alpha": net_alphas(record).get(record["lock"]["sha256"]),
            "lock_sha256": record["lock"]["sha256"],
            "source_model": record["lock"]["manifest"].get("source_model"),
            "locked_layers": record["locked_layers"],
            "tensors_added": len(record["tensors"]["added"]),
            "tensors_replaced": len(record["tensors"]["replaced"]),
            "created_at": record["created_at"],
            "tool": record["tool"],
            "source": record["source"]["name"],
            "rewritten_from": _rewritten_from(record),
            "edits": depth,
            "verified": False,  # what the record claims; `weightlock verify` checks it
        }
    return info


def _rewritten_from(record: dict) -> dict | None:
    """The root edit's rewrite (the architecture the file had, and how much was permuted and renamed)."""
    depth = 0
    while isinstance(record.get("parent"), dict) and depth < 64:
        record, depth = record["parent"], depth + 1
    rewrite = record.get("rewrite")
    if not isinstance(rewrite, dict):
        return None
    return {
        "architecture": rewrite.get("from"),
        "permuted_tensors": len(rewrite.get("permuted") or {}),
        "renamed_keys": len(rewrite.get("renamed_keys") or []),
    }
