"""weightlock's GGUF parser against ggml's own (ggml/src/gguf.cpp, the reader llama.cpp loads every model with).

Two families of malformed files:

- one or more cases per rule of ``weightlock.formats.gguf.file.GGML_RULES`` (the table of what gguf.cpp
  refuses), built byte by byte; a rule without a case fails ``test_every_rule_has_a_case``, so a rule added
  to the table must come with its file;
- mutations of valid files (one written by the gguf package's writer, one built here with every value type):
  each header field, each count, each string length, each array type and length, each dimension, type and
  offset of each tensor set to hostile values (0, 1, the value +-1, 63/64, 2^30(+1), 2^31, 2^32, 2^62, 2^63,
  2^64-1, negative as int32, the file size ...), and the file cut at every field boundary.

Every file goes to weightlock's parser (which may only raise weightlock's own errors, exit 3 or 4, with a
hint) and, where llama-cpp-python is installed, to ggml's ``gguf_init_from_file`` itself (called through
ctypes in a forked child: ggml asserts abort the child, not the test) followed by llama_model_loader's
data-bounds check. weightlock refuses exactly the files ggml refuses, except where it refuses on one of its
own rules (``WEIGHTLOCK_ONLY_RULES``: a key or tensor name that is not UTF-8, a header over 1 GiB, a byte size
ggml would wrap around, a type the gguf package does not know), which each case then names.
Without llama.cpp the comparisons skip (CI sets WEIGHTLOCK_REQUIRE_LLAMA_CPP=1, which forbids skipping);
weightlock's own verdicts are still checked.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from gguf_helpers import finish, lock_for_gguf, write_gguf

from weightlock import apply_lock, save_lock
from weightlock.errors import CheckpointError, UnsupportedError, WeightlockError
from weightlock.formats.gguf.file import GGML_RULES, WEIGHTLOCK_ONLY_RULES, open_gguf, read_gguf

gguf = pytest.importorskip("gguf")

STRING, ARRAY, UINT8, UINT32, INT32, UINT64, FLOAT32, BOOL = 8, 9, 0, 4, 5, 10, 6, 7
F32, F16, Q8_0, I8, Q4_0 = 0, 1, 8, 24, 2
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# --- building GGUF files byte by byte ------------------------------------------------------------------------


def s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def kv(key: bytes, value_type: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<i", value_type) + payload


def kv_str(key: bytes, value: bytes) -> bytes:
    return kv(key, STRING, s(value))


def kv_u32(key: bytes, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def kv_array(key: bytes, item_type: int, count: int, items: bytes) -> bytes:
    return kv(key, ARRAY, struct.pack("<iQ", item_type, count) + items)


def info(name: bytes, dims, type_id: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
        + struct.pack("<iQ", type_id, offset)
    )


def build(kvs, infos, data: bytes, *, version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    header = b"GGUF" + struct.pack(
        "<Iqq", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    header += b"".join(kvs) + b"".join(infos)
    if infos:
        header += b"\0" * (-len(header) % alignment)
    return header + data


BASE_KVS = [
    kv_str(b"general.architecture", b"llama"),
    kv_str(b"general.name", b"tiny"),
    kv_u32(b"llama.block_count", 1),
    kv_array(b"tokenizer.ggml.tokens", STRING, 2, s(b"a") + s(b"bc")),
    kv_array(b"llama.per_layer", INT32, 2, struct.pack("<ii", 4, 4)),
    kv(b"general.flag", BOOL, b"\1"),
    kv(b"general.f", FLOAT32, struct.pack("<f", 1.5)),
]


def base_tensors(alignment=32):
    """Tensors a (F32 4x2, 32 bytes), b (F16 [8], 16 bytes), c (Q8_0 [32], 34 bytes), each padded."""
    infos, data = [], b""
    for name, dims, type_id, nbytes in ((b"a", (4, 2), F32, 32), (b"b", (8,), F16, 16), (b"c", (32,), Q8_0, 34)):
        infos.append(info(name, dims, type_id, len(data)))
        data += bytes(range(nbytes)) + bytes(-nbytes % alignment)
    return infos, data


def valid_file() -> bytes:
    infos, data = base_tensors()
    return build(BASE_KVS, infos, data)


def with_tensor(name=b"t", dims=(4,), type_id=F32, offset=0, data_size=None, kvs=None, extra_infos=()) -> bytes:
    """A file of one tensor (plus ``extra_infos``), with ``data_size`` bytes of data (default: 64)."""
    return build(
        BASE_KVS if kvs is None else kvs,
        [info(name, dims, type_id, offset), *extra_infos],
        bytes(64 if data_size is None else data_size),
    )


def rule_cases() -> dict[str, list[tuple[str, bytes]]]:
    good = valid_file()
    kvs_end = len(build(BASE_KVS, [], b""))
    infos, data = base_tensors()
    big = 2**63
    c: dict[str, list[tuple[str, bytes]]] = {
        "magic": [("GGUX", b"GGUX" + good[4:]), ("empty", b""), ("3 bytes", b"GGU")],
        "version": [(f"version {v}", build(BASE_KVS, infos, data, version=v)) for v in (0, 1, 4, 0x03000000)],
        "tensor-count": [
            ("-1", build(BASE_KVS, infos, data, n_tensors=-1)),
            ("one more (any rule)", build(BASE_KVS, infos, data, n_tensors=4)),
            ("2^62", build(BASE_KVS, infos, data, n_tensors=2**62)),
        ],
        "kv-count": [
            ("-1", build(BASE_KVS, infos, data, n_kv=-1)),
            ("one more (any rule)", build(BASE_KVS, infos, data, n_kv=len(BASE_KVS) + 1)),
            ("2^40", build(BASE_KVS, infos, data, n_kv=2**40)),
        ],
        "truncated": [
            ("in the counts", good[:20]),
            ("in the last value", build(BASE_KVS, [], b"")[:-2]),
            ("in the tensor infos", good[: kvs_end + 5]),
        ],
        "string-length": [
            ("a key of 2^30+1 bytes", b"GGUF" + struct.pack("<IqqQ", 3, 0, 1, 2**30 + 1) + bytes(64)),
            ("a value past the end", build([kv(b"k", STRING, struct.pack("<Q", 10**6) + b"abc")], [], b"")),
            ("a tensor name past the end", build(BASE_KVS, [struct.pack("<Q", 2**40)], b"", n_tensors=1)),
            ("a string in an array", build([kv_array(b"k", STRING, 1, struct.pack("<Q", 2**31))], [], b"")),
        ],
        "key-empty": [("empty key", build([kv_str(b"", b"x"), *BASE_KVS], infos, data))],
        "key-duplicate": [("general.name twice", build([*BASE_KVS, kv_str(b"general.name", b"y")], infos, data))],
        "value-type": [
            (f"type {t}", build([*BASE_KVS, kv(b"k", t, bytes(16))], infos, data)) for t in (13, -1, 2**31 - 1)
        ]
        + [
            ("nested array", build([*BASE_KVS, kv_array(b"k", ARRAY, 1, struct.pack("<iQ", UINT8, 0))], infos, data)),
            ("array of type 13", build([*BASE_KVS, kv_array(b"k", 13, 0, b"")], infos, data)),
        ],
        "array-length": [
            ("2^30+1 bytes", build([*BASE_KVS, kv_array(b"k", UINT8, 2**30 + 1, bytes(64))], infos, data)),
            ("past the end", build([*BASE_KVS, kv_array(b"k", UINT32, 1000, bytes(64))], infos, data)),
            ("2^61 strings", build([*BASE_KVS, kv_array(b"k", STRING, 2**61, bytes(64))], infos, data)),
        ],
        "alignment-type": [
            (name, build([*BASE_KVS, kv(b"general.alignment", t, payload)], infos, data))
            for name, t, payload in (
                ("uint64", UINT64, struct.pack("<Q", 32)),
                ("int32", INT32, struct.pack("<i", 32)),
                ("string", STRING, s(b"32")),
            )
        ],
        "alignment-value": [
            (f"alignment {a}", build([*BASE_KVS, kv_u32(b"general.alignment", a)], infos, data)) for a in (0, 3, 48)
        ],
        "tensor-name-length": [("64 bytes", with_tensor(name=b"n" * 64))],
        "tensor-duplicate": [("t twice", with_tensor(extra_infos=[info(b"t", (4,), F32, 32)]))],
        "n-dims": [("5 dims", with_tensor(dims=(1, 1, 1, 1, 4)))],
        "dim-negative": [
            ("-1", with_tensor(dims=(-1,))),
            ("zero-size with 2^63 (the review's case)", with_tensor(dims=(0, big))),
            ("2^64-1 second", with_tensor(dims=(4, 2**64 - 1))),
        ],
        "elements-overflow": [
            ("2^32 x 2^32", with_tensor(dims=(2**32, 2**32))),
            ("2^62 x 4", with_tensor(dims=(2**62, 4))),
            ("4 x 2^61 x 2", with_tensor(dims=(4, 2**61, 2))),
        ],
        "tensor-type": [(f"type {t}", with_tensor(type_id=t)) for t in (-1, 4, 5, 31, 36, 43, 999)],
        "block-size": [
            ("Q8_0 of 33", with_tensor(dims=(33,), type_id=Q8_0)),
            ("Q8_0 of 16", with_tensor(dims=(16,), type_id=Q8_0)),
        ],
        "bytes-overflow": [
            ("F32 of 2^62 elements", with_tensor(dims=(2**62,))),
            ("F64 of 2^61 x 2", with_tensor(dims=(2**61, 2), type_id=28)),
            (
                "two I8 tensors of 2^63-1 bytes",
                with_tensor(dims=(big - 1,), type_id=I8, extra_infos=[info(b"u", (big - 1,), I8, big)]),
            ),
        ],
        "offset": [
            ("gap", with_tensor(offset=32)),
            ("unaligned", with_tensor(offset=1)),
            ("overlap", with_tensor(extra_infos=[info(b"u", (4,), F32, 0)])),
            ("not following", with_tensor(extra_infos=[info(b"u", (4,), F32, 64)])),
        ],
        "data-bounds": [
            ("data cut", good[:-40]),
            ("a tensor past the end", with_tensor(dims=(1024,))),
            ("2^60 elements", with_tensor(dims=(2**60,), type_id=I8)),
        ],
        "key-utf8": [("key \\xff", build([*BASE_KVS, kv_str(b"\xff\xfe", b"x")], infos, data))],
        "tensor-name-utf8": [("name \\xff", with_tensor(name=b"\xff"))],
        "bytes-wrap": [("Q4_0 of 2^60", with_tensor(dims=(2**60,), type_id=Q4_0))],
        "type-known": [("Q2_0 (42)", with_tensor(dims=(256,), type_id=42))],
        "header-size": [],  # a sparse file; built in test_a_header_over_1_gib_is_refused
    }
    # data-section: one zero-size tensor, the file ending inside the padding that starts the data section
    c["data-section"] = []
    for name in (b"t", b"tt", b"ttt"):  # a name length that leaves some padding
        zero = build(BASE_KVS, [info(name, (0,), F32, 0)], b"")
        unpadded = len(build(BASE_KVS, [], b"")) + len(info(name, (0,), F32, 0))
        if len(zero) > unpadded + 1:
            c["data-section"].append((f"ends in the padding ({name!r})", zero[: unpadded + 1]))
    return c


ACCEPTED = {
    # what ggml accepts, and weightlock too: its rules are no stricter than these
    "valid": valid_file(),
    "no tensors": build(BASE_KVS, [], b""),
    "no keys": build([], *base_tensors()),
    "a scalar tensor (0 dims)": with_tensor(dims=()),
    "a zero-size tensor with dims near 2^62": with_tensor(dims=(0, 2**62, 2**62)),
    "an empty tensor name": with_tensor(name=b""),
    "a 63-byte tensor name": with_tensor(name=b"n" * 63),
    "a bool of 2": build([*BASE_KVS, kv(b"k", BOOL, b"\2")], *base_tensors()),
    "a value string not UTF-8": build([*BASE_KVS, kv_str(b"k", b"\xff")], *base_tensors()),
    "alignment 64": build([*BASE_KVS, kv_u32(b"general.alignment", 64)], *base_tensors(64), alignment=64),
    "alignment 1": build([*BASE_KVS, kv_u32(b"general.alignment", 1)], *base_tensors(1), alignment=1),
    "version 2": build(BASE_KVS, *base_tensors(), version=2),
    "an empty array": build([*BASE_KVS, kv_array(b"k", UINT8, 0, b"")], *base_tensors()),
    "bytes after the last tensor": valid_file() + bytes(100),
}


# --- ggml's verdict ------------------------------------------------------------------------------------------


ORACLE = r"""
import ctypes, os, sys

class Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

lib = ctypes.CDLL(sys.argv[1])
lib.gguf_init_from_file.restype = ctypes.c_void_p
lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
lib.gguf_get_n_tensors.restype = ctypes.c_int64
lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
lib.gguf_get_data_offset.restype = ctypes.c_size_t
lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
for name in ("gguf_get_tensor_offset", "gguf_get_tensor_size"):
    getattr(lib, name).restype = ctypes.c_size_t
    getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 2)  # ggml logs each refusal
for line in sys.stdin:
    path = line.rstrip("\n")
    pid = os.fork()
    if pid == 0:  # a child per file: an abort (a GGML_ASSERT) is a refusal, not the end of the oracle
        try:
            ctx = ctypes.c_void_p()
            gctx = lib.gguf_init_from_file(path.encode(), Params(True, ctypes.pointer(ctx)))
            if not gctx:
                os._exit(1)
            start, size = lib.gguf_get_data_offset(gctx), os.path.getsize(path)
            for i in range(lib.gguf_get_n_tensors(gctx)):
                end = start + lib.gguf_get_tensor_offset(gctx, i) + lib.gguf_get_tensor_size(gctx, i)
                if end >= 2**64 or end > size:
                    os._exit(1)
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    sys.stdout.write(f"{code}\n")
    sys.stdout.flush()
