"""``inspect``: what a lock holds, and what a checkpoint is and whether it is locked."""

from __future__ import annotations

import numpy as np

from weightlock.core.lock import Lock


def describe_lock(lock: Lock) -> dict:
    return {
        "kind": "lock",
        "sha256": lock.sha256,
        "manifest": lock.manifest(),
        "heads_per_layer": {str(layer): heads for layer, heads in lock.heads_by_layer().items()},
        "gate": None if lock.gate is None else lock.gate.summary(),
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
