"""Bounded fuzzing of every parser that reads untrusted bytes: safetensors headers, the checkpoint
index, lock files and legacy pickles. Whatever the input, the only exceptions are weightlock's own."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from conftest import make_llama, random_lock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightlock import load_lock, open_checkpoint, save_lock
from weightlock.core.legacy import read_legacy
from weightlock.errors import WeightlockError
from weightlock.io.safetensors_file import read_header

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DTYPES = st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "Q4", "", 7])


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="wl-fuzz-"))


def _expect_only_our_errors(call):
    try:
        call()
    except WeightlockError:
        pass


@FUZZ
@given(st.binary(max_size=512))
def test_header_parser_on_random_bytes(data):
    folder = _scratch()
    try:
        (folder / "x.safetensors").write_bytes(data)
        _expect_only_our_errors(lambda: read_header(folder / "x.safetensors"))
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=6),
        st.fixed_dictionaries(
            {
                "dtype": DTYPES,
                "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3),
            }
        )
        | json_values,
        max_size=4,
    ),
    st.integers(0, 64),
    st.integers(-16, 16),
)
def test_header_parser_on_structured_headers(header, data_size, length_delta):
    folder = _scratch()
    try:
        encoded = json.dumps(header).encode()
        path = folder / "x.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(encoded) + length_delta)) + encoded + b"\0" * data_size)
        try:
            parsed = read_header(path)
        except WeightlockError:
            return
        # anything accepted tiles the data area exactly
        assert sum(e.nbytes for e in parsed.tensors.values()) == parsed.file_size - parsed.data_start
    finally:
        shutil.rmtree(folder)


_TEMPLATE = Path(tempfile.mkdtemp(prefix="wl-fuzz-template-"))
make_llama(_TEMPLATE / "ckpt", shard_kb=40, layers=2, extra_files=False)
save_lock(random_lock(_TEMPLATE / "ckpt"), _TEMPLATE / "l.wlock")


@FUZZ
@given(json_values, st.dictionaries(st.text(max_size=20), st.text(max_size=40) | json_values, max_size=6))
def test_index_parser(metadata, extra_entries):
    folder = _scratch()
    try:
        shutil.copytree(_TEMPLATE / "ckpt", folder / "c")
        index_path = folder / "c" / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["metadata"] = metadata
        index["weight_map"].update(extra_entries)
        index_path.write_text(json.dumps(index))
        _expect_only_our_errors(lambda: open_checkpoint(folder / "c"))
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_lock_parser_on_mutated_locks(mutations):
    folder = _scratch()
    try:
        data = bytearray((_TEMPLATE / "l.wlock").read_bytes())
        for position, value in mutations:
            data[position % len(data)] = value
        (folder / "m.wlock").write_bytes(bytes(data))
        _expect_only_our_errors(lambda: load_lock(folder / "m.wlock"))
    finally:
        shutil.rmtree(folder)


_LEGACY = pickle.dumps(
    {"model.layers.0.self_attn.head_out": [(np.int64(1), np.ones(128, np.float16), np.float16(0.5))]}, protocol=2
)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)
    | st.binary(max_size=300).map(lambda b: [(-1, b)])
)
def test_legacy_unpickler_on_mutated_and_random_pickles(mutations):
    folder = _scratch()
    try:
        if mutations[0][0] == -1:
            payload = mutations[0][1]
        else:
            data = bytearray(_LEGACY)
            for position, value in mutations:
                data[position % len(data)] = value
            payload = bytes(data)
        with zipfile.ZipFile(folder / "x.safelock", "w") as z:
            z.writestr("x/data.pkl", payload)
        _expect_only_our_errors(lambda: read_legacy(folder / "x.safelock"))
    finally:
        shutil.rmtree(folder)


def test_unpickler_refuses_an_up_front_allocation():
    import pytest

    from weightlock.core.legacy import NumpyOnlyUnpickler
    from weightlock.errors import UnsafePickleError

    payload = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85C\x01b\x87R."
    with pytest.raises(UnsafePickleError, match="allocate"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
