"""``inspect``: what a lock holds, and what a checkpoint is and whether it is locked."""

from __future__ import annotations

import numpy as np

from .architectures import shape_from_config, spec_for_config
from .checkpoint import Checkpoint
from .errors import WeightlockError
from .lock import Lock
from .plan import stored_linear
from .quantized import quantization_of


def describe_lock(lock: Lock) -> dict:
    return {
        "kind": "lock",
        "sha256": lock.sha256,
        "manifest": lock.manifest(),
        "heads_per_layer": {str(layer): heads for layer, heads in lock.heads_by_layer().items()},
        "probe_accuracy": None if (grid := probe_accuracy_grid(lock)) is None else grid.tolist(),
        "selection": selection_summary(lock),
        "scales": {
            "min": float(lock.scales.min()),
            "median": float(np.median(lock.scales)),
            "max": float(lock.scales.max()),
        },
    }


def probe_accuracy_grid(lock: Lock) -> np.ndarray | None:
    """The manifest's held-out accuracies as a [layers, heads] array, or None when they are absent or not
    exactly that (the manifest's details are free-form, so nothing about them is assumed)."""
    src = lock.source_model
    accuracy = (lock.creation.get("details") or {}).get("probe_accuracy")
    if not (
        isinstance(accuracy, list)
        and len(accuracy) == src.num_hidden_layers
        and all(
            isinstance(row, list)
            and len(row) == src.num_attention_heads
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            for row in accuracy
        )
    ):
        return None
    grid = np.asarray(accuracy, dtype=np.float64)
    return grid if np.all(np.isfinite(grid)) else None


SELECTION_METHODS = ("accuracy", "effect", "effect-greedy")


def selection_summary(lock: Lock) -> dict | None:
    """How forge chose the heads (manifest ``details.selection`` / ``details.position``) and, for effect
    selection, each kept head's recorded scores; None when the manifest does not say (legacy, API locks).
    The details are free-form and may be crafted: every value is type-checked and the lists are bounded."""
    details = lock.creation.get("details")
    if not isinstance(details, dict):
        return None
    selection, position = details.get("selection"), details.get("position")
    if not isinstance(selection, dict) or selection.get("method") not in SELECTION_METHODS:
        return None
    out: dict = {"method": selection["method"], "position": position if position in ("answer", "prompt") else None}
    if selection["method"] == "accuracy":
        return out
    src = lock.source_model
    rows = selection.get("candidates")
    if not isinstance(rows, list) or len(rows) > src.num_hidden_layers * src.num_attention_heads:
        return out
    scored = {}
    for row in rows:
        if not (
            isinstance(row, dict)
            and all(_is_int(row.get(k)) for k in ("layer", "head"))
            and all(_is_finite(row.get(k)) for k in ("effect", "kl", "score", "probe_accuracy"))
        ):
            return out
        scored[(row["layer"], row["head"])] = {k: float(row[k]) for k in ("effect", "kl", "score", "probe_accuracy")}
    kept = [
        {"layer": layer, "head": head, **scored[(layer, head)]}
        for layer, head in zip(lock.layers.tolist(), lock.heads.tolist(), strict=True)
        if (layer, head) in scored
    ]
    alpha = selection.get("alpha")
    out.update(
        candidates=len(scored),
        alpha=float(alpha) if isinstance(alpha, (int, float)) and _is_finite(alpha) else None,
        kept=sorted(kept, key=lambda r: -r["score"]),
        negative_effect_candidates=sum(1 for r in scored.values() if r["effect"] < 0),
    )
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


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
    from .records import net_alphas
    from .verify import folder_traces

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
    if config.get("quantization_config") is None:
        return None
    method = (
        config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"], dict) else None
    )
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
