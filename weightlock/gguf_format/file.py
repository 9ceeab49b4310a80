"""Reading GGUF files: a strict header parser and a dequantizing row-block reader.

Why not ``gguf.GGUFReader``: it trusts the counts it reads (an array claiming 2**64
elements loops forever past the end of the file, a string longer than the file is cut
short silently), keeps no byte spans to copy the metadata verbatim from, and does not
check what llama.cpp checks (tensor offsets consecutive in declaration order, names of
at most 63 bytes, at most 4 dimensions). So the header is parsed here, every count
bounded by the bytes left, with the rules of ggml's ``gguf.cpp``; the ``gguf`` package
still supplies the type tables (block sizes) and the dequantizers.

A split model (``NAME-00001-of-00003.gguf``) is a :class:`GGUFModel` of several files;
tensor names are unique across the set, as llama.cpp requires.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, MissingDependencyError, UnsupportedError
from ..safetensors_file import TensorReader
from ..untrusted import open_regular

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what llama.cpp reads; version 1 predates 64-bit counts
DEFAULT_ALIGNMENT = 32
MAX_HEADER_BYTES = 1 << 30  # a 256k-token vocabulary with merges is tens of MB
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME (64) including the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_SPLITS = 1 << 10
KEPT_ARRAY_ITEMS = 1 << 16  # numeric arrays up to this length keep their values (per-layer shapes)
BLOCK_TARGET_BYTES = 16 << 20  # quantized bytes per row block read

# GGUF metadata value types (gguf.GGUFValueType), their sizes and struct formats
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
UINT32, UINT16 = 4, 2

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT_KEY, SPLIT_NO_KEY, SPLIT_TENSORS_KEY = "split.count", "split.no", "split.tensors.count"


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            "reading GGUF files needs the gguf package", hint="pip install 'weightlock[gguf]'"
        ) from None
    return gguf


@dataclass(frozen=True)
class ArrayValue:
    item_type: int
    count: int
    values: np.ndarray | None  # None: strings, or too long to keep


@dataclass(frozen=True)
class MetadataEntry:
    key: str
    value_type: int
    value: object  # int, float, bool, str or ArrayValue
    start: int  # byte span of the whole key/value in the file, copied verbatim by the writer
    end: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous (input) dimension
    type_id: int
    offset: int  # relative to the data section
    nbytes: int
    file_index: int = 0

    @property
    def type_name(self) -> str:
        gguf = gguf_package()
        return gguf.GGMLQuantizationType(self.type_id).name

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, columns) as a PyTorch weight reads it: (dims[1], dims[0])."""
        if len(self.dims) != 2:
            raise CheckpointError(
                f"{self.name} should be 2-D, has dims {list(self.dims)}",
                hint="the file is not of the architecture its metadata names",
            )
        return self.dims[1], self.dims[0]


@dataclass
class GGUFFile:
    path: Path
    size: int
    version: int
    alignment: int
    metadata: dict[str, MetadataEntry]
    tensors: list[GGUFTensor]
    kv_end: int  # where the metadata ends and the tensor infos begin
    tensor_infos_end: int
    data_start: int
    data_size: int  # the data section as llama.cpp sizes it: every tensor padded to the alignment
    header_sha256: str = field(repr=False, default="")

    def value(self, key: str, default=None):
        entry = self.metadata.get(key)
        return default if entry is None else entry.value


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


class _Cursor:
    """Bounded reads from the header; every failure names the file and what was cut short."""

    def __init__(self, view: mmap.mmap, path: Path, limit: int):
        self.view, self.path, self.limit, self.pos = view, path, limit, 0

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path.name} is not a valid GGUF file: {what}",
            hint="the file is damaged or truncated; download it again",
        )

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.limit - self.pos:
            raise self.bad(f"{what} runs past the end of the header (at byte {self.pos}, {n} bytes)")
        data = self.view[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.limit - self.pos:
            raise self.bad(f"{what} runs past the end of the header (at byte {self.pos}, {n} bytes)")
        self.pos += n

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str, max_bytes: int | None = None) -> bytes:
        length = self.unpack("Q", f"{what} length")
        if max_bytes is not None and length > max_bytes:
            raise self.bad(f"{what} is {length} bytes long (at most {max_bytes})")
        return self.take(length, what)

    def remaining(self) -> int:
        return self.limit - self.pos