"""


class Oracle:
    """llama.cpp's verdict on a file: gguf_init_from_file as llama_model_loader calls it (no_alloc, a ggml
    context), then the loader's check that every tensor's data lies within the file. ggml is called through
    ctypes in a small helper process that forks a child per file (cheap, and an abort is only a refusal)."""

    def __init__(self, library: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", ORACLE, str(library)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def refuses(self, path: Path) -> bool:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer in ("0", "1"), f"the ggml oracle failed on {path} ({answer!r})"
        return answer == "1"

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def _ggml_library() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    library = Path(spec.origin).parent / "lib" / "libggml-base.so"
    return library if library.exists() else None


@pytest.fixture(scope="module")
def ggml():
    library = _ggml_library()
    if library is None:
        message = "llama-cpp-python (its libggml-base) is not installed (bash scripts/install_llama_cpp.sh)"
        if os.environ.get("WEIGHTLOCK_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(message + "; WEIGHTLOCK_REQUIRE_LLAMA_CPP=1 forbids skipping")
        pytest.skip(message)
    oracle = Oracle(library)
    yield oracle
    oracle.close()


def ggml_refuses(oracle: Oracle, path: Path) -> bool:
    return oracle.refuses(path)


def put(path: Path, data: bytes) -> Path:
    """Write a case (a new file each time: truncating the previous case in place is 20 times slower)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


