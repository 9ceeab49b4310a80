"""Reading checkpoints: only the o_proj weights' data is touched; Hub cache resolution;
strict headers."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from conftest import logits, make_llama, random_lock

from weightlock import apply_lock, open_checkpoint, verify_checkpoint
from weightlock.errors import CheckpointError
from weightlock.io.safetensors_file import TensorData, TensorReader, read_header, write_safetensors


def test_apply_reads_no_tensor_data_but_the_locked_o_proj(tmp_path):
    """Overwrite every byte of tensor data apply must not need with NaN; it still succeeds and
    its biases are right. Any read of other data would make a bias NaN (and be refused)."""
    src = make_llama(tmp_path / "src", shard_kb=40)
    lock = random_lock(src, n_heads=3)
    apply_lock(src, lock, out=tmp_path / "clean", alpha=2.0)
    needed = {f"model.layers.{layer}.self_attn.o_proj.weight" for layer in lock.heads_by_layer()}
    for shard in src.glob("*.safetensors"):
        header = read_header(shard)
        with open(shard, "r+b") as f:
            for entry in header.tensors.values():
                if entry.name not in needed:
                    f.seek(entry.begin)
                    f.write(np.full(entry.numel, np.nan, np.float32).tobytes())
    poisoned = apply_lock(src, lock, out=tmp_path / "poisoned", alpha=2.0)
    clean_bias = (tmp_path / "clean" / "model-weightlock-bias.safetensors").read_bytes()
    assert (tmp_path / "poisoned" / "model-weightlock-bias.safetensors").read_bytes() == clean_bias
    assert poisoned.plan.weight_bytes_to_read == sum(open_checkpoint(src).tensors[n].nbytes for n in needed)


def test_row_blocks_cover_the_tensor_exactly(tmp_path):
    values = np.arange(37 * 11, dtype=np.float32).reshape(37, 11)
    write_safetensors(tmp_path / "t.safetensors", [TensorData("w", "F32", (37, 11), values.tobytes())])
    entry = read_header(tmp_path / "t.safetensors").tensors["w"]
    with TensorReader(tmp_path / "t.safetensors") as m:
        blocks = list(m.row_blocks(entry, column_ranges=[(1, 2), (5, 7)], block_bytes=11 * 4 * 5))
    assert len(blocks) == 8
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), values[:, [1, 5, 6]])


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_column_ranges_widen_to_exactly_the_concatenated_columns(dtype):
    """columns_float32 (each range widened straight into the result) gives the bits the concatenate-then-convert
    path gave, for every bit pattern a stored tensor can hold (NaN payloads, infinities, subnormals)."""
    from weightlock.io.safetensors_file import RAW_NUMPY, columns_float32, to_float32

    bits = np.random.default_rng(0).integers(0, 2**32, size=(23, 301), dtype=np.uint64)
    raw = (bits.astype(np.uint32) if dtype == "F32" else bits.astype(np.uint16)).view(RAW_NUMPY[dtype])
    ranges = [(0, 5), (17, 64), (300, 301)]
    ours = columns_float32(raw, ranges, dtype)
    theirs = to_float32(np.concatenate([raw[:, a:b] for a, b in ranges], axis=1), dtype)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_readers_of_two_shards_share_one_buffer_and_read_each_tensor_right(tmp_path):
    """The readers of one TensorReaders read into one buffer (memory: one block however many shards), kept
    between reads and handed to the next TensorReaders; reads interleaved across shards stay correct."""
    from weightlock.io.safetensors_file import TensorReaders

    a = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    b = -np.arange(32 * 8, dtype=np.float32).reshape(32, 8)
    write_safetensors(tmp_path / "a.safetensors", [TensorData("a", "F32", a.shape, a.tobytes())])
    write_safetensors(tmp_path / "b.safetensors", [TensorData("b", "F32", b.shape, b.tobytes())])
    ea = read_header(tmp_path / "a.safetensors").tensors["a"]
    eb = read_header(tmp_path / "b.safetensors").tensors["b"]
    with TensorReaders() as readers:
        blocks_a = readers[ea].row_blocks(ea, column_ranges=[(2, 5)], block_bytes=16 * 4 * 10)
        got_a = []
        for _, block in blocks_a:  # a read of the other shard between every block of this one
            got_a.append(block)
            np.testing.assert_array_equal(readers[eb].read_float32(eb), b)
        assert readers[ea]._buf is readers[eb]._buf
        shared = readers[ea]._buf
    np.testing.assert_array_equal(np.concatenate(got_a), a[:, 2:5])
    with TensorReaders() as again:
        assert again[ea]._buf is shared  # the idle buffer is reused, not allocated and faulted in again
        np.testing.assert_array_equal(again[ea].read_float32(ea), a)


def test_prefetch_asks_for_the_whole_range_in_pieces(tmp_path, monkeypatch):
    """Linux reads at most the readahead window of one POSIX_FADV_WILLNEED: the range is asked in pieces."""
    from weightlock.io import safetensors_file

    calls = []
    monkeypatch.setattr(safetensors_file.os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n)))
    safetensors_file.prefetch_range(0, 1000, 5 * safetensors_file.PREFETCH_PIECE_BYTES + 7)
    assert calls[0] == (1000, safetensors_file.PREFETCH_PIECE_BYTES) and calls[-1][1] == 7
    assert sum(n for _, n in calls) == 5 * safetensors_file.PREFETCH_PIECE_BYTES + 7
    assert all(off2 == off1 + n1 for (off1, n1), (off2, _) in zip(calls, calls[1:], strict=False))


def test_bf16_conversion_is_exact_and_rounding_matches_torch():
    import torch

    from weightlock.io.safetensors_file import float32_to_raw, raw_to_float32

    x = torch.randn(1000) * 10
    ours = raw_to_float32(float32_to_raw(x.numpy(), "BF16"), "BF16")
    np.testing.assert_array_equal(ours, x.to(torch.bfloat16).float().numpy())


def _hub_cache(tmp_path, src):
    """A real Hub cache layout (blobs + snapshot symlinks + refs), as huggingface_hub writes it."""
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in src.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        shutil.copyfile(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    return tmp_path / "hub", commit


def test_hub_repo_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    src = make_llama(tmp_path / "src", shard_kb=40)
    cache, commit = _hub_cache(tmp_path, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    checkpoint = open_checkpoint("org/tiny")
    assert checkpoint.name == "org/tiny" and checkpoint.revision == commit
    lock = random_lock(src)
    result = apply_lock("org/tiny", lock, out=tmp_path / "out")
    assert result.provenance["source"]["name"] == "org/tiny"
    assert verify_checkpoint(tmp_path / "out").ok
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir()), "output holds real files"
    assert (logits(tmp_path / "out") - logits(src, lock=lock)).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        open_checkpoint("org/absent")


def _raw_file(tmp_path, header: bytes, data: bytes = b"", length: int | None = None):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    "header,data,length,message",
    [
        (b"", b"", 0, "not valid JSON"),
        (b"{}", b"", 1 << 40, "exceeds"),
        (b"{}", b"", 64, "runs past the end"),
        (b"[1]", b"", None, "not a JSON object"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, None, "runs past the end"),
        (b'{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8, None, "unknown dtype"),
        (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, None, "needs 12 bytes"),
        (
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],'
            b'"data_offsets":[4,12]}}',
            b"\0" * 12,
            None,
            "overlaps",
        ),
        (
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],'
            b'"data_offsets":[4,8]}}',
            b"\0" * 8,
            None,
            "duplicate",
        ),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, data, length, message):
    path = _raw_file(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)
    if message != "duplicate":  # stricter than the library there (it keeps the last key); it refuses the rest
        from test_untrusted import _library_accepts

        assert not _library_accepts(path)


def test_truncated_file_is_refused(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x10\0\0")
    with pytest.raises(CheckpointError, match="shorter"):
        read_header(tmp_path / "t.safetensors")


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    src = make_llama(tmp_path / "src", shard_kb=40)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        open_checkpoint(src)
