"""``inspect`` data for a safetensors folder: the model, its shards, how its o_proj weights are stored, and what
its edit record claims (``verify`` checks those claims)."""

from __future__ import annotations

from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.errors import WeightlockError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.plan import stored_linear
from weightlock.formats.safetensors.quant.layouts import quantization_of


def describe_checkpoint(checkpoint: Checkpoint) -> dict:
    spec = shape = None
    try:
        spec = spec_for_config(checkpoint.config)
        shape = shape_from_config(checkpoint.config, spec)
        shape_info = dict(
            shape.__dict__,
            family=spec.family,
            bias_flag={spec.bias_flag: bool(checkpoint.config.get(spec.bias_flag, False))},
        )
    except WeightlockError as e:
        shape_info = {
            "architecture": (checkpoint.config.get("architectures") or ["?"])[0],
            "supported": False,
            "reason": e.message,
        }
    quantization = _quantization(checkpoint, spec, shape) if "num_layers" in shape_info else None
    dtypes: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + 1
    from weightlock.core.records import net_alphas
    from weightlock.formats.safetensors.verify import folder_traces

    record = checkpoint.provenance
    locked = None
    if isinstance(record, dict):
        locked = {
            "alpha": record.get("alpha"),
            "net_alpha": net_alphas(record).get(str((record.get("lock") or {}).get("sha256"))),
            "lock_sha256": (record.get("lock") or {}).get("sha256"),
            "locked_layers": record.get("locked_layers"),
            "created_at": record.get("created_at"),
            "tool": record.get("tool"),
            "edits": _depth(record),
            # a gated lock: its MLPs' growth, as recorded (None: a constant lock)
            "gate": record.get("gate") if isinstance(record.get("gate"), dict) else None,
            "verified": False,  # what the record claims; `weightlock verify` checks it
            "redeclared_from": _redeclared_from(record),
        }
    return {
        "kind": "checkpoint",
        "path": str(checkpoint.root),
        "name": checkpoint.name,
        "revision": checkpoint.revision,
        "model": shape_info,
        "layout": checkpoint.layout,
        "shards": [
            {"file": shard, "bytes": h.file_size, "tensors": len(h.tensors)}
            for shard, h in sorted(checkpoint.headers.items())
        ],
        "tensors": len(checkpoint.tensors),
        "dtypes": dtypes,
        "quantization": quantization,
        "locked": locked,
        # what an edit leaves besides its record: with no record, a sign the record was removed (verify fails it)
        "edit_traces": [] if locked is not None else folder_traces(checkpoint.root),
    }


def _quantization(checkpoint: Checkpoint, spec, shape) -> dict | None:
    """How the o_proj weights a lock reads are stored, and how the biases beside them are written."""
    config = checkpoint.config
    if config.get("quantization_config") is None and config.get("quantization") is None:
        return None
    stated = config.get("quantization_config")
    method = "mlx" if config.get("quantization") is not None else None  # mlx-lm's own: config.json quantization
    method = method or (stated.get("quant_method") if isinstance(stated, dict) else None)
    try:
        settings = quantization_of(config)
    except WeightlockError as e:
        return {"method": method, "readable": False, "reason": e.message}
    storage: dict[str, int] = {}
    bias_dtypes: set[str] = set()
    for layer in range(shape.num_layers):
        try:
            weight = stored_linear(checkpoint.tensors, config, spec.output_module(layer))
        except WeightlockError as e:
            return {"method": method, "readable": False, "reason": e.message}
        if weight is None:
            continue
        storage[weight.dtype] = storage.get(weight.dtype, 0) + 1
        bias = checkpoint.tensors.get(spec.output_bias(layer))
        if bias is not None:
            bias_dtypes.add(bias.dtype)
    out = {"method": method, "readable": True, "output_projections": storage, "bias_dtypes": sorted(bias_dtypes)}
    if settings is not None:
        out.update(
            format=settings.format.name,
            packing=settings.format.packing,
            bias_applied_by=list(settings.format.bias_honoured_by),
            not_shown=dict(settings.format.unproven),
        )
    return out


def _redeclared_from(record: dict) -> str | None:
    original = record["original_config"].get("architectures")
    changed = record["config_changes"]["set"].get("architectures")
    if not (isinstance(original, list) and original and isinstance(original[0], str)):
        return None
    return original[0] if changed and changed != original else None


def _depth(record: dict | None) -> int:
    depth = 0
    while isinstance(record, dict):
        depth, record = depth + 1, record.get("parent")
    return depth