# --- weightlock's verdict ------------------------------------------------------------------------------------


def weightlock_verdict(path: Path) -> WeightlockError | None:
    """None when weightlock's parser accepts the file; its error otherwise (anything else fails the test)."""
    try:
        read_gguf(path)
    except (CheckpointError, UnsupportedError) as e:
        assert e.hint and "Traceback" not in e.message
        return e
    return None


def agree(oracle: Oracle, path: Path, what: str) -> WeightlockError | None:
    ours = weightlock_verdict(path)
    theirs = ggml_refuses(oracle, path)
    if theirs:
        assert ours is not None, f"{what}: llama.cpp refuses the file, weightlock accepts it"
    elif ours is not None:
        rule = getattr(ours, "gguf_rule", None)
        assert rule in WEIGHTLOCK_ONLY_RULES, f"{what}: llama.cpp accepts the file, weightlock refuses: {ours.message}"
    return ours


# --- mutations of valid files ----------------------------------------------------------------------------------


def fields(data: bytes) -> list[tuple[str, int, str]]:
    """(label, offset, struct format) of every header field of a valid GGUF file, walked independently of
    weightlock's parser."""
    out = [("version", 4, "<I"), ("tensor count", 8, "<Q"), ("metadata count", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(label: str) -> bytes:
        nonlocal pos
        out.append((f"{label} length", pos, "<Q"))
        (n,) = struct.unpack_from("<Q", data, pos)
        value = data[pos + 8 : pos + 8 + n]
        pos += 8 + n
        return value

    for _ in range(n_kv):
        key = string("key").decode()
        out.append((f"{key}: type", pos, "<I"))
        (value_type,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if value_type == ARRAY:
            out += [(f"{key}: item type", pos, "<I"), (f"{key}: array length", pos + 4, "<Q")]
            item_type, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item_type == STRING:
                for i in range(min(count, 3)):
                    string(f"{key}[{i}]")
                for _ in range(count - min(count, 3)):
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
            else:
                pos += count * SCALAR_SIZES[item_type]
        elif value_type == STRING:
            string(f"{key}: value")
        else:
            out.append((f"{key}: value", pos, "<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[SCALAR_SIZES[value_type]]))
            pos += SCALAR_SIZES[value_type]
    for t in range(n_tensors):
        name = string(f"tensor {t} name").decode()
        out.append((f"{name}: n_dims", pos, "<I"))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for d in range(n_dims):
            out.append((f"{name}: dim {d}", pos, "<Q"))
            pos += 8
        out += [(f"{name}: type", pos, "<I"), (f"{name}: offset", pos + 4, "<Q")]
        pos += 12
    return out


def hostile_values(value: int, fmt: str, size: int) -> set[int]:
    bits = 8 * struct.calcsize(fmt)
    values = {0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 24, 28, 42, 43, 63, 64, 2**30, 2**30 + 1, 2**31, 2**32, size}
    values |= {value - 1, value + 1, value * 2, value ^ 1, 2**bits - 1, 2 ** (bits - 1), 2 ** (bits - 1) - 1}
    if bits == 64:
        values |= {2**62, 2**63 - 1, 2**40}
    return {v for v in values if 0 <= v < 2**bits and v != value}


def mutations(data: bytes) -> list[tuple[str, bytes]]:
    cases = []
    for label, at, fmt in fields(data):
        (value,) = struct.unpack_from(fmt, data, at)
        for new in sorted(hostile_values(value, fmt, len(data))):
            mutated = bytearray(data)
            struct.pack_into(fmt, mutated, at, new)
            cases.append((f"{label} {value} -> {new}", bytes(mutated)))
        cases.append((f"cut at {label}", data[:at]))
    return cases


def writer_file(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "writer.gguf", out_type="Q8_0", extra={"general.name": "tiny"}).read_bytes()


# --- the tests ---------------------------------------------------------------------------------------------------


def test_every_rule_has_a_case():
    cases = rule_cases()
    assert set(cases) == set(GGML_RULES), "each rule of GGML_RULES needs a file here, and only those"
    assert all(cases[rule] for rule in GGML_RULES if rule != "header-size")


def test_weightlock_refuses_each_rule_case_naming_the_rule(tmp_path):
    path = tmp_path / "case.gguf"
    count = 0
    for rule, cases in rule_cases().items():
        for label, data in cases:
            put(path, data)
            error = weightlock_verdict(path)
            assert error is not None, f"{rule} / {label}: accepted"
            assert "(any rule)" in label or getattr(error, "gguf_rule", None) == rule, (rule, label, error)
            count += 1
    assert count >= 60


def test_weightlock_accepts_what_ggml_accepts(tmp_path):
    path = tmp_path / "case.gguf"
    for label, data in ACCEPTED.items():
        put(path, data)
        assert weightlock_verdict(path) is None, label
    put(path, ACCEPTED["a zero-size tensor with dims near 2^62"])
    assert read_gguf(path).tensors[0].nbytes == 0


def test_rule_cases_agree_with_ggml(ggml, tmp_path):
    path = tmp_path / "case.gguf"
    for rule, cases in rule_cases().items():
        for label, data in cases:
            put(path, data)
            assert ggml_refuses(ggml, path) or rule in WEIGHTLOCK_ONLY_RULES, f"{rule} / {label}: ggml accepts it"
            agree(ggml, path, f"{rule} / {label}")
    for label, data in ACCEPTED.items():
        put(path, data)
        assert not ggml_refuses(ggml, path), f"{label}: ggml refuses it"


@pytest.mark.parametrize("base", ["built", "gguf-writer"])
def test_mutations_of_a_valid_file_agree_with_ggml(ggml, tmp_path, base):
    data = valid_file() if base == "built" else writer_file(tmp_path)
    path = tmp_path / "case.gguf"
    refused = 0
    cases = mutations(data)
    for label, mutated in cases:
        refused += agree(ggml, put(path, mutated), label) is not None
    assert len(cases) > 300 and 0 < refused < len(cases)


def test_mutations_give_only_weightlock_errors_without_llama_cpp(tmp_path):
    """The same mutations where llama.cpp is absent: weightlock's own verdict, never a crash."""
    path = tmp_path / "case.gguf"
    for data in (valid_file(), writer_file(tmp_path)):
        for _, mutated in mutations(data):
            put(path, mutated)
            weightlock_verdict(path)


def test_a_header_over_1_gib_is_refused(tmp_path):
    """weightlock's own bound (a sparse file: two arrays of 600 MB before the tensor infos)."""
    path = tmp_path / "huge.gguf"
    n = 600 << 20
    with open(path, "wb") as f:
        f.write(build([kv_array(b"a", UINT8, n, b"")], [], b"", n_kv=2))
        f.seek(n, os.SEEK_CUR)
        f.write(kv_array(b"b", UINT8, n, b""))
        f.truncate(f.tell() + n)
    error = weightlock_verdict(path)
    assert error is not None and error.gguf_rule == "header-size"


def test_every_refusal_reaches_the_cli_as_one_line_with_a_hint(tmp_path, capsys):
    path = tmp_path / "case.gguf"
    for rule, cases in rule_cases().items():
        label, data = cases[0] if cases else ("", valid_file())
        put(path, data)
        code, _, err = run_cli(capsys, "inspect", str(path))
        assert code in (0, 3, 4), (rule, label, code, err)
        if code:
            assert "hint:" in err and "Traceback" not in err, (rule, label, err)


# --- the class-10 and class-13 items on GGUF input ---------------------------------------------------------------


def replace_kv(path: Path, key: str, replacement: bytes) -> None:
    """``path`` with the key/value ``key`` replaced by ``replacement`` (the data section moved to stay aligned)."""
    data, parsed = path.read_bytes(), read_gguf(path)
    entry = parsed.metadata[key]
    header = data[: entry.start] + replacement + data[entry.end : parsed.tensor_infos_end]
    path.write_bytes(header + bytes(-len(header) % parsed.alignment) + data[parsed.data_start :])


@pytest.mark.parametrize("key", ["general.name", "general.architecture"])
@pytest.mark.parametrize("value_type", ["array", "uint32"])
def test_inspect_of_a_wrongly_typed_name_is_one_error_line(tmp_path, capsys, key, value_type):
    path = tmp_path / "m.gguf"
    write_gguf(path, extra={"general.name": "tiny"})
    replacement = (
        kv_array(key.encode(), STRING, 2, s(b"a") + s(b"b")) if value_type == "array" else kv_u32(key.encode(), 7)
    )
    replace_kv(path, key, replacement)
    for as_json in ([], ["--json"]):
        code, out, err = run_cli(capsys, "inspect", str(path), *as_json)
        assert code == 3 and "Traceback" not in err and "hint:" in err, err
        assert key in err and ("array of 2 string" in err or "uint32" in err), err


def test_a_gguf_reached_through_a_symlink_locks(tmp_path):
    """As the Hugging Face cache stores files: snapshots/REV/model.gguf -> ../../blobs/SHA."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    blob = write_gguf(blobs / "0123abcd", extra={"general.name": "tiny"})
    snapshot = tmp_path / "hub" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.gguf").symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    lock = lock_for_gguf(blob)
    result = apply_lock(snapshot / "model.gguf", lock, out=tmp_path / "out.gguf", alpha=1.0)
    assert result.report.ok and (snapshot / "model.gguf").is_symlink()
    assert open_gguf(tmp_path / "out.gguf").tensors["blk.0.attn_output.bias"].nbytes > 0


def _phi2(path: Path, weight: np.ndarray) -> Path:
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_embedding_length(32)
    writer.add_tensor("blk.0.attn_output.weight", weight.astype(np.float16))
    writer.add_tensor("blk.0.attn_output.bias", np.full(32, 60000, dtype=np.float16))
    finish(writer)
    return path


def test_an_f16_bias_overflow_is_unsupported_exit_4(tmp_path, capsys):
    """An F16 bias of 60000 plus a displacement W @ d > 5504 (W's signs follow d's): finite in float32, not
    in F16. README: an alpha overflowing the checkpoint's dtype is exit 4, as for safetensors."""
    lock = lock_for_gguf(_phi2(tmp_path / "p.gguf", np.zeros((32, 32))), model_type="phi", n_heads=4)
    d = lock.displacements(lock.default_alpha, 4)[0]
    _phi2(tmp_path / "p.gguf", np.tile(np.sign(d) * 60000 / max(np.abs(d).sum(), 1e-3), (32, 1)))
    save_lock(lock, tmp_path / "l.wlock")
    code, _, err = run_cli(
        capsys,
        "apply",
        str(tmp_path / "p.gguf"),
        "--lock",
        str(tmp_path / "l.wlock"),
        "--out",
        str(tmp_path / "o.gguf"),
    )
    assert code == 4 and "overflows F16" in err and "hint:" in err, err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize(
    "value, expected",
    [(0, "0"), (-1, "-1"), (2**40, str(2**40)), ("two", "a string"), (2.5, "a float32"), ([2, 3], "differs")],
)
def test_a_bad_block_count_names_the_key_its_value_and_what_is_expected(tmp_path, capsys, value, expected):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    key = b"llama.block_count"
    if isinstance(value, list):
        replacement = kv_array(key, INT32, len(value), struct.pack(f"<{len(value)}i", *value))
    elif isinstance(value, str):
        replacement = kv_str(key, value.encode())
    elif isinstance(value, float):
        replacement = kv(key, FLOAT32, struct.pack("<f", value))
    else:
        replacement = kv(key, 11, struct.pack("<q", value))  # int64
    replace_kv(path, "llama.block_count", replacement)
    save_lock(lock_for_gguf(write_gguf(tmp_path / "good.gguf")), tmp_path / "l.wlock")
    code, _, err = run_cli(
        capsys, "apply", str(path), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "o.gguf")
    )
    assert code in (3, 4) and "llama.block_count" in err and expected in err, err
    if expected != "differs":
        assert "expected a whole number from 1 to" in err and "convert the model again" in err, err
