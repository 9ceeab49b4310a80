"""GGUF files without llama.cpp: the written file checked by the gguf package's own reader, the dequantizing
reader against the gguf package's dequantizers, the edit record, and every class of bad input.

Small GGUF files are written by gguf.GGUFWriter (tests/gguf_helpers.py); llama.cpp's own verdict on the
output is tests/test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from gguf_helpers import finish, lock_for_gguf, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.errors import CheckpointError, UnsupportedError, WeightlockError
from weightlock.formats.gguf.edit import FileChanges, _kv_bytes, _kv_string, write_gguf_file
from weightlock.formats.gguf.file import GGUFTensorReader, open_gguf, read_gguf
from weightlock.formats.gguf.record import LOCK_KEY, RECORD_KEY
from weightlock.io.staging import FAILPOINT_VARIABLE

gguf = pytest.importorskip("gguf")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_bias(path: Path, lock, alpha: float, layer: int) -> np.ndarray:
    """W_o @ d computed independently: the gguf package's own reader and dequantizer, whole tensor."""
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == f"blk.{layer}.attn_output.weight")
    weight = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(int(tensor.shape[1]), -1)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    heads = int(reader.fields[f"{arch}.attention.head_count"].parts[-1][0])
    d = lock.displacements(alpha, heads)[layer]
    return weight.astype(np.float64) @ d.astype(np.float64)


@pytest.mark.parametrize("out_type", ["F32", "F16", "Q8_0", "Q4_0", "Q5_1"])
def test_apply_carries_everything_and_adds_the_biases(tmp_path, out_type):
    source = write_gguf(tmp_path / "src.gguf", out_type=out_type, extra={"general.name": "tiny"})
    before = _sha(source)
    lock = lock_for_gguf(source, n_heads=4)
    result = apply_lock(source, lock, out=tmp_path / "out.gguf", alpha=2.5)
    assert _sha(source) == before and result.report.ok

    # the gguf package's own reader: every key and tensor of the source, byte for byte, plus ours
    src, out = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "out.gguf"))
    for key, field in src.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in out.fields
        assert all(np.array_equal(a, b) for a, b in zip(field.parts, out.fields[key].parts, strict=True)), key
    assert {RECORD_KEY, LOCK_KEY} <= set(out.fields)
    out_tensors = {t.name: t for t in out.tensors}
    for tensor in src.tensors:
        assert np.array_equal(np.asarray(tensor.data), np.asarray(out_tensors[tensor.name].data)), tensor.name
    layers = sorted(set(lock.layers.tolist()))
    added = {name for name in out_tensors if name.endswith("attn_output.bias")}
    assert added == {f"blk.{layer}.attn_output.bias" for layer in layers}
    for layer in layers:
        bias = out_tensors[f"blk.{layer}.attn_output.bias"]
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_allclose(
            np.asarray(bias.data), _expected_bias(source, lock, 2.5, layer), rtol=1e-5, atol=1e-5
        )
    assert out.alignment == src.alignment and all(t.data_offset % out.alignment == 0 for t in out.tensors)
    record = json.loads(bytes(out.fields[RECORD_KEY].parts[-1]).decode())
    assert record["alpha"] == 2.5 and record["tensors"]["added"] == sorted(added, key=lambda n: int(n.split(".")[1]))


