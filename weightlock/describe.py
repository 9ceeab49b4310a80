"""``inspect``: what a lock holds, and what a checkpoint is and whether it is locked."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .architectures import shape_from_config, spec_for_config
from .checkpoint import Checkpoint
from .errors import WeightlockError
from .lock import Lock


def describe_lock(lock: Lock) -> dict:
    return {
        "kind": "lock",
        "sha256": lock.sha256,
        "manifest": lock.manifest(),
        "heads_per_layer": {str(layer): heads for layer, heads in lock.heads_by_layer().items()},
        "probe_accuracy": None if (grid := probe_accuracy_grid(lock)) is None else grid.tolist(),
        "scales": {"min": float(lock.scales.min()), "median": float(np.median(lock.scales)),
                   "max": float(lock.scales.max())},
    }


MAX_HEATMAP_PIXELS = 64 << 20  # the cell shrinks (to one pixel at least) to keep big models' maps bounded


def probe_accuracy_grid(lock: Lock) -> np.ndarray | None:
    """The manifest's held-out accuracies as a [layers, heads] array, or None when they are absent or not
    exactly that (the manifest's details are free-form, so nothing about them is assumed)."""
    src = lock.source_model
    accuracy = (lock.creation.get("details") or {}).get("probe_accuracy")
    if not (isinstance(accuracy, list) and len(accuracy) == src.num_hidden_layers and all(
            isinstance(row, list) and len(row) == src.num_attention_heads
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row) for row in accuracy)):
        return None
    grid = np.asarray(accuracy, dtype=np.float64)
    return grid if np.all(np.isfinite(grid)) else None


def heatmap_png(lock: Lock, cell: int = 12) -> bytes:
    """A layer x head map as PNG: rows are layers, columns heads, colour the held-out probe accuracy
    (0.5 dark blue to 1.0 yellow; locks without accuracies show kept heads only); kept heads outlined white."""
    src = lock.source_model
    cells = src.num_hidden_layers * src.num_attention_heads  # at most 4096 x 4096 (the lock schema)
    cell = max(1, min(cell, int((MAX_HEATMAP_PIXELS / cells) ** 0.5)))
    grid = probe_accuracy_grid(lock)
    if grid is None:
        grid = np.full((src.num_hidden_layers, src.num_attention_heads), 0.5)
        grid[lock.layers, lock.heads] = 1.0
    t = np.clip((grid - 0.5) / 0.5, 0, 1)[..., None]
    low, high = np.array([20, 30, 90]), np.array([250, 230, 40])
    colours = (low + (high - low) * t).astype(np.uint8)
    image = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    for layer, head in zip(lock.layers.tolist(), lock.heads.tolist()) if cell >= 4 else ():
        y, x = layer * cell, head * cell
        image[y:y + cell, x:x + 2] = image[y:y + cell, x + cell - 2:x + cell] = 255
        image[y:y + 2, x:x + cell] = image[y + cell - 2:y + cell, x:x + cell] = 255
    return png_bytes(image)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an [height, width, 3] uint8 image as PNG (no plotting library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def describe_checkpoint(checkpoint: Checkpoint) -> dict:
    try:
        spec = spec_for_config(checkpoint.config)
        shape = shape_from_config(checkpoint.config, spec)
        shape_info = dict(shape.__dict__, family=spec.family,
                          bias_flag={spec.bias_flag: bool(checkpoint.config.get(spec.bias_flag, False))})
    except WeightlockError as e:
        shape_info = {"architecture": (checkpoint.config.get("architectures") or ["?"])[0],
                      "supported": False, "reason": e.message}
    dtypes: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + 1
    record = checkpoint.provenance
    locked = None
    if isinstance(record, dict):
        locked = {"alpha": record.get("alpha"), "lock_sha256": (record.get("lock") or {}).get("sha256"),
                  "locked_layers": record.get("locked_layers"), "created_at": record.get("created_at"),
                  "tool": record.get("tool"), "edits": _depth(record),
                  "redeclared_from": _redeclared_from(record)}
    return {
        "kind": "checkpoint",
        "path": str(checkpoint.root),
        "name": checkpoint.name,
        "revision": checkpoint.revision,
        "model": shape_info,
        "layout": checkpoint.layout,
        "shards": [{"file": shard, "bytes": h.file_size, "tensors": len(h.tensors)}
                   for shard, h in sorted(checkpoint.headers.items())],
        "tensors": len(checkpoint.tensors),
        "dtypes": dtypes,
        "locked": locked,
    }


def _redeclared_from(record: dict) -> str | None:
    original = record["original_config"].get("architectures")
    changed = record["config_changes"]["set"].get("architectures")
    if not (isinstance(original, list) and original and isinstance(original[0], str)):
        return None
    return original[0] if changed and changed != original else None


def _depth(record: dict) -> int:
    depth = 0
    while isinstance(record, dict):
        depth, record = depth + 1, record.get("parent")
    return depth
