"""The edit every format makes: the lock's displacements (with the refusals every format shares), ``W_o @ d`` over
the touched heads' columns in row blocks (each format supplies its own row reader, dequantizing or not), and the
refusal of an alpha whose effect rounds away. Config changes are computed and applied here too, as data."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from weightlock.core.families import ModelShape
from weightlock.core.lock import Lock
from weightlock.errors import IncompatibleLockError, InvalidInputError, UnsupportedError


def config_changes(old: dict, new: dict) -> dict:
    """What turns ``old`` into ``new``: keys set (added or changed) and keys removed."""
    return {
        "set": {k: v for k, v in new.items() if k not in old or old[k] != v},
        "removed": sorted(k for k in old if k not in new),
    }


def apply_config_changes(old: dict, changes: dict) -> dict:
    new = {k: v for k, v in old.items() if k not in changes["removed"]}
    new.update(changes["set"])
    return new


def checked_displacements(
    lock: Lock, alpha: float, shape: ModelShape, mismatch: str | None, allow_mismatch: bool, warnings: list[str]
) -> dict[int, np.ndarray]:
    """The refusals every format makes before an edit (alpha not finite, another shape, another architecture
    unless allowed, displacements overflowing float32), then the lock's per-layer displacements."""
    from weightlock.core.bounds import check_number

    alpha = check_number("alpha", alpha)  # a finite number (bounds.BOUNDS), as the CLI's --alpha; else exit 3
    lock.check_compatible(shape)
    if mismatch is not None:
        if not allow_mismatch:
            raise IncompatibleLockError(
                mismatch, hint="if the two really share activation geometry, pass --allow-architecture-mismatch"
            )
        warnings.append(mismatch)
    with np.errstate(over="ignore", invalid="ignore"):
        displacements = lock.displacements(alpha, shape.num_heads)
    if not all(np.all(np.isfinite(d)) for d in displacements.values()):
        raise UnsupportedError(
            f"alpha {alpha} overflows float32 in the lock's displacements", hint="use a smaller alpha"
        )
    if not any(np.any(d) for d in displacements.values()):
        # alpha 0, -0 or one so small that alpha * std rounds to zero in float32: an output that carries the
        # record of a lock and none of its effect would read as locked
        raise InvalidInputError(
            f"alpha {alpha:g} makes every displacement of the lock zero (in float32): the output would carry no lock",
            hint=f"use the lock's default alpha ({lock.default_alpha:g}) or another strength; negative takes a lock "
            "off again",
        )
    return displacements


def head_column_ranges(displacement: np.ndarray, head_dim: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of the o_proj input covering the heads the displacement
    touches, adjacent heads merged."""
    touched = np.flatnonzero(np.any(displacement.reshape(-1, head_dim) != 0, axis=1)).tolist()
    ranges: list[tuple[int, int]] = []
    for head in touched:
        start, stop = head * head_dim, (head + 1) * head_dim
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def output_projection_product(
    row_blocks: Callable[[list[tuple[int, int]]], Iterator[tuple[int, np.ndarray]]],
    rows: int,
    displacement: np.ndarray,
    head_dim: int,
) -> np.ndarray:
    """``W_o @ d`` in float32 over ``rows`` output rows. ``row_blocks(column_ranges)`` yields
    ``(first_row, float32 block)`` of W_o restricted to those input columns, side by side: each
    checkpoint format reads (and dequantizes) its own, the arithmetic is this one."""
    ranges = head_column_ranges(displacement, head_dim)
    result = np.zeros(rows, dtype=np.float32)
    if not ranges:
        return result
    d = np.concatenate([displacement[a:b] for a, b in ranges])
    for row0, block in row_blocks(ranges):
        # einsum, not BLAS's sgemv (block @ d): a matrix-vector product this size is memory-bound and one thread
        # does it in under a millisecond, while OpenBLAS wakes its threads for it, which on a busy machine took
        # 10-30x longer. The summation order differs from BLAS's by float32 rounding, which verify's tolerance
        # (DTYPE_EPS) allows for, as it allows for BLAS's own blocking.
        result[row0 : row0 + block.shape[0]] = np.einsum("ij,j->i", block, d)
    return result


def refuse_no_effect(changed: bool, alpha: float, dtype: str) -> None:
    """An edit whose every locked bias rounds back to what it was (a tiny alpha in F16 or BF16) would publish a
    lock's record with none of its effect: refused, as alpha 0 is (``checked_displacements``)."""
    if not changed:
        raise InvalidInputError(
            f"alpha {alpha:g} changes no stored bias: the lock's contribution rounds away in {dtype}, so the "
            "output would carry no lock",
            hint="use the lock's default alpha or another strength (weightlock inspect LOCK shows it)",
        )


class ProgressBar:
    """tqdm over the o_proj bytes read; closes itself when the last layer is done."""

    def __init__(self, plan):  # any format's plan: its weight_bytes_to_read is the bar's total
        from tqdm import tqdm

        self.bar = tqdm(
            total=plan.weight_bytes_to_read,
            unit="B",
            unit_scale=True,
            desc="reading o_proj weights",
            leave=False,
            disable=None,
        )

    def __call__(self, nbytes: int) -> None:
        self.bar.update(nbytes)
        if self.bar.n >= self.bar.total:
            self.bar.close()