def _random_quantized_gguf(path: Path, type_name: str, seed: int) -> Path:
    """A GGUF whose attn_output weights are random bytes of a quantized type (the gguf package cannot
    quantize K-quants, but the reader must slice any type's blocks correctly)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_embedding_length(24)
    cols = 512
    raw = rng.integers(0, 256, size=(24, cols // block * size), dtype=np.uint8)
    if size > 2 and type_name not in ("F32", "F16", "BF16"):
        raw[:, ::size] = rng.integers(0, 60, size=raw[:, ::size].shape)  # keep fp16 scales modest (mostly)
    writer.add_tensor("blk.0.attn_output.weight", raw, raw_dtype=qtype)
    finish(writer)
    return path


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes decode to some inf and nan scales
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    type_name=st.sampled_from(["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS", "BF16", "F16"]),
    heads=st.sets(st.integers(0, 3), min_size=1),
    seed=st.integers(0, 3),
)
def test_row_blocks_equal_the_gguf_dequantizer_for_any_columns(tmp_path, type_name, heads, seed):
    """Dequantizing only the blocks that cover the locked heads' columns gives exactly the columns of the
    gguf package's whole-tensor dequantization (heads of 128 columns: inside, across and at block edges)."""
    path = _random_quantized_gguf(tmp_path / f"{type_name}-{seed}.gguf", type_name, seed)
    model = open_gguf(path)
    tensor = model.tensors["blk.0.attn_output.weight"]
    ranges = []
    for head in sorted(heads):
        if ranges and ranges[-1][1] == head * 128:
            ranges[-1] = (ranges[-1][0], (head + 1) * 128)
        else:
            ranges.append((head * 128, (head + 1) * 128))
    reference = gguf.GGUFReader(str(path)).tensors[0]
    full = gguf.quants.dequantize(np.asarray(reference.data), reference.tensor_type).reshape(24, -1)
    expected = np.concatenate([full[:, a:b] for a, b in ranges], axis=1)
    with GGUFTensorReader(model.files[0]) as reader:
        got = np.concatenate([block for _, block in reader.matrix_row_blocks(tensor, ranges)])
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_existing_bias_is_added_to_and_a_second_edit_undoes_the_first(tmp_path, capsys):
    source = write_gguf(tmp_path / "sc.gguf", arch="starcoder2", bias=True)
    lock = lock_for_gguf(source, model_type="starcoder2")
    first = apply_lock(source, lock, out=tmp_path / "a.gguf", alpha=2.0)
    assert first.plan.added == [] and len(first.plan.replaced) == len(set(lock.layers.tolist()))
    original = gguf.GGUFReader(str(source))
    for layer in set(lock.layers.tolist()):
        name = f"blk.{layer}.attn_output.bias"
        base = next(np.asarray(t.data) for t in original.tensors if t.name == name)
        got = next(np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors if t.name == name)
        np.testing.assert_allclose(got, base + _expected_bias(source, lock, 2.0, layer), rtol=1e-5, atol=1e-5)
    apply_lock(tmp_path / "a.gguf", lock, out=tmp_path / "b.gguf", alpha=-2.0)
    assert verify_checkpoint(
        tmp_path / "b.gguf", source=source, engines="llama.cpp"
    ).ok  # the chain's first originals: the source's
    assert not verify_checkpoint(
        tmp_path / "b.gguf", engines="llama.cpp"
    ).ok  # without the source they are unverifiable
    for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors:
        base = next(np.asarray(s.data) for s in original.tensors if s.name == t.name)
        np.testing.assert_allclose(np.asarray(t.data), base, atol=1e-5)
    code, text, _ = run_cli(capsys, "inspect", str(tmp_path / "b.gguf"), "--json")
    info = json.loads(text)
    assert code == 0 and info["locked"]["edits"] == 2 and info["locked"]["alpha"] == -2.0
    assert info["llama_cpp_output_bias"] == "existing" and info["attn_output_types"] == {"F32": 2}


def _tampered(tmp_path: Path, locked: Path, record_edit=None, lock_bytes=None) -> Path:
    """A copy of a locked file whose record and/or embedded lock bytes were replaced."""
    source = read_gguf(locked)
    record = json.loads(source.metadata[RECORD_KEY].value)  # type: ignore[arg-type]
    if record_edit is not None:
        record_edit(record)
    if lock_bytes is None:
        entry = source.metadata[LOCK_KEY]
        lock_bytes = locked.read_bytes()[entry.start + 8 + len(LOCK_KEY) + 16 : entry.end]
    out = tmp_path / "tampered.gguf"
    out.unlink(missing_ok=True)
    write_gguf_file(
        source,
        out,
        [_kv_string(RECORD_KEY, json.dumps(record)), _kv_bytes(LOCK_KEY, lock_bytes)],
        [],
        FileChanges(),
        None,
    )
    return out


