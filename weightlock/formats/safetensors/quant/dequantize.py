"""Dequantizing quantized linear layers (:mod:`.layouts` describes them): only the columns of the heads a
lock touches, a bounded block at a time, as float32.

Why hand-written: the reference implementations (vLLM's kernels and ``quant_utils``, AutoAWQ's
``dequantize_gemm``, the compressed-tensors library, transformers' ``Fp8Dequantize``, mlx's ``mx.dequantize``)
take torch or mlx arrays of a whole weight in memory, and mlx (a compiled package for Apple silicon and a few
Linux builds) is not something the tool may depend on. weightlock reads only the rows holding the touched heads'
columns, block by block, so memory stays flat at any size. Each dequantizer is tested against those references
(tests/test_quantized.py; MLX's affine unpacking against ``mx.dequantize`` in tests/test_mlx_quantized.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from weightlock.core.edit import head_column_ranges
from weightlock.errors import CheckpointError, UnsupportedError

if TYPE_CHECKING:  # the layer's description; imported by it, so only for the type checker
    from weightlock.formats.safetensors.quant.layouts import QuantizedLinear
from weightlock.io.safetensors_file import BLOCK_TARGET_BYTES, TensorReaders, to_float32

_NIBBLE_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)
# AWQ packs the 8 columns of each int32 in the order 0,2,4,6,1,3,5,7: nibble i holds column AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = np.argsort(AWQ_ORDER)


def _e4m3_table() -> np.ndarray:
    """float32 value of each FP8 e4m3fn byte (bias 7, no infinities, S.1111.111 NaN)."""
    byte = np.arange(256)
    exponent, mantissa = (byte >> 3) & 0xF, byte & 7
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    value[(exponent == 15) & (mantissa == 7)] = np.nan
    return np.where(byte & 0x80, -value, value).astype(np.float32)


E4M3_VALUES = _e4m3_table()


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 8]: nibble i (bits 4i..4i+3) of each word at index i."""
    words = packed.view(np.uint32)[..., None]
    return ((words >> _NIBBLE_SHIFTS) & 0xF).astype(np.uint8)


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """AWQ int32 [rows, n] -> uint8 [rows, 8n] in column order."""
    nibbles = unpack_nibbles(packed)[..., _AWQ_UNDO]
    return nibbles.reshape(packed.shape[0], -1)


def gptq_unpack_rows(packed: np.ndarray) -> np.ndarray:
    """GPTQ int32 [rows/8, n] -> uint8 [rows, n]: nibble i of word r holds row 8r + i."""
    nibbles = unpack_nibbles(packed)  # [rows/8, n, 8]
    return nibbles.transpose(0, 2, 1).reshape(-1, packed.shape[1])


