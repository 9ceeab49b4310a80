"""Reading GGUF files: a strict header parser and a dequantizing row-block reader.

Why not ``gguf.GGUFReader``: it trusts the counts it reads (an array claiming 2**64
elements loops forever past the end of the file, a string longer than the file is cut
short silently), keeps no byte spans to copy the metadata verbatim from, and does not
check what llama.cpp checks (tensor offsets consecutive in declaration order, names of
at most 63 bytes, at most 4 dimensions). So the header is parsed here, every count
bounded by the bytes left, with every rule of ggml's ``gguf.cpp`` reader (the table
``GGML_RULES``; each refusal names its rule, and tests/test_gguf_parser_strict.py checks
the verdicts against llama.cpp's own parser); the ``gguf`` package still supplies the type
tables (block sizes) and the dequantizers.

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

from weightlock.errors import CheckpointError, MissingDependencyError, UnsupportedError, WeightlockError
from weightlock.io.safetensors_file import TensorReader
from weightlock.io.untrusted import open_regular

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what llama.cpp reads; version 1 predates 64-bit counts
DEFAULT_ALIGNMENT = 32
MAX_HEADER_BYTES = 1 << 30  # a 256k-token vocabulary with merges is tens of MB
GGML_MAX_NAME = 64  # a tensor name is shorter, leaving room for the terminating NUL
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
        """The raw value (an ArrayValue for an array): check its type before showing or using it, or use
        :meth:`text`."""
        entry = self.metadata.get(key)
        return default if entry is None else entry.value

    def text(self, key: str) -> str | None:
        """A string-valued key (``general.name``, ``general.architecture``): None when absent; any other
        type is refused, naming the key and its type, as llama.cpp's loader refuses it."""
        entry = self.metadata.get(key)
        if entry is None:
            return None
        if entry.value_type != STRING:
            raise CheckpointError(
                f"{self.path.name}: the metadata key {key} is {value_type_name(entry)}, not a string",
                hint="llama.cpp refuses such a file too; convert the model again with llama.cpp's converter",
            )
        return entry.value  # type: ignore[return-value]

    def shown(self, key: str) -> str:
        """``key``'s value for a message, whatever its type: short, and an array by its type and length."""
        entry = self.metadata.get(key)
        if entry is None:
            return "absent"
        if isinstance(entry.value, ArrayValue):
            return value_type_name(entry)
        return repr(entry.value) if isinstance(entry.value, str) and len(entry.value) <= 80 else str(entry.value)[:80]


VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
    8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}  # fmt: skip


def value_type_name(entry: MetadataEntry) -> str:
    """``entry``'s GGUF type in words: "a uint32", "an array of 3 string values"."""
    if isinstance(entry.value, ArrayValue):
        return f"an array of {entry.value.count} {VALUE_TYPE_NAMES.get(entry.value.item_type, '?')} values"
    return f"a {VALUE_TYPE_NAMES.get(entry.value_type, '?')}"


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


class _Cursor:
    """Bounded reads from the header; every failure names the file, what was cut short and the rule."""

    def __init__(self, view: mmap.mmap, path: Path, size: int):
        self.view, self.path, self.size, self.pos = view, path, size, 0
        self.limit = min(size, MAX_HEADER_BYTES)

    def bad(self, rule: str, what: str) -> WeightlockError:
        return _bad(self.path, rule, what)

    def _check(self, n: int, what: str) -> None:
        if n < 0 or n > self.limit - self.pos:
            rule = "header-size" if self.limit < self.size and n <= self.size - self.pos else "truncated"
            raise self.bad(rule, f"{what} runs past the end of the header (at byte {self.pos}, {n} bytes)")

    def take(self, n: int, what: str) -> bytes:
        self._check(n, what)
        data = self.view[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self.pos += n

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str) -> bytes:
        length = self.unpack("Q", f"{what} length")
        if length > GGUF_MAX_STRING_LENGTH or length > self.size - self.pos:
            raise self.bad("string-length", f"{what} is {length} bytes long, more than the file holds")
        return self.take(length, what)

    def remaining(self) -> int:
        return self.limit - self.pos