@pytest.fixture
def locked_file(tmp_path):
    source = write_gguf(tmp_path / "src.gguf", out_type="Q8_0")
    lock = lock_for_gguf(source, n_heads=4)
    save_lock(lock, tmp_path / "lock.wlock")
    apply_lock(source, tmp_path / "lock.wlock", out=tmp_path / "locked.gguf", alpha=3.0)
    return tmp_path / "locked.gguf"


def test_untampered_copy_verifies(tmp_path, locked_file):
    assert verify_checkpoint(_tampered(tmp_path, locked_file), engines="llama.cpp").ok


@pytest.mark.parametrize(
    "edit, failing",
    [
        (lambda r: r.update(alpha=r["alpha"] + 0.5), "lock biases"),
        (lambda r: r.update(extra="x"), "provenance"),
        (lambda r: r["locked_layers"].popitem(), "provenance"),
        (lambda r: r["tensors"].update(added=r["tensors"]["added"][1:]), "provenance"),
        (lambda r: r["lock"].update(sha256="0" * 64), "provenance"),
        (lambda r: r.update(architecture="granite"), "provenance"),
        (
            lambda r: r["tensors"]["replaced"].update({r["tensors"]["added"][0]: {"type": 0, "data": "AAAA"}}),
            "provenance",
        ),
    ],
)
def test_a_tampered_record_fails_verify(tmp_path, locked_file, edit, failing):
    report = verify_checkpoint(_tampered(tmp_path, locked_file, edit), engines="llama.cpp")
    assert not report.ok and failing in {c.name for c in report.checks if c.status == "fail"}, report.failures()


def test_another_lock_embedded_fails_verify(tmp_path, locked_file):
    other = lock_for_gguf(locked_file, n_heads=4, seed=7)
    save_lock(other, tmp_path / "other.wlock")
    report = verify_checkpoint(
        _tampered(tmp_path, locked_file, lock_bytes=(tmp_path / "other.wlock").read_bytes()), engines="llama.cpp"
    )
    assert not report.ok and "does not match the recorded lock hash" in " ".join(report.failures())


def test_a_changed_bias_value_fails_verify(tmp_path, locked_file):
    model = open_gguf(locked_file)
    bias = next(t for n, t in model.tensors.items() if n.endswith("attn_output.bias"))
    data = bytearray(locked_file.read_bytes())
    position = model.files[0].data_start + bias.offset + 8
    data[position : position + 4] = struct.pack("<f", 12.5)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    report = verify_checkpoint(broken, engines="llama.cpp")
    assert [c.name for c in report.checks if c.status == "fail"] == ["lock biases"]


# --- bad input: each refused with exit 3 or 4, nothing written, the source unchanged ------------------------


def _valid(tmp_path: Path) -> tuple[Path, bytes]:
    path = write_gguf(tmp_path / "valid.gguf", extra={"general.name": "tiny"})
    save_lock(lock_for_gguf(path), tmp_path / "lock.wlock")
    return path, path.read_bytes()