def sequential_unpack_columns(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, n] -> uint8 [rows, 8n]: nibble i of word c holds column 8c + i (GPTQ qzeros,
    compressed-tensors weight_packed)."""
    return unpack_nibbles(packed).reshape(packed.shape[0], -1)


# Bytes of working memory per weight element dequantized: the codes, and float32 values, scales and their product.
WORK_BYTES_PER_ELEMENT = 16


def _input_chunks(ranges, outputs: int, multiple: int) -> Iterator[tuple[int, int]]:
    """[start, stop) input rows, within the column ranges, a block's worth at a time (a multiple of ``multiple``)."""
    step = max(multiple, (BLOCK_TARGET_BYTES // max(WORK_BYTES_PER_ELEMENT * outputs, 1)) // multiple * multiple)
    for a, b in ranges:
        for start in range(a, b, step):
            yield start, min(b, start + step)


# Each format yields ``(first_row, first_column, block)``: float32 blocks of W restricted to the column ranges
# (columns numbered as the ranges' columns side by side), a bounded number of bytes at a time, together
# covering it once. AWQ and GPTQ store W transposed, so their blocks are column slabs of every row; the
# others' are row slabs of the touched columns.
Blocks = Iterator[tuple[int, int, np.ndarray]]


def _awq_blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    outputs, inputs = layer.shape
    qweight, qzeros, scales = layer.parts["qweight"], layer.parts["qzeros"], layer.parts["scales"]
    group = inputs if layer.settings.group_size == -1 else layer.settings.group_size
    column = 0
    for start, stop in _input_chunks(ranges, outputs, 1):
        q = awq_unpack(readers[qweight].read_rows(qweight, start, stop - start))
        first, last = start // group, (stop - 1) // group + 1
        z = awq_unpack(readers[qzeros].read_rows(qzeros, first, last - first))
        s = to_float32(readers[scales].read_rows(scales, first, last - first), scales.dtype)
        rows = np.arange(start, stop) // group - first
        yield 0, column, ((q.astype(np.float32) - z[rows]) * s[rows]).T
        column += stop - start


def _gptq_blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    outputs, inputs = layer.shape
    settings = layer.settings
    qweight, qzeros, scales = layer.parts["qweight"], layer.parts["qzeros"], layer.parts["scales"]
    group = inputs if settings.group_size == -1 else settings.group_size
    _check_packed_ranges(layer, ranges)
    g_idx = layer.parts.get("g_idx")
    every_group = None
    # act-order: any row may use any group, and groups are few (inputs / group rows): all read once
    if g_idx is not None and settings.act_order:
        every_group = (
            None if settings.symmetric else readers[qzeros].read_rows(qzeros),
            to_float32(readers[scales].read_rows(scales), scales.dtype),
        )
    column = 0
    for start, stop in _input_chunks(ranges, outputs, 8):
        q = gptq_unpack_rows(readers[qweight].read_rows(qweight, start // 8, (stop - start) // 8))
        if every_group is not None:
            assert g_idx is not None
            packed_zeros, s = every_group
            index = readers[g_idx].read_rows(g_idx, start, stop - start).astype(np.int64)
            if index.min(initial=0) < 0 or index.max(initial=0) >= s.shape[0]:
                raise layer_error(layer.module, "g_idx names a group beyond the stored scales")
        else:
            if g_idx is not None:  # without act-order vLLM never reads g_idx, gptqmodel would: they must agree
                stored = readers[g_idx].read_rows(g_idx, start, stop - start)
                if not np.array_equal(stored, np.arange(start, stop) // group):
                    raise layer_error(layer.module, "g_idx reorders the groups but desc_act is false; loaders disagree")
            first, last = start // group, (stop - 1) // group + 1
            index = np.arange(start, stop) // group - first
            packed_zeros = None if settings.symmetric else readers[qzeros].read_rows(qzeros, first, last - first)
            s = to_float32(readers[scales].read_rows(scales, first, last - first), scales.dtype)
        if packed_zeros is None:  # symmetric: vLLM subtracts 8 and never reads qzeros (v1 checkpoints store 7)
            w = (q.astype(np.float32) - 8) * s[index]
        else:  # v1 stores z - 1
            z = sequential_unpack_columns(packed_zeros).astype(np.float32) + 1
            w = (q.astype(np.float32) - z[index]) * s[index]
        yield 0, column, w.T
        column += stop - start


def _check_packed_ranges(layer: QuantizedLinear, ranges) -> None:
    if any(a % 8 or b % 8 for a, b in ranges):
        raise UnsupportedError(
            f"{layer.name}: the heads' columns do not start on the format's 8-column packing",
            hint="weightlock reads packed int4 o_proj weights whose head_dim is a multiple of 8",
        )


def _output_rows(rows: int, row_work_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_TARGET_BYTES // max(row_work_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _compressed_tensors_blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    packed, scales, stored_shape = (layer.parts[k] for k in ("weight_packed", "weight_scale", "weight_shape"))
    declared = readers[stored_shape].read_rows(stored_shape).tolist()
    if declared != list(layer.shape):
        raise layer_error(layer.module, f"weight_shape says {declared}, the packed weight holds {list(layer.shape)}")
    _check_packed_ranges(layer, ranges)
    group = layer.shape[1] if layer.settings.group_size == -1 else layer.settings.group_size
    columns = np.concatenate([np.arange(a, b) for a, b in ranges]) // group
    for start, stop in _output_rows(layer.shape[0], layer.shape[1] * WORK_BYTES_PER_ELEMENT):
        words = readers[packed].read_rows(packed, start, stop - start)
        words = np.concatenate([words[:, a // 8 : b // 8] for a, b in ranges], axis=1)
        q = sequential_unpack_columns(words).astype(np.float32) - 8
        s = to_float32(readers[scales].read_rows(scales, start, stop - start), scales.dtype)
        yield start, 0, q * s[:, columns]


def _fp8_blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    weight, scale_entry = layer.parts["weight"], layer.parts[layer.settings.format.tensors[1]]
    outputs, inputs = layer.shape
    grid_rows, grid_cols = fp8_scale_grid(scale_entry.shape, outputs, inputs)
    grid = to_float32(readers[scale_entry].read_rows(scale_entry), scale_entry.dtype).reshape(grid_rows, grid_cols)
    block_rows, block_cols = outputs // grid_rows, inputs // grid_cols
    columns = np.concatenate([np.arange(a, b) for a, b in ranges]) // block_cols
    for start, stop in _output_rows(outputs, inputs * WORK_BYTES_PER_ELEMENT):
        raw = readers[weight].read_rows(weight, start, stop - start)
        raw = np.concatenate([raw[:, a:b] for a, b in ranges], axis=1)
        yield start, 0, E4M3_VALUES[raw] * grid[np.arange(start, stop) // block_rows][:, columns]


def mlx_codes(words: np.ndarray, bits: int, columns: np.ndarray) -> np.ndarray:
    """MLX affine codes of ``columns`` from packed rows: uint32 [rows, in * bits / 32] -> uint32 [rows, len].
    Each row is one bit stream, least significant bit first, over its little-endian uint32 words: code j takes
    bits [j * bits, (j + 1) * bits), crossing into the next word for 3, 5 and 6 bits (as ``mx.quantize`` packs)."""
    first = columns.astype(np.int64) * bits
    word, shift = first // 32, (first % 32).astype(np.uint64)
    padded = np.concatenate([words.astype(np.uint64), np.zeros((words.shape[0], 1), np.uint64)], axis=1)
    pairs = padded[:, word] | (padded[:, word + 1] << np.uint64(32))
    return ((pairs >> shift) & np.uint64((1 << bits) - 1)).astype(np.uint32)


def _mlx_blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    """MLX affine (mlx-lm's QuantizedLinear): w = q * scale + bias per group of ``group_size`` inputs, computed
    in float32 from the stored scales and biases (mx.dequantize rounds q * scale and the sum to the scales'
    dtype; the float32 values are the ones that dtype's arithmetic rounds)."""
    weight, scales, biases = (layer.parts[k] for k in ("weight", "scales", "biases"))
    columns = np.concatenate([np.arange(a, b) for a, b in ranges])
    groups = columns // layer.settings.group_size
    for start, stop in _output_rows(layer.shape[0], layer.shape[1] * 3 * WORK_BYTES_PER_ELEMENT):  # uint64 pairs
        q = mlx_codes(readers[weight].read_rows(weight, start, stop - start), layer.settings.bits, columns)
        s = to_float32(readers[scales].read_rows(scales, start, stop - start), scales.dtype)[:, groups]
        z = to_float32(readers[biases].read_rows(biases, start, stop - start), biases.dtype)[:, groups]
        yield start, 0, q.astype(np.float32) * s + z


_BLOCKS = {
    "awq": _awq_blocks,
    "gptq": _gptq_blocks,
    "compressed-tensors/pack-quantized": _compressed_tensors_blocks,
    "compressed-tensors/float-quantized": _fp8_blocks,
    "fp8": _fp8_blocks,
    "mlx": _mlx_blocks,
}


def _blocks(layer: QuantizedLinear, readers: TensorReaders, ranges) -> Blocks:
    try:
        yield from _BLOCKS[layer.settings.format.name](layer, readers, ranges)
    finally:
        # one reader stays open per shard while a lock's layers are read; a buffer held by each would
        # multiply peak memory by the number of shards touched
        for entry in layer.entries:
            readers[entry].release_buffer()


def quantized_product(layer: QuantizedLinear, readers: TensorReaders, displacement: np.ndarray, head_dim: int):
    """``W @ displacement`` in float32, dequantizing only the columns of the heads it touches."""
    ranges = head_column_ranges(displacement, head_dim)
    result = np.zeros(layer.shape[0], dtype=np.float32)
    if not ranges:
        return result
    d = np.concatenate([displacement[a:b] for a, b in ranges])
    for row, column, block in _blocks(layer, readers, ranges):
        result[row : row + block.shape[0]] += block @ d[column : column + block.shape[1]]
    return result


def dequantize(layer: QuantizedLinear, readers: TensorReaders, columns: tuple[int, int] | None = None) -> np.ndarray:
    """W (or the columns ``[start, stop)`` of it) as float32 [out, in]: for tests and small models."""
    start, stop = columns if columns is not None else (0, layer.shape[1])
    out = np.zeros((layer.shape[0], stop - start), dtype=np.float32)
    for row, column, block in _blocks(layer, readers, [(start, stop)]):
        out[row : row + block.shape[0], column : column + block.shape[1]] = block
    return out


def bytes_read_by_product(layer: QuantizedLinear, displacement: np.ndarray, head_dim: int) -> int:
    """The bytes ``product`` reads: a transposed weight only the touched heads' rows (and their groups' zeros
    and scales), any other all of its tensors."""
    ranges = head_column_ranges(displacement, head_dim)
    if not ranges:
        return 0
    if not layer.settings.format.transposed:
        return layer.nbytes
    outputs, inputs = layer.shape
    group = inputs if layer.settings.group_size == -1 else layer.settings.group_size
    qweight, qzeros, scales = layer.parts["qweight"], layer.parts["qzeros"], layer.parts["scales"]
    g_idx = layer.parts.get("g_idx")
    act_order = g_idx is not None and layer.settings.act_order
    gptq = layer.settings.format.name == "gptq"
    # symmetric GPTQ never reads its zeros; AWQ always has zero points
    per_group = scales.nbytes // scales.shape[0] + (
        0 if gptq and layer.settings.symmetric else qzeros.nbytes // qzeros.shape[0]
    )
    total = per_group * scales.shape[0] if act_order else 0
    for start, stop in _input_chunks(ranges, outputs, 8 if gptq else 1):
        total += (stop - start) * qweight.nbytes // inputs  # the chunk's share of the packed codes
        total += (stop - start) * 4 if g_idx is not None else 0
        if not act_order:
            total += ((stop - 1) // group + 1 - start // group) * per_group
    return total


def layer_error(module: str, what: str) -> CheckpointError:
    """A quantized layer whose tensors contradict each other or the config (also raised while dequantizing)."""
    return CheckpointError(
        f"{module}: {what}", hint="the checkpoint's tensors disagree with its quantization_config; restore it"
    )


def fp8_scale_grid(scale_shape: tuple[int, ...], outputs: int, inputs: int) -> tuple[int, int]:
    """The (rows, columns) grid of FP8 scales as transformers reads it: [] and [1] one scale; 2-D [r, c]
    blocks of outputs/r x inputs/c (per channel: [out, 1]). A grid that does not divide the weight exactly,
    or a 1-D per-channel vector (transformers would read it as one scale), is refused."""
    if scale_shape in ((), (1,)):
        return 1, 1
    if len(scale_shape) != 2 or 0 in scale_shape or outputs % scale_shape[0] or inputs % scale_shape[1]:
        raise CheckpointError(
            f"FP8 scales of shape {list(scale_shape)} do not tile a [{outputs}, {inputs}] weight",
            hint="the checkpoint's scales disagree with its weights; restore it",
        )
    return scale_shape[0], scale_shape[1]
