"""Reading and writing safetensors files without loading them.

Headers are parsed here, strictly, rather than trusted to a library: tensor names,
dtypes, shapes and byte ranges come from the header alone, and every range is
checked against the file before any data is touched. Tensor data is read by exact
byte range in row blocks into one reused buffer, so reading a multi-gigabyte tensor
keeps memory at one block. Writing streams each tensor's bytes from its source, so
rewriting a shard never holds it in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.io.untrusted import open_regular, parse_json

# The safetensors library refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
# Shapes and offsets are u64 (usize) in the safetensors library: a larger number is not a valid header there,
# and element counts are multiplied left to right with overflow checks. The same rules here, so a file is
# accepted exactly when the loaders' library accepts it (tests compare both on every malformed case), and
# the arithmetic stays on machine-sized numbers (a header of huge dims once cost seconds per megabyte).
U64_LIMIT = 1 << 64
HEADER_ALIGNMENT = 8
COPY_CHUNK_BYTES = 16 << 20
BLOCK_TARGET_BYTES = 32 << 20

# dtype name -> bytes per element. Sub-byte and exotic dtypes are refused as unknown.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# dtypes whose values weightlock can read as real numbers (float32 arithmetic).
FLOAT_DTYPES = ("F32", "F16", "BF16")
RAW_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "F8_E4M3": np.uint8,  # raw bytes; weightlock.formats.safetensors.quant decodes them
    "BOOL": np.bool_,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: absolute offsets into ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    file_size: int
    header_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def header_sha256(self) -> str:
        """sha256 of the length prefix and header: identifies a shard without reading its data."""
        import hashlib

        with os.fdopen(open_regular(self.path, "safetensors file"), "rb") as f:
            return hashlib.sha256(f.read(self.data_start)).hexdigest()


def _reject_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header; no tensor data is read. Only a regular file is opened."""
    path = Path(path)
    fd = open_regular(path, "safetensors file")
    try:
        with os.fdopen(fd, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            return _parse_header(f, path, file_size)
    except OSError as e:
        raise CheckpointError(
            f"cannot read {path}: {e.strerror or e}", hint="check that the file exists and is readable"
        ) from None


def checked_byte_count(shape: list, dtype: str) -> int | None:
    """Bytes a tensor of ``shape`` and ``dtype`` needs, computed as the safetensors library does (each
    dim below 2^64, the element count multiplied left to right, each step below 2^64), or None where
    the library refuses the shape."""
    count = 1
    for dim in shape:
        if dim >= U64_LIMIT:
            return None
        count *= dim
        if count >= U64_LIMIT:
            return None
    nbytes = count * DTYPE_SIZES[dtype]
    return nbytes if nbytes < U64_LIMIT else None


def _parse_header(f: BinaryIO, path: Path, file_size: int) -> SafetensorsHeader:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path.name} is not a valid safetensors file: {what}",
            hint="the file may be truncated or corrupt; download or export it again",
        )

    if file_size < 8:
        raise bad(f"only {file_size} bytes, shorter than the 8-byte header length")
    (header_size,) = struct.unpack("<Q", f.read(8))
    if header_size > MAX_HEADER_BYTES:
        raise bad(f"declared header of {header_size} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_size > file_size:
        raise bad(f"declared header of {header_size} bytes runs past the end of the {file_size}-byte file")
    raw = f.read(header_size)
    if len(raw) != header_size:
        raise bad("the file ended inside its header")
    try:
        header = parse_json(raw, "the header", object_pairs_hook=_reject_duplicate_keys)
    except CheckpointError as e:
        raise bad(e.message) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    # Absent or null is no metadata; anything else must map strings to strings (the library refuses a list).
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + header_size
    data_size = file_size - data_start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {_short(name)} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {_short(name)} has unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {_short(name)} has an invalid shape {_short(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o < U64_LIMIT for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {_short(name)} has invalid data_offsets {_short(offsets)}")
        expected = checked_byte_count(shape, dtype)
        if expected is None:
            raise bad(f"tensor {_short(name)}: shape {_short(shape)} overflows a 64-bit size")
        if offsets[1] - offsets[0] != expected:
            raise bad(
                f"tensor {_short(name)}: shape {_short(shape)} of {dtype} needs {expected} bytes, "
                f"data_offsets span {offsets[1] - offsets[0]}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1]))

    # The data area must be tiled exactly: no overlaps, gaps, or bytes past the end.
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps another tensor" if entry.begin < position else "leaves a gap before it"
            raise bad(
                f"tensor {_short(entry.name)} {what} (offset {entry.begin - data_start}, "
                f"expected {position - data_start})"
            )
        position = entry.end
    if position != file_size:
        if position > file_size:
            raise bad(
                f"tensor data runs past the end of the file ({position - data_start} bytes "
                f"declared, {data_size} present)"
            )
        raise bad(f"{file_size - position} bytes after the last tensor are not described by the header")
    return SafetensorsHeader(path, file_size, header_size, metadata, {e.name: e for e in entries})


def _short(value, limit: int = 80) -> str:
    """A value from a hostile header, quoted and cut short for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


# ---------------------------------------------------------------------------------------
# Reading values


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact conversion of a raw block (as viewed by ``raw_view``) to float32."""
    if dtype == "F32":
        # Always a copy: a view would keep the memory map (and its pages) alive.
        return np.array(raw, dtype=np.float32, copy=True)
    if dtype == "F16":
        return raw.astype(np.float32)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, no rounding involved (shifted in place: one
        # array, not two, of a block that can be 32 MiB)
        widened = raw.astype(np.uint32)
        widened <<= 16
        return widened.view(np.float32)
    raise UnsupportedError(
        f"tensor dtype {dtype} cannot be read as floating point",
        hint="weightlock edits F32, F16 and BF16 checkpoints; dequantize the attention output weights first",
    )


def columns_float32(raw: np.ndarray, column_ranges: list[tuple[int, int]], dtype: str) -> np.ndarray:
    """The ``[start, stop)`` column ranges of a raw 2-D block, side by side, as float32: the same values as
    ``to_float32(np.concatenate(ranges))``, with each range widened straight into the result (one new array, not
    three: on a lock's few heads per layer the copies, not the arithmetic, were the cost)."""
    if dtype not in ("F32", "F16", "BF16"):
        return to_float32(np.concatenate([raw[:, a:b] for a, b in column_ranges], axis=1), dtype)
    width = sum(b - a for a, b in column_ranges)
    out: np.ndarray = np.empty((raw.shape[0], width), dtype=np.uint32 if dtype == "BF16" else np.float32)
    at = 0
    for a, b in column_ranges:
        out[:, at : at + b - a] = raw[:, a:b]  # uint16 -> uint32 and float16 -> float32 are exact
        at += b - a
    if dtype == "BF16":
        np.left_shift(out, 16, out=out)  # bfloat16 is the top half of a float32
        return out.view(np.float32)
    return out


def raw_to_float32(data: bytes, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of a float tensor as a flat float32 array."""
    return to_float32(np.frombuffer(data, dtype=RAW_NUMPY[dtype]), dtype)


def float32_to_raw(values: np.ndarray, dtype: str) -> bytes:
    """Round float32 values to ``dtype`` (round-to-nearest-even, as torch does) as raw bytes."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values.tobytes()
    if dtype == "F16":
        with np.errstate(over="ignore"):  # overflow to inf is checked by the caller
            return values.astype(np.float16).tobytes()
    if dtype == "BF16":
        bits = values.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16).tobytes()
    raise UnsupportedError(f"cannot write values as {dtype}", hint="weightlock writes F32, F16 and BF16 biases")


# Linux caps one POSIX_FADV_WILLNEED at the device's readahead window (max of read_ahead_kb and max_sectors_kb:
# often 128 KiB to 8 MiB) and silently drops the rest, so a 32 MiB prefetch in one call read its first few MiB
# only. Asked in pieces no larger than the smallest common window, the whole range is read in the background.
PREFETCH_PIECE_BYTES = 128 << 10


def prefetch_range(fd: int, begin: int, nbytes: int) -> None:
    """Ask the kernel to read ``[begin, begin + nbytes)`` of ``fd`` into the page cache, without waiting."""
    end = begin + nbytes
    for offset in range(begin, end, PREFETCH_PIECE_BYTES):
        os.posix_fadvise(fd, offset, min(PREFETCH_PIECE_BYTES, end - offset), os.POSIX_FADV_WILLNEED)


class ReadBuffer:
    """The reused buffer positional reads land in. Every read copies out of it before the next one (row_blocks
    converts each block to float32, read_bytes and read_rows copy), so readers of one TensorReaders, used from
    one thread, can share it: memory stays at one block however many shards are open, and the buffer's pages
    are faulted in once, not once per layer."""

    def __init__(self):
        self._data = bytearray()

    def view(self, nbytes: int) -> memoryview:
        if len(self._data) < nbytes:
            self._data = bytearray(nbytes)  # replaced, not resized: a view still held elsewhere stays valid
        return memoryview(self._data)[:nbytes]

    def release(self) -> None:
        self._data = bytearray()


# One idle ReadBuffer kept for the next TensorReaders of this process: a fresh 32 MiB buffer costs its page faults
# (30-40 ms on a VM, as long as reading the layer from the page cache), and tune's bakes and apply's verify open
# readers over and over. At most one block is kept; a larger buffer (a whole big tensor read at once) is freed.
_idle: list[ReadBuffer] = []
_idle_lock = threading.Lock()


def _borrow_buffer() -> ReadBuffer:
    with _idle_lock:
        return _idle.pop() if _idle else ReadBuffer()


def _return_buffer(buffer: ReadBuffer) -> None:
    with _idle_lock:
        if not _idle and len(buffer._data) <= BLOCK_TARGET_BYTES:
            _idle.append(buffer)
            return
    buffer.release()


class TensorReader:
    """Reads tensor data from one file by exact byte range, into one reused buffer.

    Why not a memory map: pages of a file mapping count towards the resident set once
    touched, and the kernel's readahead (8 MB on some disks) reads past each tensor into
    its neighbours. Positional reads of exactly the rows needed, with readahead switched
    off on the descriptor and the next block prefetched by POSIX_FADV_WILLNEED, read only
    the bytes asked for, overlap I/O with compute, and keep memory at one block.
    """

    def __init__(self, path: Path, what: str = "safetensors file", buffer: ReadBuffer | None = None):
        self.path = path
        self._fd = open_regular(path, what)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        # shared: the readers of one TensorReaders read into one buffer (see ReadBuffer)
        self._shared = buffer is not None
        self._buf = buffer if buffer is not None else ReadBuffer()
        self.bytes_read = 0  # tensor bytes read through this reader

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_into(self, begin: int, nbytes: int) -> memoryview:
        self.bytes_read += nbytes
        view = self._buf.view(nbytes)
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], begin + done)
            if n == 0:
                raise CheckpointError(
                    f"{self.path.name} ended while reading (file truncated?)",
                    hint="the file changed or is damaged; restore it from the original",
                )
            done += n
        return view

    def prefetch(self, entry: TensorEntry) -> None:
        """Start reading ``entry`` into the page cache in the background (no memory of ours)."""
        prefetch_range(self._fd, entry.begin, entry.nbytes)

    def row_blocks(
        self,
        entry: TensorEntry,
        column_ranges: list[tuple[int, int]] | None = None,
        block_bytes: int = BLOCK_TARGET_BYTES,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, float32 block)`` over a 2-D tensor.

        ``column_ranges``: only these [start, stop) column ranges, side by side (slices,
        not an index array: copying contiguous runs is several times faster than a gather).
        """
        if len(entry.shape) != 2:
            raise CheckpointError(
                f"{entry.name} should be 2-D, has shape {list(entry.shape)}",
                hint="the checkpoint is not of the architecture its config names",
            )
        rows, cols = entry.shape
        if rows == 0 or cols == 0:  # nothing to read; a huge row count of width 0 must not cost a loop
            return
        row_bytes = cols * DTYPE_SIZES[entry.dtype]
        rows_per_block = max(1, block_bytes // max(row_bytes, 1))
        raw_dtype = RAW_NUMPY[entry.dtype]
        for row0 in range(0, rows, rows_per_block):
            n = min(rows_per_block, rows - row0)
            begin = entry.begin + row0 * row_bytes
            if row0 + n < rows:
                following = min(rows_per_block, rows - row0 - n) * row_bytes
                prefetch_range(self._fd, begin + n * row_bytes, following)
            raw: np.ndarray = np.frombuffer(self._read_into(begin, n * row_bytes), dtype=raw_dtype).reshape(n, cols)
            if column_ranges is not None:
                yield row0, columns_float32(raw, column_ranges, entry.dtype)  # a new array: the buffer is reused
            else:
                yield row0, to_float32(raw, entry.dtype)  # always a copy: the buffer is reused
            del raw
        self.release_buffer()

    def release_buffer(self) -> None:
        """Drop a reader's own read buffer: one reader stays open per shard while a lock's layers are read, and a
        block buffer held by each would multiply peak memory by the number of shards touched. A buffer shared by
        the readers of a TensorReaders is one block whatever the shard count, so it is kept for the next read
        (allocating and faulting in a fresh 32 MiB per layer cost more than reading the layer from the page
        cache) and dropped when the TensorReaders closes."""
        if not self._shared:
            self._buf.release()

    def read_bytes(self, entry: TensorEntry) -> bytes:
        return bytes(self._read_into(entry.begin, entry.nbytes))

    def read_range(self, entry: TensorEntry, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the tensor's data (offsets within the tensor, bounded by it)."""
        if not 0 <= start <= end <= entry.nbytes:
            raise CheckpointError(
                f"{entry.name}: bytes {start}..{end} lie outside the tensor's {entry.nbytes}",
                hint="the checkpoint's header and config disagree; restore it",
            )
        return bytes(self._read_into(entry.begin + start, end - start))

    def read_rows(self, entry: TensorEntry, row0: int = 0, rows: int | None = None) -> np.ndarray:
        """Rows ``[row0, row0 + rows)`` of a tensor (all of them by default) as a copy in its raw numpy dtype
        (packed integers, FP8 bytes), shaped as stored. Quantized formats decode them themselves."""
        shape = entry.shape if entry.shape else (1,)
        row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[entry.dtype]
        rows = shape[0] - row0 if rows is None else rows
        if not 0 <= row0 <= row0 + rows <= shape[0]:
            raise CheckpointError(
                f"rows {row0}..{row0 + rows} are outside {entry.name} {list(entry.shape)}",
                hint="the checkpoint's tensors disagree with its quantization settings",
            )
        view = self._read_into(entry.begin + row0 * row_bytes, rows * row_bytes)
        return np.frombuffer(view, dtype=RAW_NUMPY[entry.dtype]).reshape(rows, *shape[1:]).copy()

    def read_float32(self, entry: TensorEntry) -> np.ndarray:
        """A whole (small) tensor as float32, e.g. a bias vector."""
        return raw_to_float32(self.read_bytes(entry), entry.dtype).reshape(entry.shape)


class TensorReaders:
    """One open TensorReader per file, all closed on exit: ``with TensorReaders() as readers: readers[entry]``."""

    def __init__(self):
        self._open: dict[Path, TensorReader] = {}
        self._buffer = _borrow_buffer()  # one block for all the shards' readers

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read through every reader so far."""
        return sum(reader.bytes_read for reader in self._open.values())

    def __getitem__(self, entry: TensorEntry) -> TensorReader:
        if entry.path not in self._open:
            self._open[entry.path] = TensorReader(entry.path, buffer=self._buffer)
        return self._open[entry.path]

    def __enter__(self) -> TensorReaders:
        return self

    def __exit__(self, *exc) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
        _return_buffer(self._buffer)
        self._buffer = ReadBuffer()  # a reader used after closing gets a buffer of its own, not the pooled one


# ---------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TensorData:
    """A tensor to write whose bytes are in memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ConcatenatedTensor:
    """A tensor to write whose bytes are other stored tensors' bytes, one after another (e.g. per-expert
    weights stacked into one 3-D tensor): copied piece by piece, never held in memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(piece.nbytes for piece in self.pieces)

    @property
    def path(self) -> Path:  # where it is written beside: the shard of its first piece
        return self.pieces[0].path

    @property
    def begin(self) -> int:
        return self.pieces[0].begin


@dataclass
class GrownTensor:
    """A 2-D tensor to write as a stored one with rows (``axis`` 0) or columns (``axis`` 1) appended: the
    stored bytes are copied in order, block by block, never held whole, and ``digest`` receives exactly them
    (the sha256 of the stored tensor, which the edit's record keeps so verify can prove them unchanged)."""

    name: str
    base: TensorEntry
    extra: bytes  # the appended rows, or per row its appended columns, row after row, in the base's dtype
    axis: int
    digest: Any = None  # a hashlib.sha256, set when written

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        rows, columns = self.base.shape
        added = len(self.extra) // DTYPE_SIZES[self.dtype] // (1 if self.axis == 0 else rows)
        return (rows + added // columns, columns) if self.axis == 0 else (rows, columns + added)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + len(self.extra)

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def begin(self) -> int:
        return self.base.begin


TensorSource = TensorData | TensorEntry | ConcatenatedTensor | GrownTensor  # entries and pieces are copied


def encode_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """The length-prefixed, 8-byte aligned header for ``(name, dtype, shape)`` laid out in order;
    returns it and the size of the data area that must follow."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded, offset


def _write_grown(out: BinaryIO, grown: GrownTensor, sources: dict[Path, BinaryIO]) -> int:
    import hashlib

    base = grown.base
    src = sources.get(base.path)
    if src is None:
        src = sources[base.path] = open(base.path, "rb")
    src.seek(base.begin)
    digest = grown.digest = hashlib.sha256()
    rows = base.shape[0]
    row_bytes = base.nbytes // rows if rows else 0
    extra_per_row = len(grown.extra) // rows if grown.axis == 1 and rows else 0
    block = max(1, COPY_CHUNK_BYTES // max(1, row_bytes))
    written = 0
    for first in range(0, rows, block):
        count = min(block, rows - first)
        chunk = src.read(count * row_bytes)
        if len(chunk) != count * row_bytes:
            raise CheckpointError(
                f"{base.path.name} ended while copying {base.name}",
                hint="the file changed or is damaged; restore it from the original",
            )
        digest.update(chunk)
        if grown.axis == 1:
            extra = grown.extra[first * extra_per_row : (first + count) * extra_per_row]
            stored = np.frombuffer(chunk, dtype=np.uint8).reshape(count, row_bytes)
            added = np.frombuffer(extra, dtype=np.uint8).reshape(count, extra_per_row)
            chunk = np.concatenate([stored, added], axis=1).tobytes()
        out.write(chunk)
        written += len(chunk)
    if grown.axis == 0:
        out.write(grown.extra)
        written += len(grown.extra)
    return written


def write_safetensors(path: Path, tensors: Iterable[TensorSource], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, streaming file-backed tensors; returns bytes written.

    The file is flushed and fsynced before returning so that a later rename of its
    folder publishes complete data.
    """
    tensors = list(tensors)
    for t in tensors:
        nbytes = len(t.data) if isinstance(t, TensorData) else t.nbytes
        if nbytes != math.prod(t.shape) * DTYPE_SIZES[t.dtype]:
            raise ValueError(f"{t.name}: {nbytes} bytes do not match shape {t.shape} of {t.dtype}")
    header, _ = encode_header(((t.name, t.dtype, t.shape) for t in tensors), metadata)
    written = 0
    sources: dict[Path, BinaryIO] = {}
    try:
        with open(path, "xb") as out:
            out.write(header)
            written += len(header)
            for t in tensors:
                if isinstance(t, TensorData):
                    out.write(t.data)
                    written += len(t.data)
                    continue
                if isinstance(t, GrownTensor):
                    written += _write_grown(out, t, sources)
                    continue
                for piece in t.pieces if isinstance(t, ConcatenatedTensor) else (t,):
                    src = sources.get(piece.path)
                    if src is None:
                        src = sources[piece.path] = open(piece.path, "rb")
                    src.seek(piece.begin)
                    remaining = piece.nbytes
                    while remaining:
                        chunk = src.read(min(COPY_CHUNK_BYTES, remaining))
                        if not chunk:
                            raise CheckpointError(
                                f"{piece.path.name} ended while copying {piece.name}",
                                hint="the file changed or is damaged; restore it from the original",
                            )
                        out.write(chunk)
                        remaining -= len(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for src in sources.values():
            src.close()
    return written