def _corruptions(path: Path, data: bytes) -> dict[str, tuple[bytes, int]]:
    parsed = read_gguf(path)
    name_entry = parsed.metadata["general.name"]
    first_tensor = parsed.kv_end  # the first tensor info: name length at this offset
    name_len = struct.unpack_from("<Q", data, first_tensor)[0]
    dims_at = first_tensor + 8 + name_len  # n_dims (u32), dims (u64 each), type (u32), offset (u64)
    n_dims = struct.unpack_from("<I", data, dims_at)[0]
    type_at = dims_at + 4 + 8 * n_dims
    second = type_at + 4 + 8
    second_name_len = struct.unpack_from("<Q", data, second)[0]
    second_offset_at = (
        second + 8 + second_name_len + 4 + 8 * struct.unpack_from("<I", data, second + 8 + second_name_len)[0] + 4
    )
    arch = parsed.metadata["general.architecture"]

    def put(at: int, fmt: str, value) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, at, value)
        return bytes(out)

    def replace_string(entry, new: bytes) -> bytes:
        key_len = struct.unpack_from("<Q", data, entry.start)[0]
        value_at = entry.start + 8 + key_len + 4
        return data[:value_at] + struct.pack("<Q", len(new)) + new + data[entry.end :]

    return {
        "empty": (b"", 3),
        "bad magic": (b"GGUX" + data[4:], 3),
        "version 1": (put(4, "<I", 1), 4),
        "version 4": (put(4, "<I", 4), 4),
        "truncated in the metadata": (data[: name_entry.start + 5], 3),
        "truncated in the tensor infos": (data[: first_tensor + 12], 3),
        "truncated in the data": (data[: len(data) - 100], 3),
        "string length past the end": (put(name_entry.start + 8 + len("general.name") + 4, "<Q", 1 << 40), 3),
        "tensor count beyond any file": (put(8, "<Q", 1 << 40), 3),
        "metadata count past the end": (put(16, "<Q", 100_000), 3),
        "unknown value type": (put(name_entry.start + 8 + len("general.name"), "<I", 77), 3),
        "five dimensions": (put(dims_at, "<I", 5), 3),
        "unknown tensor type": (put(type_at, "<I", 999), 4),
        "overlapping tensors": (put(second_offset_at, "<Q", 0), 3),
        "gap between tensors": (put(second_offset_at, "<Q", 1 << 20), 3),
        "unsupported architecture": (replace_string(arch, b"qwen3"), 4),
        "qwen2 architecture without its keys": (replace_string(arch, b"qwen2"), 3),
        "unknown architecture": (replace_string(arch, b"mamba9"), 4),
    }


def test_every_corruption_is_refused_cleanly(tmp_path, capsys):
    path, data = _valid(tmp_path)
    for what, (bad, code_expected) in _corruptions(path, data).items():
        source = tmp_path / "bad.gguf"
        source.write_bytes(bad)
        out = tmp_path / "out" / "x.gguf"
        out.parent.mkdir(exist_ok=True)  # the CLI creates the output, not the folder it goes in
        code, _, err = run_cli(capsys, "apply", str(source), "--lock", str(tmp_path / "lock.wlock"), "--out", str(out))
        assert code == code_expected, (what, code, err)
        assert "Traceback" not in err and "hint:" in err, (what, err)
        assert not out.parent.exists() or not any(out.parent.iterdir()), what
        assert source.read_bytes() == bad, what
        code, text, _ = run_cli(capsys, "verify", str(source), "--engines", "llama.cpp")
        if "architecture" in what:  # a sound file of an architecture weightlock cannot lock: verify only warns
            assert code == 0 and "[warn] architecture" in text, (what, text)
        else:
            assert code == 1 and "FAIL" in text, (what, text)  # verify exits 1 for a failed check