# --- the rules of ggml's gguf.cpp reader ---------------------------------------------------------------
# Every refusal below names one of these rules. Each is what ggml's gguf_init_from_file_impl (or, for
# data-bounds, llama_model_loader) refuses, checked in the same order; the few weightlock adds where
# ggml would accept are marked "weightlock". tests/test_gguf_parser_strict.py builds a file breaking
# each rule and checks llama.cpp's own parser agrees (a rule without a case fails that test).
GGML_RULES: dict[str, str] = {
    "magic": "the first 4 bytes are 'GGUF'",
    "version": "the version is 2 or 3 (0, 1, a byte-swapped or a newer version is refused)",
    "tensor-count": "the tensor count is a non-negative int64 the file can hold",
    "kv-count": "the metadata count is a non-negative int64 the file can hold",
    "truncated": "every field lies within the file (a read past its end fails)",
    "string-length": "a string (key, value, tensor name) is at most 2^30 bytes and within the file",
    "key-empty": "a metadata key is not empty",
    "key-duplicate": "no metadata key appears twice",
    "value-type": "a value type is one of GGUF's 13 types; an array's items are not arrays",
    "array-length": "an array has at most 2^30 items, all within the file",
    "alignment-type": "general.alignment is a uint32",
    "alignment-value": "general.alignment is a power of two",
    "tensor-name-length": "a tensor name is shorter than GGML_MAX_NAME (64 bytes)",
    "tensor-duplicate": "no tensor name appears twice",
    "n-dims": "a tensor has at most GGML_MAX_DIMS (4) dimensions",
    "dim-negative": "each dimension, an int64, is not negative",
    "elements-overflow": "the element count (dims multiplied left to right) fits in int64",
    "tensor-type": "the ggml type is one ggml defines (not a removed one)",
    "block-size": "the first dimension is a multiple of the type's block size",
    "bytes-overflow": "the byte size, and its padding, fit in 64 bits",
    "offset": "each tensor starts where the previous one ends, padded to the alignment",
    "data-section": "the padded data section starts within the file",
    "data-bounds": "every tensor's data lies within the file (llama_model_loader)",
    # weightlock's own, stricter than ggml:
    "key-utf8": "weightlock: a metadata key is UTF-8 (ggml accepts any bytes)",
    "tensor-name-utf8": "weightlock: a tensor name is UTF-8 (ggml accepts any bytes)",
    "header-size": "weightlock: the header is at most 1 GiB",
    "bytes-wrap": "weightlock: ggml_nbytes does not wrap around 2^64 (ggml would size the tensor wrongly)",
    "type-known": "weightlock: the gguf package knows the tensor's type (to size and dequantize it)",
}
WEIGHTLOCK_ONLY_RULES = frozenset(r for r, text in GGML_RULES.items() if text.startswith("weightlock:"))

GGUF_MAX_STRING_LENGTH = 1 << 30  # gguf.cpp
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
INT64_MAX = (1 << 63) - 1
SIZE_MAX = (1 << 64) - 1
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, the type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length (empty name), n_dims (0), type, offset
# ggml's types (ggml.h: GGML_TYPE_COUNT = 43); ids 4, 5, 31-33, 36-38 were removed (block size 0)
GGML_TYPE_COUNT = 43
GGML_REMOVED_TYPES = frozenset({4, 5, 31, 32, 33, 36, 37, 38})


def _bad(path: Path, rule: str, what: str) -> WeightlockError:
    own = rule in WEIGHTLOCK_ONLY_RULES
    error = CheckpointError(
        f"{path.name} is not a valid GGUF file: {what}",
        hint=("weightlock refuses it" if own else "llama.cpp refuses it too")
        + f" ({GGML_RULES[rule].removeprefix('weightlock: ')}); "
        "the file is damaged, truncated or written by a broken tool: download or convert it again",
    )
    return _with_rule(error, rule)


def _with_rule(error: WeightlockError, rule: str) -> WeightlockError:
    error.gguf_rule = rule  # type: ignore[attr-defined]  # which GGML_RULES entry refused the file (tests)
    return error


