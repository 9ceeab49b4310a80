"""Edit planning and the bias arithmetic.

``plan_edit`` decides, from headers and config alone, which bias tensors the output
needs, which existing ones they replace and how the config changes; it refuses
anything it cannot do exactly. ``compute_biases`` then reads only the o_proj weights
of the layers the lock touches and computes ``W_o @ d`` in float32, in row blocks,
so memory stays bounded at any model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .architectures import ArchitectureSpec, ModelShape, shape_from_config, spec_for_config
from .checkpoint import Checkpoint
from .errors import CheckpointError, IncompatibleLockError, UnsupportedError
from .lock import Lock
from .safetensors_file import (FLOAT_DTYPES, TensorReader, TensorEntry, float32_to_raw,
                               raw_to_float32)


@dataclass(frozen=True)
class PlannedBias:
    """One bias tensor the output will hold."""

    name: str
    dtype: str
    width: int
    layer: int
    # the o_proj weight whose product with the layer's displacement is added (None: no lock here)
    weight: TensorEntry | None = None
    # the existing bias this one replaces and adds to (None: created, starting from zeros)
    base: TensorEntry | None = None


@dataclass
class EditPlan:
    spec: ArchitectureSpec
    shape: ModelShape
    lock: Lock
    alpha: float
    displacements: dict[int, np.ndarray]
    biases: list[PlannedBias]
    config_patch: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        """Existing tensors the output replaces (they must leave their shards)."""
        return [b.name for b in self.biases if b.base is not None]

    @property
    def weight_bytes_to_read(self) -> int:
        return sum(b.weight.nbytes for b in self.biases if b.weight is not None)


def plan_edit(checkpoint: Checkpoint, lock: Lock, alpha: float, *,
              allow_architecture_mismatch: bool = False) -> EditPlan:
    if not np.isfinite(alpha):
        raise IncompatibleLockError(f"alpha must be a finite number, got {alpha}")
    config = checkpoint.config
    spec = spec_for_config(config)
    shape = shape_from_config(config, spec)
    lock.check_compatible(shape)
    warnings = []
    if lock.source_model.architecture != shape.architecture:
        message = (f"the lock was made from a {lock.source_model.architecture}, "
                   f"the checkpoint is a {shape.architecture}")
        if not allow_architecture_mismatch:
            raise IncompatibleLockError(message, hint="if the two really share activation geometry, "
                                                      "pass --allow-architecture-mismatch")
        warnings.append(message)

    with np.errstate(over="ignore", invalid="ignore"):
        displacements = lock.displacements(alpha, shape.num_heads)
    if not all(np.all(np.isfinite(d)) for d in displacements.values()):
        raise UnsupportedError(f"alpha {alpha} overflows float32 in the lock's displacements",
                               hint="use a smaller alpha")
    bias_on = bool(config.get(spec.bias_flag, False))
    tensors = checkpoint.tensors
    biases: list[PlannedBias] = []
    for layer in range(shape.num_layers):
        weight = _output_weight(checkpoint, spec, shape, layer)
        locked = weight if layer in displacements else None
        out_bias = spec.output_bias(layer)
        if bias_on:
            missing = [n for n in [out_bias] + [spec.projection_name(layer, c.projection, "bias")
                                                for c in spec.bias_companions] if n not in tensors]
            if missing:
                raise CheckpointError(f"config.json sets {spec.bias_flag} but {missing[0]} is missing",
                                      hint="the config and the tensors disagree; restore the checkpoint")
            base = tensors[out_bias]
            if base.shape != (shape.hidden_size,):
                raise CheckpointError(f"{out_bias} has shape {list(base.shape)}, expected [{shape.hidden_size}]")
            if locked is not None:
                biases.append(PlannedBias(out_bias, base.dtype, shape.hidden_size, layer, locked, base))
            continue
        for companion in spec.bias_companions:
            name = spec.projection_name(layer, companion.projection, "bias")
            companion_weight = spec.projection_name(layer, companion.projection, "weight")
            if name in tensors:
                raise CheckpointError(f"{name} is present but config.json has {spec.bias_flag} off, so "
                                      "loaders would drop it",
                                      hint="the config and the tensors disagree; restore the checkpoint")
            if companion_weight not in tensors:
                raise CheckpointError(f"{companion_weight} is missing from the checkpoint",
                                      hint="the checkpoint is incomplete; fetch all its shards")
            biases.append(PlannedBias(name, tensors[companion_weight].dtype, shape.width(companion.width_from),
                                      layer))
        if out_bias in tensors:
            raise CheckpointError(f"{out_bias} is present but config.json has {spec.bias_flag} off",
                                  hint="the config and the tensors disagree; restore the checkpoint")
        biases.append(PlannedBias(out_bias, weight.dtype, shape.hidden_size, layer, locked))
    return EditPlan(spec, shape, lock, float(alpha), displacements, biases,
                    {} if bias_on else {spec.bias_flag: True}, warnings)


def _output_weight(checkpoint: Checkpoint, spec: ArchitectureSpec, shape: ModelShape,
                   layer: int) -> TensorEntry:
    name = spec.output_weight(layer)
    entry = checkpoint.tensors.get(name)
    if entry is None:
        raise CheckpointError(f"the checkpoint has no {name}",
                              hint="the checkpoint is incomplete or not of the architecture its config names")
    expected = (shape.hidden_size, shape.attention_width)
    if entry.shape != expected:
        raise CheckpointError(f"{name} has shape {list(entry.shape)} but config.json implies {list(expected)}",
                              hint="the config and the tensors disagree; restore the checkpoint")
    if entry.dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"{name} is stored as {entry.dtype}",
                               hint="weightlock edits F32, F16 and BF16 checkpoints; quantize after locking")
    return entry


@dataclass
class ComputedBias:
    planned: PlannedBias
    values: np.ndarray  # float32, before rounding to the stored dtype
    raw: bytes          # rounded to planned.dtype


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


def output_projection_product(reader: TensorReader, weight: TensorEntry, displacement: np.ndarray,
                              head_dim: int) -> np.ndarray:
    """``W_o @ d`` in float32, reading W_o in row blocks and only the touched heads' columns."""
    ranges = head_column_ranges(displacement, head_dim)
    result = np.zeros(weight.shape[0], dtype=np.float32)
    if not ranges:
        return result
    d = np.concatenate([displacement[a:b] for a, b in ranges])
    for row0, block in reader.row_blocks(weight, ranges):
        result[row0:row0 + block.shape[0]] = block @ d
    return result