def test_huge_array_counts_are_refused_without_looping(tmp_path):
    """An array claiming 2**60 items (the gguf package's own reader would loop on it) is refused at once."""
    path = tmp_path / "a.gguf"
    key = b"general.tags"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 1 << 60)  # array of strings
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + b"\0" * 64)
    with pytest.raises(CheckpointError, match="more than the header holds"):
        read_gguf(path)
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 1 << 60)  # array of uint8
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + b"\0" * 64)
    with pytest.raises(CheckpointError, match="more than the header holds"):
        read_gguf(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_header_damage_gives_a_weightlock_error_or_a_valid_parse(tmp_path, data):
    path, valid = _valid(tmp_path)
    header_end = read_gguf(path).data_start
    damaged = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    target = tmp_path / "damaged.gguf"
    target.write_bytes(bytes(damaged))
    try:
        open_gguf(target)
    except WeightlockError:
        pass


def test_unsupported_quant_type_and_refused_outputs(tmp_path, capsys):
    source = write_gguf(tmp_path / "src.gguf")
    save_lock(lock_for_gguf(source), tmp_path / "lock.wlock")
    lock = str(tmp_path / "lock.wlock")
    # an attn_output stored as I8 (no dequantizer)
    writer = gguf.GGUFWriter(str(tmp_path / "i8.gguf"), "llama")
    for key, value in (("block_count", 2), ("attention.head_count", 4), ("embedding_length", 32)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.attention.key_length", 8)
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_output.weight", np.ones((32, 32), dtype=np.int8))
    finish(writer)
    code, _, err = run_cli(
        capsys, "apply", str(tmp_path / "i8.gguf"), "--lock", lock, "--out", str(tmp_path / "o.gguf")
    )
    assert code == 4 and "I8" in err and not (tmp_path / "o.gguf").exists()
    # output refusals
    code, _, err = run_cli(capsys, "apply", str(source), "--lock", lock, "--out", str(source))
    assert code == 5 and "source" in err
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    code, _, err = run_cli(capsys, "apply", str(source), "--lock", lock, "--out", str(tmp_path / "taken.gguf"))
    assert code == 5 and (tmp_path / "taken.gguf").read_bytes() == b"mine"
    code, _, err = run_cli(capsys, "apply", str(source), "--lock", lock, "--in-place")
    assert code == 3 and "--out" in err
    code, text, _ = run_cli(
        capsys, "apply", str(source), "--lock", lock, "--out", str(tmp_path / "taken.gguf"), "--force", "--json"
    )
    assert code == 0 and json.loads(text)["format"] == "gguf"
    assert verify_checkpoint(tmp_path / "taken.gguf", engines="llama.cpp").ok


def test_split_set_problems_are_refused(tmp_path):
    """Split sets written by the gguf package's writer (split.* keys as llama.cpp's gguf-split writes them)."""
    folder = tmp_path / "split"
    folder.mkdir()
    names = [folder / f"m-0000{i}-of-00002.gguf" for i in (1, 2)]
    for index, path in enumerate(names):
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", 2)
        writer.add_int32("split.tensors.count", 3)
        if index == 0:
            writer.add_block_count(1)
            writer.add_head_count(4)
            writer.add_embedding_length(32)
            writer.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
            writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
        else:
            writer.add_tensor("blk.0.attn_output.weight", np.eye(32, dtype=np.float32))
        finish(writer)
    model = open_gguf(names[0])
    assert model.split_count == 2 and model.tensors["blk.0.attn_output.weight"].file_index == 1
    lock = lock_for_gguf(names[0], n_heads=2)
    result = apply_lock(names[0], lock, out=tmp_path / "out" / "locked.gguf", alpha=1.0)
    assert [p.name for p in result.outputs] == ["locked-00001-of-00002.gguf", "locked-00002-of-00002.gguf"]
    assert open_gguf(result.outputs[0]).files[0].value("split.tensors.count") == 4
    with pytest.raises(CheckpointError, match="not the first"):
        open_gguf(names[1])
    second = names[1].read_bytes()
    names[1].unlink()
    with pytest.raises(CheckpointError, match="lacks part 2 of 2"):
        open_gguf(names[0])
    names[1].write_bytes(second.replace(b"split.tensors.count", b"split.tensors.cOunt"))
    open_gguf(names[0])  # only the first file's count is the set's
    first = names[0].read_bytes()
    entry = read_gguf(names[0]).metadata["split.tensors.count"]
    names[0].write_bytes(first[: entry.end - 4] + struct.pack("<i", 9) + first[entry.end :])
    with pytest.raises(CheckpointError, match="declares 9 tensors"):
        open_gguf(names[0])


def test_refused_architecture_names_the_reason(tmp_path):
    source = write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(UnsupportedError, match="no attn_output.bias"):
        apply_lock(source, lock_for_gguf(source, model_type="qwen2"), out=tmp_path / "o.gguf")


def _apply_process(tmp_path: Path, source: Path, lock: Path, out: Path, failpoint: str | None):
    env = dict(os.environ, **({FAILPOINT_VARIABLE: failpoint} if failpoint else {}))
    code = (
        "import sys; from weightlock import apply_lock; "
        "apply_lock(sys.argv[1], sys.argv[2], out=sys.argv[3], alpha=2.0)"
    )
    return subprocess.run([sys.executable, "-c", code, str(source), str(lock), str(out)], env=env, capture_output=True)


def test_sigkill_at_every_step_leaves_no_partial_output_and_the_source_untouched(tmp_path):
    """Killed at each step in turn: the output is either absent or complete and verified; the next run tidies
    what the killed ones left and succeeds."""
    source = write_gguf(tmp_path / "src.gguf", out_type="Q8_0")
    save_lock(lock_for_gguf(source), tmp_path / "lock.wlock")
    before = _sha(source)
    out = tmp_path / "out" / "locked.gguf"
    out.parent.mkdir(exist_ok=True)  # the CLI creates the output, not the folder it goes in
    step = 1
    while True:
        result = _apply_process(tmp_path, source, tmp_path / "lock.wlock", out, f"#{step}")
        assert _sha(source) == before
        if result.returncode == 0:
            break
        assert result.returncode == -9, result.stderr
        if out.exists():  # killed after the rename: the output is whole
            assert verify_checkpoint(out, engines="llama.cpp").ok
            out.unlink()
        step += 1
        assert step < 50
    assert step >= 3 and verify_checkpoint(out, engines="llama.cpp").ok
    assert [p.name for p in out.parent.iterdir()] == ["locked.gguf"]


@pytest.mark.parametrize(
    "name, values, problem",
    [
        ("blk.7.attn_output.bias", np.zeros(32, dtype=np.float32), "not a bias of a layer"),
        ("blk.0.attn_output.bias", np.full(32, np.nan, dtype=np.float32), "NaN or Inf"),
        ("blk.0.attn_output.bias", np.zeros(16, dtype=np.float32), "expected F32/F16 [32]"),
    ],
)
def test_bad_bias_tensors_fail_verify(tmp_path, name, values, problem):
    writer = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_embedding_length(32)
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_output.weight", np.eye(32, dtype=np.float32))
    writer.add_tensor(name, values)
    finish(writer)
    report = verify_checkpoint(tmp_path / "b.gguf", engines="llama.cpp")
    failed = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in failed] == ["bias tensors"] and problem in " ".join(failed[0].details), failed


def test_eval_refuses_a_locked_gguf_that_transformers_would_load_unlocked(tmp_path, capsys):
    """transformers' GGUF loader drops attn_output.bias for llama-like files: measuring a locked GGUF through it
    would report the unlocked model, so eval refuses (exit 4) before loading anything."""
    source = write_gguf(tmp_path / "src.gguf")
    save_lock(lock_for_gguf(source), tmp_path / "lock.wlock")
    apply_lock(source, tmp_path / "lock.wlock", out=tmp_path / "locked.gguf")
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "locked.gguf"), "--limit", "1")
    assert code == 4 and "--engine llama-cpp" in err and "Traceback" not in err