def _read_value(cursor: _Cursor, value_type: int, key: str):
    if value_type in SCALAR_FORMATS:
        return cursor.unpack(SCALAR_FORMATS[value_type], f"the value of {key}")  # a bool is any byte != 0, as ggml
    if value_type == STRING:
        return cursor.string(f"the value of {key}").decode("utf-8", errors="replace")
    if value_type == ARRAY:
        item_type = cursor.unpack("i", f"the item type of {key}")
        count = cursor.unpack("Q", f"the length of {key}")
        if item_type not in SCALAR_FORMATS and item_type != STRING:
            raise cursor.bad(
                "value-type", f"the array {key} has items of type {item_type} (not a GGUF type, or nested arrays)"
            )
        if count > GGUF_MAX_ARRAY_ELEMENTS:
            raise cursor.bad(
                "array-length", f"the array {key} claims {count} items, more than the header holds (at most 2^30)"
            )
        if item_type in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[item_type]
            size = struct.calcsize(fmt)
            if count > cursor.remaining() // size:
                rule = "header-size" if count * size <= cursor.size - cursor.pos else "array-length"
                raise cursor.bad(rule, f"the array {key} claims {count} items, more than the header holds")
            start = cursor.pos
            cursor.skip(count * size, f"the array {key}")
            values = None
            if count <= KEPT_ARRAY_ITEMS:
                values = np.frombuffer(cursor.view[start : cursor.pos], dtype=np.dtype("<" + fmt)).copy()
            return ArrayValue(item_type, count, values)
        if count > cursor.remaining() // 8:  # each string has at least its 8-byte length
            rule = "header-size" if count * 8 <= cursor.size - cursor.pos else "array-length"
            raise cursor.bad(rule, f"the array {key} claims {count} strings, more than the header holds")
        for _ in range(count):
            cursor.string(f"a string in {key}")
        return ArrayValue(item_type, count, None)
    raise cursor.bad("value-type", f"{key} has the unknown value type {value_type}")


def read_gguf(path: str | os.PathLike, file_index: int = 0) -> GGUFFile:
    """Parse and check one GGUF file's header; no tensor data is read."""
    gguf = gguf_package()
    path = Path(path)
    fd = open_regular(path, "GGUF file")
    try:
        size = os.fstat(fd).st_size
        if size < 4:  # mmap refuses an empty file; ggml fails to read the magic
            raise _bad(path, "magic", f"it is {size} bytes long, too short for a GGUF header")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return _parse(view, path, size, file_index, gguf)
    finally:
        os.close(fd)