def compute_biases(plan: EditPlan, progress: Callable[[int], None] | None = None) -> list[ComputedBias]:
    """Every planned bias's values. Reads only the weights and biases the plan names.

    ``progress`` is called with the bytes of each o_proj weight once it has been read.
    """
    maps: dict = {}

    def reader(entry: TensorEntry) -> TensorReader:
        if entry.path not in maps:
            maps[entry.path] = TensorReader(entry.path)
        return maps[entry.path]

    locked_weights = [b.weight for b in plan.biases if b.weight is not None]
    out = []
    try:
        for planned in plan.biases:
            values = np.zeros(planned.width, dtype=np.float32)
            if planned.base is not None:
                values += reader(planned.base).read_float32(planned.base)
            if planned.weight is not None:
                position = locked_weights.index(planned.weight)
                if position + 1 < len(locked_weights):  # overlap the next layer's read with this one
                    following = locked_weights[position + 1]
                    reader(following).prefetch(following)
                with np.errstate(over="ignore", invalid="ignore"):
                    values += output_projection_product(reader(planned.weight), planned.weight,
                                                        plan.displacements[planned.layer],
                                                        plan.shape.head_dim)
                if progress is not None:
                    progress(planned.weight.nbytes)
            if not np.all(np.isfinite(values)):
                raise CheckpointError(f"{planned.name} would not be finite: the layer's o_proj weights "
                                      "(or its existing bias) hold NaN or Inf, or alpha is too large for them",
                                      hint="check the checkpoint (weightlock verify --deep), or use a smaller alpha")
            raw = float32_to_raw(values, planned.dtype)
            if not np.all(np.isfinite(raw_to_float32(raw, planned.dtype))):
                raise UnsupportedError(f"{planned.name} overflows {planned.dtype} at alpha {plan.alpha}",
                                       hint="use a smaller alpha")
            out.append(ComputedBias(planned, values, raw))
    finally:
        for m in maps.values():
            m.close()
    return out