def test_ctrl_c_in_a_gguf_apply_leaves_nothing(tmp_path):
    source = write_gguf(tmp_path / "src.gguf")
    save_lock(lock_for_gguf(source), tmp_path / "lock.wlock")
    out = tmp_path / "out" / "locked.gguf"
    out.parent.mkdir(exist_ok=True)  # the CLI creates the output, not the folder it goes in
    env = dict(os.environ, **{FAILPOINT_VARIABLE: "gguf-data-copied:INT"})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightlock",
            "apply",
            str(source),
            "--lock",
            str(tmp_path / "lock.wlock"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("out_type", ["F32", "Q8_0"])
def test_verify_deep_finds_nan_in_any_tensor(tmp_path, out_type, capsys):
    source = write_gguf(tmp_path / "src.gguf", out_type=out_type)
    code, text, _ = run_cli(capsys, "verify", str(source), "--deep", "--engines", "llama.cpp")
    assert code == 0 and "every tensor (5) dequantizes to finite values" in text, text
    model = open_gguf(source)
    weight = model.tensors["blk.1.attn_output.weight"]
    data = bytearray(source.read_bytes())
    at = model.files[0].data_start + weight.offset
    # F32: the first value; Q8_0: the first block's fp16 scale
    nan = struct.pack("<f", float("nan")) if out_type == "F32" else np.array([np.nan], dtype=np.float16).tobytes()
    data[at : at + len(nan)] = nan
    source.write_bytes(bytes(data))
    code, text, _ = run_cli(capsys, "verify", str(source), "--deep", "--engines", "llama.cpp")
    assert code == 1 and "NaN or Inf in 1 tensors" in text and "blk.1.attn_output.weight" in text, text
    assert (
        run_cli(capsys, "verify", str(source), "--engines", "llama.cpp")[0] == 0
    )  # without --deep, weights are not scanned