def _ggml_nbytes(ne: list[int], block_size: int, type_size: int) -> int:
    """ggml_nbytes as ggml computes it, in size_t arithmetic (wrapping at 2^64)."""
    if any(n <= 0 for n in ne):
        return 0
    nb = [type_size, (type_size * (ne[0] // block_size)) & SIZE_MAX]
    for j in range(2, MAX_DIMS):
        nb.append((nb[j - 1] * ne[j - 1]) & SIZE_MAX)
    if block_size == 1:
        nbytes = type_size + sum((ne[i] - 1) * nb[i] for i in range(MAX_DIMS))
    else:
        nbytes = ((ne[0] * nb[0]) & SIZE_MAX) // block_size + sum((ne[i] - 1) * nb[i] for i in range(1, MAX_DIMS))
    return nbytes & SIZE_MAX


def _parse(view: mmap.mmap, path: Path, size: int, file_index: int, gguf) -> GGUFFile:
    cursor = _Cursor(view, path, size)
    if cursor.take(4, "the magic") != MAGIC:
        raise _with_rule(
            CheckpointError(
                f"{path.name} is not a GGUF file (its first bytes are not 'GGUF')",
                hint="pass a .gguf file made by llama.cpp's converter, or a safetensors checkpoint folder",
            ),
            "magic",
        )
    version = cursor.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise _with_rule(
            UnsupportedError(
                f"{path.name} is GGUF version {version}; weightlock and llama.cpp read versions 2 and 3",
                hint="convert the model again with a current llama.cpp",
            ),
            "version",
        )
    tensor_count = cursor.unpack("q", "the tensor count")
    key_count = cursor.unpack("q", "the metadata count")
    if tensor_count < 0 or tensor_count > cursor.remaining() // MIN_TENSOR_INFO_BYTES:
        raise cursor.bad("tensor-count", f"it claims {tensor_count} tensors, more than the file can hold")
    if key_count < 0 or key_count > cursor.remaining() // MIN_KV_BYTES:
        raise cursor.bad("kv-count", f"it claims {key_count} metadata keys, more than the file can hold")

    metadata: dict[str, MetadataEntry] = {}
    for _ in range(key_count):
        start = cursor.pos
        raw_key = cursor.string("a metadata key")
        if not raw_key:
            raise cursor.bad("key-empty", f"the metadata key at byte {start} is empty")
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.bad("key-utf8", f"a metadata key at byte {start} is not UTF-8") from None
        if key in metadata:
            raise cursor.bad("key-duplicate", f"the metadata key {key!r} appears twice")
        value_type = cursor.unpack("i", f"the type of {key}")
        value = _read_value(cursor, value_type, key)
        metadata[key] = MetadataEntry(key, value_type, value, start, cursor.pos)
    kv_end = cursor.pos

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        entry = metadata["general.alignment"]
        if entry.value_type != UINT32:
            raise cursor.bad("alignment-type", "general.alignment is not a uint32")
        alignment = entry.value  # type: ignore[assignment]
        if alignment <= 0 or alignment & (alignment - 1):
            raise cursor.bad("alignment-value", f"general.alignment is {alignment}, not a power of two")

    tensors = []
    names: set[bytes] = set()
    data_size = 0  # ggml's ctx->size: the data section, every tensor padded to the alignment
    for _ in range(tensor_count):
        at = cursor.pos
        raw_name = cursor.string("a tensor name")
        if len(raw_name) >= GGML_MAX_NAME:
            raise cursor.bad(
                "tensor-name-length", f"the tensor name at byte {at} is {len(raw_name)} bytes long (at most 63)"
            )
        if raw_name in names:
            raise cursor.bad("tensor-duplicate", f"the tensor {raw_name!r} appears twice")
        names.add(raw_name)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.bad("tensor-name-utf8", f"the tensor name at byte {at} is not UTF-8") from None
        n_dims = cursor.unpack("I", f"the dimension count of {name}")
        if n_dims > MAX_DIMS:  # 0 dimensions is a scalar, as ggml reads it
            raise cursor.bad("n-dims", f"{name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(cursor.unpack("q", f"a dimension of {name}") for _ in range(n_dims))
        if any(d < 0 for d in dims):
            raise cursor.bad("dim-negative", f"{name} has a negative dimension (dims {list(dims)} as int64)")
        ne = list(dims) + [1] * (MAX_DIMS - n_dims)
        elements = ne[0]
        for d in ne[1:]:
            if d > 1 and INT64_MAX // d < elements:
                raise cursor.bad("elements-overflow", f"{name} has dims {list(dims)}: the element count overflows")
            elements *= d
        type_id = cursor.unpack("i", f"the type of {name}")
        if type_id < 0 or type_id in GGML_REMOVED_TYPES:
            raise cursor.bad("tensor-type", f"the tensor {name} has the ggml type {type_id}, which ggml lacks")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):  # a type of a newer ggml (this llama.cpp refuses ids >= GGML_TYPE_COUNT)
            raise _with_rule(
                UnsupportedError(
                    f"{path.name}: the tensor {name} has the unknown ggml type {type_id}",
                    hint="this file needs a newer llama.cpp and gguf package (pip install -U gguf) than these",
                ),
                "type-known" if type_id < GGML_TYPE_COUNT else "tensor-type",
            ) from None
        if ne[0] % block_size:
            raise cursor.bad(
                "block-size", f"{name}'s first dimension {ne[0]} is not a multiple of {qtype.name}'s block size"
            )
        if elements // block_size > SIZE_MAX // type_size:
            raise cursor.bad("bytes-overflow", f"{name} has dims {list(dims)}: its byte size overflows")
        nbytes = 0 if elements == 0 else elements // block_size * type_size
        offset = cursor.unpack("Q", f"the offset of {name}")
        tensors.append(GGUFTensor(name, dims, type_id, offset, nbytes, file_index))
        if _ggml_nbytes(ne, block_size, type_size) != nbytes:
            raise cursor.bad("bytes-wrap", f"{name} has dims {list(dims)}: ggml's byte size wraps around")
    tensor_infos_end = cursor.pos
    if tensor_infos_end >= MAX_HEADER_BYTES:
        raise cursor.bad("header-size", f"its header is larger than {MAX_HEADER_BYTES} bytes")
    data_start = _align(tensor_infos_end, alignment) if tensor_count else tensor_infos_end
    if data_start > size:
        raise cursor.bad("data-section", f"its data section would start at byte {data_start}, past its end")

    for tensor in tensors:
        if tensor.offset != data_size:
            # ggml requires each tensor to follow the previous one, padded to the alignment
            raise cursor.bad(
                "offset", f"the tensor {tensor.name} has offset {tensor.offset}, expected {data_size} (overlap or gap)"
            )
        if tensor.nbytes > SIZE_MAX - (alignment - 1) or data_size + _align(tensor.nbytes, alignment) > SIZE_MAX:
            raise cursor.bad("bytes-overflow", f"the data section overflows 64 bits at {tensor.name}")
        data_size += _align(tensor.nbytes, alignment)
    for tensor in tensors:  # llama_model_loader's check, once ggml has read the header
        if data_start + tensor.offset + tensor.nbytes > size:
            raise cursor.bad(
                "data-bounds",
                f"it is {size} bytes long but its tensor {tensor.name} needs "
                f"{data_start + tensor.offset + tensor.nbytes}: it is truncated",
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

    def text(self, key: str) -> str | None:
        return self.files[0].text(key)

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
    path = Path(location)
    first = read_gguf(path)
    count_entry = first.metadata.get(SPLIT_COUNT_KEY)
    if count_entry is None:  # a name alone does not make a split; the metadata does
        return GGUFModel([first])
    count = count_entry.value
    if count_entry.value_type != UINT16 or not isinstance(count, int) or not 1 <= count <= MAX_SPLITS:
        raise CheckpointError(
            f"{path.name}: {SPLIT_COUNT_KEY} is {first.shown(SPLIT_COUNT_KEY)}, not a split count (a uint16 from 1 "
            f"to {MAX_SPLITS})",
            hint="the split set is damaged; download it again",
        )
    if first.value(SPLIT_NO_KEY) != 0:
        first_name = SPLIT_NAME.sub(r"\g<prefix>-00001-of-\g<count>.gguf", path.name)
        raise CheckpointError(
            f"{path.name} is split {first.shown(SPLIT_NO_KEY)} of a set, not the first",
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
                f"{split_path.name} says it is split {part.shown(SPLIT_NO_KEY)} of {part.shown(SPLIT_COUNT_KEY)}, "
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
            f"{path.name} declares {first.shown(SPLIT_TENSORS_KEY)} tensors in the split set, "
            f"the files hold {len(names)}",
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
            # a copy always: for F32 the gguf package returns a view of the raw bytes, that is of our reused buffer
            yield row0, np.array(block, dtype=np.float32, copy=True)

    def read_vector(self, tensor: GGUFTensor) -> np.ndarray:
        """A 1-D tensor (a bias) as float32."""
        gguf = gguf_package()
        if len(tensor.dims) != 1:
            raise CheckpointError(
                f"{tensor.name} should be 1-D, has dims {list(tensor.dims)}",
                hint="the file's tensor infos are inconsistent; convert the model again",
            )
        raw = np.frombuffer(self.read_raw(tensor), dtype=np.uint8)
        qtype = gguf.GGMLQuantizationType(tensor.type_id)
        return gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1).astype(np.float32)

    def read_raw(self, tensor: GGUFTensor) -> bytes:
        return bytes(self._read_into(self.file.data_start + tensor.offset, tensor.nbytes))

    def read_span(self, tensor: GGUFTensor, offset: int, count: int) -> bytes:
        """``count`` bytes of the tensor's data from ``offset`` (within it)."""
        if offset < 0 or offset + count > tensor.nbytes:
            raise ValueError(f"{tensor.name}: bytes {offset}..{offset + count} are outside the tensor")
        return bytes(self._read_into(self.file.data_start + tensor.offset + offset, count))


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
