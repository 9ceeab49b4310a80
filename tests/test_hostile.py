"""Hostile and broken inputs: each is refused with a clear error, nothing is read or written outside what
was given, and no output appears."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from conftest import make_llama, random_lock, rewrite_safetensors, run_cli, tree_hashes

from weightlock import apply_lock, load_lock, open_checkpoint, save_lock
from weightlock.errors import CheckpointError, LockFormatError
from weightlock.io.safetensors_file import TensorData, read_header


@pytest.fixture
def setup(tmp_path):
    src = make_llama(tmp_path / "src", shard_kb=40)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    return src, tmp_path / "l.wlock"


def first_shard(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]


def refused(capsys, src, lock, out, exit_code=3, words=""):
    before = tree_hashes(src)
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock), "--out", str(out))
    assert code == exit_code, err
    assert words in err and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.weightlock-*"))
    assert tree_hashes(src) == before
    return err


# --------------------------------------------------------------------------- malformed safetensors shards


def _corrupt(path, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


def _header(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _set_header(data, header):
    encoded = json.dumps(header).encode()
    old_n = struct.unpack("<Q", data[:8])[0]
    encoded += b" " * (old_n - len(encoded)) if len(encoded) <= old_n else b""
    body = data[8 + old_n :]
    data[:] = struct.pack("<Q", len(encoded)) + encoded + body


def _edit_first_tensor(edit):
    """A corruption that rewrites the header entry of the file's first tensor with ``edit(entry)``."""

    def corrupt(data):
        _, header = _header(data)
        edit(header[next(k for k in header if k != "__metadata__")])
        _set_header(data, header)

    return corrupt


def _start_later(entry):
    entry["data_offsets"][0] += 4


def _one_more_row(entry):
    entry["shape"][0] += 1


def _dtype_f4(entry):
    entry["dtype"] = "F4"


def _overlap(data):
    _, header = _header(data)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = [
        header[names[1]]["data_offsets"][0] - 4,
        header[names[1]]["data_offsets"][1] - 4,
    ]
    _set_header(data, header)


MALFORMED = {
    "truncated": (lambda d: d.__delitem__(slice(len(d) - 100, None)), "runs past the end"),
    "header-length-past-end": (lambda d: d.__setitem__(slice(0, 8), struct.pack("<Q", len(d))), "past the end"),
    "huge-declared-header": (lambda d: d.__setitem__(slice(0, 8), struct.pack("<Q", 1 << 62)), "exceeds"),
    "header-not-json": (lambda d: d.__setitem__(slice(8, 12), b"\xff\xfe{["), "not valid JSON"),
    "offsets-overlap": (_overlap, "overlaps"),
    "offsets-with-gap": (_edit_first_tensor(_start_later), "needs"),
    "shape-disagrees-with-bytes": (_edit_first_tensor(_one_more_row), "needs"),
    "unknown-dtype": (_edit_first_tensor(_dtype_f4), "unknown dtype"),
    "trailing-bytes": (lambda d: d.extend(b"\0" * 16), "not described by the header"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_shard_is_refused(tmp_path, capsys, setup, case):
    src, lock = setup
    edit, words = MALFORMED[case]
    # every shard's header is checked; take the one with the most tensors so overlaps are possible
    shard = max(src.glob("*.safetensors"), key=lambda p: len(read_header(p).tensors))
    _corrupt(shard, edit)
    refused(capsys, src, lock, tmp_path / "out", 3, words)


# ------------------------------------------------------------------------------------------ hostile folders


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".."])
def test_index_entry_outside_the_folder_is_refused(tmp_path, capsys, setup, target):
    src, lock = setup
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = target
    index_path.write_text(json.dumps(index))
    refused(capsys, src, lock, tmp_path / "out", 3, "not a file name inside")


def test_shard_symlink_escaping_the_folder_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    shard = first_shard(src)
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(shard, outside)
    os.symlink(outside, shard)
    refused(capsys, src, lock, tmp_path / "out", 3, "outside the checkpoint")


def test_carried_file_symlink_escaping_the_folder_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, src / "tokenizer.model")
    refused(capsys, src, lock, tmp_path / "out", 3, "outside the checkpoint")


def test_config_symlink_escaping_the_folder_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    os.rename(src / "config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", src / "config.json")
    refused(capsys, src, lock, tmp_path / "out", 3, "outside the checkpoint")


def test_symlink_inside_the_folder_is_fine(tmp_path, setup):
    src, lock = setup
    (src / "real.txt").write_text("x")
    os.symlink("real.txt", src / "alias.txt")
    apply_lock(src, lock, out=tmp_path / "out")
    assert (tmp_path / "out" / "alias.txt").read_text() == "x"


def test_missing_shard_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    first_shard(src).unlink()
    refused(capsys, src, lock, tmp_path / "out", 3, "missing")


def test_tensor_in_two_files_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    shard = first_shard(src)
    other = next(p for p in src.glob("*.safetensors") if p != shard)
    stolen = read_header(shard).tensors["model.layers.0.self_attn.o_proj.weight"]
    data = open(shard, "rb").read()[stolen.begin : stolen.end]
    rewrite_safetensors(other, lambda ts: ts + [TensorData(stolen.name, stolen.dtype, stolen.shape, data)])
    refused(capsys, src, lock, tmp_path / "out", 3, "stands in both")


def test_index_and_shards_disagreeing_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = first_shard(src).name
    index_path.write_text(json.dumps(index))
    refused(capsys, src, lock, tmp_path / "out", 3, "not there")


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c.update(num_hidden_layers=7), "another shape"),
        (lambda c: c.update(hidden_size=128), "another shape"),
        (lambda c: c.update(num_attention_heads="four"), "is not of type 'integer'"),
        (lambda c: c.update(attention_bias=True), "disagree"),
    ],
)
def test_config_disagreeing_with_tensors_is_refused(tmp_path, capsys, setup, edit, words):
    src, lock = setup
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock), "--out", str(tmp_path / "out"))
    assert code in (3, 4) and words in err and not (tmp_path / "out").exists()


def test_config_that_is_not_json_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    (src / "config.json").write_text("{not json")
    refused(capsys, src, lock, tmp_path / "out", 3, "not valid JSON")


# --------------------------------------------------------------------------------------------- hostile locks


def test_lock_with_nan_values_is_refused(tmp_path, capsys, setup):
    src, lock = setup
    rewrite_safetensors(
        lock,
        lambda ts: [
            TensorData(t.name, t.dtype, t.shape, np.full(t.shape, np.nan, np.float32).tobytes())
            if t.name == "direction"
            else t
            for t in ts
        ],
    )
    with pytest.raises(LockFormatError, match="finite"):
        load_lock(lock)
    refused(capsys, src, lock, tmp_path / "out", 3, "finite")


def test_lock_with_wrong_tensor_shape_is_refused(tmp_path, setup):
    src, lock = setup
    rewrite_safetensors(
        lock, lambda ts: [TensorData(t.name, t.dtype, (1,), t.data[:4]) if t.name == "scale" else t for t in ts]
    )
    with pytest.raises(LockFormatError, match="shape"):
        load_lock(lock)


def test_lock_that_is_a_pickle_in_disguise_is_refused_without_running_it(tmp_path, capsys, setup):
    import pickle

    src, _ = setup
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    disguised = tmp_path / "evil.wlock"
    disguised.write_bytes(pickle.dumps(Evil()))
    refused(capsys, src, disguised, tmp_path / "out", 3, "pickle")
    assert not marker.exists()


def test_open_checkpoint_on_a_file_is_refused(tmp_path, setup):
    src, _ = setup
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(first_shard(src))