def _read_value(cursor: _Cursor, value_type: int, key: str):
    if value_type in SCALAR_FORMATS:
        value = cursor.unpack(SCALAR_FORMATS[value_type], f"the value of {key}")
        if value_type == 7 and not isinstance(value, bool):
            raise cursor.bad(f"{key} is a bool that is neither 0 nor 1")
        return value
    if value_type == STRING:
        return cursor.string(f"the value of {key}").decode("utf-8", errors="replace")
    if value_type == ARRAY:
        item_type = cursor.unpack("I", f"the item type of {key}")
        count = cursor.unpack("Q", f"the length of {key}")
        if item_type in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[item_type]
            size = struct.calcsize(fmt)
            if count > cursor.remaining() // size:
                raise cursor.bad(f"the array {key} claims {count} items, more than the header holds")
            start = cursor.pos
            cursor.skip(count * size, f"the array {key}")
            values = None
            if count <= KEPT_ARRAY_ITEMS:
                values = np.frombuffer(cursor.view[start : cursor.pos], dtype=np.dtype("<" + fmt)).copy()
            return ArrayValue(item_type, count, values)
        if item_type == STRING:
            if count > cursor.remaining() // 8:  # each string has at least its 8-byte length
                raise cursor.bad(f"the array {key} claims {count} strings, more than the header holds")
            for _ in range(count):
                length = cursor.unpack("Q", f"a string in {key}")
                cursor.skip(length, f"a string in {key}")
            return ArrayValue(item_type, count, None)
        raise cursor.bad(f"the array {key} has items of type {item_type} (nested arrays are not GGUF)")
    raise cursor.bad(f"{key} has the unknown value type {value_type}")


def read_gguf(path: str | os.PathLike, file_index: int = 0) -> GGUFFile:
    """Parse and check one GGUF file's header; no tensor data is read."""
    gguf = gguf_package()
    path = Path(path)
    fd = open_regular(path, "GGUF file")
    try:
        size = os.fstat(fd).st_size
        if size < 24:
            raise CheckpointError(
                f"{path.name} is {size} bytes long, too short for a GGUF header",
                hint="the file is damaged or truncated; download it again",
            )
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return _parse(view, path, size, file_index, gguf)
    finally:
        os.close(fd)


def _parse(view: mmap.mmap, path: Path, size: int, file_index: int, gguf) -> GGUFFile:
    cursor = _Cursor(view, path, min(size, MAX_HEADER_BYTES))
    if cursor.take(4, "the magic") != MAGIC:
        raise CheckpointError(
            f"{path.name} is not a GGUF file (its first bytes are not 'GGUF')",
            hint="pass a .gguf file made by llama.cpp's converter, or a safetensors checkpoint folder",
        )
    version = cursor.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedError(
            f"{path.name} is GGUF version {version}; weightlock and llama.cpp read versions 2 and 3",
            hint="convert the model again with a current llama.cpp",
        )
    tensor_count = cursor.unpack("Q", "the tensor count")
    key_count = cursor.unpack("Q", "the metadata count")
    if tensor_count > MAX_TENSORS or key_count > MAX_KEYS:
        raise cursor.bad(f"it claims {tensor_count} tensors and {key_count} metadata keys")

    metadata: dict[str, MetadataEntry] = {}
    for _ in range(key_count):
        start = cursor.pos
        raw_key = cursor.string("a metadata key", MAX_KEY_BYTES)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.bad(f"a metadata key at byte {start} is not UTF-8") from None
        if key in metadata:
            raise cursor.bad(f"the metadata key {key!r} appears twice")
        value_type = cursor.unpack("I", f"the type of {key}")
        value = _read_value(cursor, value_type, key)
        metadata[key] = MetadataEntry(key, value_type, value, start, cursor.pos)
    kv_end = cursor.pos

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        entry = metadata["general.alignment"]
        alignment = entry.value if entry.value_type == UINT32 else 0  # type: ignore[assignment]
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.bad("general.alignment is not a 32-bit power of two")

    infos = []
    names: set[str] = set()
    for _ in range(tensor_count):
        raw_name = cursor.string("a tensor name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.bad(f"a tensor name at byte {cursor.pos} is not UTF-8") from None
        if len(raw_name) > MAX_TENSOR_NAME_BYTES:
            raise cursor.bad(f"the tensor name {name[:80]!r} is longer than llama.cpp's {MAX_TENSOR_NAME_BYTES} bytes")
        if name in names:
            raise cursor.bad(f"the tensor {name!r} appears twice")
        names.add(name)
        n_dims = cursor.unpack("I", f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.bad(f"{name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = tuple(cursor.unpack("Q", f"a dimension of {name}") for _ in range(n_dims))
        type_id = cursor.unpack("I", f"the type of {name}")
        offset = cursor.unpack("Q", f"the offset of {name}")
        infos.append((name, dims, type_id, offset))
    tensor_infos_end = cursor.pos
    data_start = _align(tensor_infos_end, alignment) if tensor_count else tensor_infos_end

    tensors = []
    expected_offset = 0
    for name, dims, type_id, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedError(
                f"{path.name}: the tensor {name} has the unknown ggml type {type_id}",
                hint="this file needs a newer llama.cpp (and weightlock) than this one",
            ) from None
        if dims[0] % block_size:
            raise cursor.bad(f"{name}'s first dimension {dims[0]} is not a multiple of {qtype.name}'s block size")
        elements = 1
        for d in dims:
            elements *= d
        nbytes = elements // block_size * type_size
        if nbytes >= 1 << 62:
            raise cursor.bad(f"{name} has dims {list(dims)}, larger than any file")
        if offset != expected_offset:
            # ggml requires each tensor to follow the previous one, padded to the alignment
            raise cursor.bad(f"the tensor {name} has offset {offset}, expected {expected_offset} (overlap or gap)")
        expected_offset = _align(offset + nbytes, alignment)
        tensors.append(GGUFTensor(name, dims, type_id, offset, nbytes, file_index))
    data_size = expected_offset
    last_end = data_start + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if last_end > size:
        raise CheckpointError(
            f"{path.name} is {size} bytes long but its tensors need {last_end}: it is truncated",
            hint="the file is damaged or truncated; download it again",
        )
    header_sha256 = hashlib.sha256(view[:tensor_infos_end]).hexdigest()
    return GGUFFile(
        path,
        size,
        version,
        alignment,
        metadata,
        tensors,
        kv_end,
        tensor_infos_end,
        data_start,
        data_size,
        header_sha256,
    )


@dataclass
class GGUFModel:
    """A GGUF model: one file, or the files of a split set in order."""

    files: list[GGUFFile]

    @property
    def path(self) -> Path:
        return self.files[0].path

    @property
    def metadata(self) -> dict[str, MetadataEntry]:
        return self.files[0].metadata

    def value(self, key: str, default=None):
        return self.files[0].value(key, default)

    @property
    def tensors(self) -> dict[str, GGUFTensor]:
        return {t.name: t for f in self.files for t in f.tensors}

    @property
    def split_count(self) -> int:
        return len(self.files)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def split_paths(first: Path, count: int) -> list[Path]:
    """llama.cpp's names for the files of a split set (``llama_split_path``: %s-%05d-of-%05d.gguf)."""
    match = SPLIT_NAME.match(first.name)
    if match is None:
        raise CheckpointError(
            f"{first.name} declares {count} splits but its name is not NAME-00001-of-{count:05d}.gguf",
            hint="keep the split files under the names llama.cpp's gguf-split gave them",
        )
    prefix = match.group("prefix")
    return [first.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def is_gguf_path(location: str | os.PathLike) -> bool:
    path = Path(location)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def open_gguf(location: str | os.PathLike) -> GGUFModel:
    """Open a GGUF model (the first file of a split set brings the others) and check the set."""
    path = Path(location).expanduser()
    first = read_gguf(path)
    count_entry = first.metadata.get(SPLIT_COUNT_KEY)
    if count_entry is None:  # a name alone does not make a split; the metadata does
        return GGUFModel([first])
    count = count_entry.value
    if count_entry.value_type != UINT16 or not isinstance(count, int) or not 1 <= count <= MAX_SPLITS:
        raise CheckpointError(
            f"{path.name}: {SPLIT_COUNT_KEY} is not a split count", hint="the split set is damaged; download it again"
        )
    if first.value(SPLIT_NO_KEY) != 0:
        first_name = SPLIT_NAME.sub(r"\g<prefix>-00001-of-\g<count>.gguf", path.name)
        raise CheckpointError(
            f"{path.name} is split {first.value(SPLIT_NO_KEY)} of a set, not the first",
            hint=f"pass the first file of the set ({first_name})",
        )
    paths = split_paths(path, count) if count > 1 else [path]
    files = [first]
    for index, split_path in enumerate(paths[1:], start=1):
        if not split_path.exists():
            raise CheckpointError(
                f"the split set {path.name} lacks part {index + 1} of {count} ({split_path.name})",
                hint="fetch every file of the split set into the same folder",
            )
        part = read_gguf(split_path, index)
        if part.value(SPLIT_NO_KEY) != index or part.value(SPLIT_COUNT_KEY) != count:
            raise CheckpointError(
                f"{split_path.name} says it is split {part.value(SPLIT_NO_KEY)} of {part.value(SPLIT_COUNT_KEY)}, "
                f"expected {index} of {count}",
                hint="the split files are from different sets; fetch them again",
            )
        files.append(part)
    names: set[str] = set()
    for f in files:
        for t in f.tensors:
            if t.name in names:
                raise CheckpointError(
                    f"the tensor {t.name} appears in two files of the split set",
                    hint="the split set is damaged; fetch it again",
                )
            names.add(t.name)
    declared = first.value(SPLIT_TENSORS_KEY)
    if count > 1 and declared != len(names):
        raise CheckpointError(
            f"{path.name} declares {declared} tensors in the split set, the files hold {len(names)}",
            hint="the split set is damaged or mixed; fetch it again",
        )
    return GGUFModel(files)


@functools.cache
def can_dequantize(type_id: int) -> bool:
    gguf = gguf_package()
    qtype = gguf.GGMLQuantizationType(type_id)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class GGUFTensorReader(TensorReader):
    """Row blocks of a (possibly quantized) 2-D GGUF tensor, dequantized to float32.

    Whole rows are read (one positional read per block of rows, as for safetensors: a
    quantized row is a run of blocks along the input dimension), and only the quantization
    blocks covering the requested columns are dequantized (a lock touches a few heads).
    """

    def __init__(self, gguf_file: GGUFFile):
        super().__init__(gguf_file.path, "GGUF file")
        self.file = gguf_file

    def __enter__(self) -> GGUFTensorReader:
        return self

    def matrix_row_blocks(
        self, tensor: GGUFTensor, column_ranges: list[tuple[int, int]] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        gguf = gguf_package()
        rows, cols = tensor.matrix_shape
        if rows == 0 or cols == 0:
            return
        qtype = gguf.GGMLQuantizationType(tensor.type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = cols // block_size * type_size
        ranges = column_ranges if column_ranges is not None else [(0, cols)]
        # the quantization blocks each column range needs, and where the range sits inside them
        spans = [(a // block_size, -(-b // block_size), a - a // block_size * block_size, b - a) for a, b in ranges]
        rows_per_block = max(1, BLOCK_TARGET_BYTES // max(row_bytes, 1))
        begin0 = self.file.data_start + tensor.offset
        for row0 in range(0, rows, rows_per_block):
            n = min(rows_per_block, rows - row0)
            begin = begin0 + row0 * row_bytes
            if row0 + n < rows:
                following = min(rows_per_block, rows - row0 - n) * row_bytes
                os.posix_fadvise(self._fd, begin + n * row_bytes, following, os.POSIX_FADV_WILLNEED)
            raw = np.frombuffer(self._read_into(begin, n * row_bytes), dtype=np.uint8).reshape(n, row_bytes)
            parts = []
            for first_block, stop_block, skip, width in spans:
                chunk = raw[:, first_block * type_size : stop_block * type_size]
                # as one row: the gguf package dequantizes 16 rows per numpy call, and blocks are independent
                values = gguf.quants.dequantize(np.ascontiguousarray(chunk).reshape(1, -1), qtype).reshape(n, -1)
                parts.append(values[:, skip : skip + width])
            block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            yield row0, np.ascontiguousarray(block, dtype=np.float32)

    def read_vector(self, tensor: GGUFTensor) -> np.ndarray:
        """A 1-D tensor (a bias) as float32."""
        gguf = gguf_package()
        if len(tensor.dims) != 1:
            raise CheckpointError(f"{tensor.name} should be 1-D, has dims {list(tensor.dims)}")
        raw = np.frombuffer(self.read_raw(tensor), dtype=np.uint8)
        qtype = gguf.GGMLQuantizationType(tensor.type_id)
        return gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1).astype(np.float32)

    def read_raw(self, tensor: GGUFTensor) -> bytes:
        return bytes(self._read_into(self.file.data_start + tensor.offset, tensor.nbytes))


@contextmanager
def tensor_readers(model: GGUFModel) -> Iterator[list[GGUFTensorReader]]:
    """One reader per file of ``model`` (index by ``GGUFTensor.file_index``), all closed on leaving."""
    readers: list[GGUFTensorReader] = []
    try:
        readers.extend(GGUFTensorReader(f) for f in model.files)
        yield readers
    finally:
        for reader in readers:
            reader.close()
