"""Lock format v1: build, save, load, validation and refusals."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile

import numpy as np
import pytest
from conftest import rewrite_safetensors

from weightlock import SourceModel, build_lock, load_lock, save_lock
from weightlock.errors import LockFormatError
from weightlock.io.safetensors_file import TensorData, write_safetensors

SOURCE = SourceModel("LlamaForCausalLM", "llama", 4, 8, 16, 128, name="org/model", revision="abc")


def small_lock(**overrides):
    rng = np.random.default_rng(0)
    args = dict(layers=[0, 1, 3], heads=[2, 7, 0], directions=rng.normal(size=(3, 16)), scales=[1.0, 2.0, 0.5])
    args.update(overrides)
    return build_lock(args["layers"], args["heads"], args["directions"], args["scales"], SOURCE, default_alpha=5.0)


def test_roundtrip_is_exact_and_deterministic(tmp_path):
    lock = small_lock()
    digest_a = save_lock(lock, tmp_path / "a.wlock")
    digest_b = save_lock(small_lock(), tmp_path / "b.wlock")
    assert digest_a == digest_b, "same lock, same bytes"
    loaded = load_lock(tmp_path / "a.wlock")
    assert loaded.sha256 == digest_a
    assert loaded.source_model == SOURCE and loaded.default_alpha == 5.0
    np.testing.assert_array_equal(loaded.directions, lock.directions)
    np.testing.assert_array_equal(loaded.scales, lock.scales)
    assert loaded.heads_by_layer() == {0: [2], 1: [7], 3: [0]}
    assert np.allclose(np.linalg.norm(loaded.directions, axis=1), 1, atol=1e-6)


def test_build_folds_direction_norm_into_scale():
    direction = np.zeros((1, 16))
    direction[0, 3] = 4.0
    lock = build_lock([1], [2], direction, [0.5], SOURCE, default_alpha=1.0)
    assert lock.directions[0, 3] == 1.0 and lock.scales[0] == pytest.approx(2.0)


def test_displacements_place_each_head_in_its_slice():
    lock = small_lock()
    d = lock.displacements(2.0, num_heads=8)
    assert sorted(d) == [0, 1, 3]
    expected = 2.0 * lock.scales[1] * lock.directions[1]
    np.testing.assert_allclose(d[1][7 * 16 : 8 * 16], expected, rtol=1e-6)
    assert not d[1][: 7 * 16].any()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(directions=np.full((3, 16), np.nan)), "finite"),
        (dict(scales=[1.0, np.inf, 1.0]), "finite"),
        (dict(scales=[1.0, -1.0, 1.0]), "positive"),
        (dict(layers=[0, 1, 4]), "layer indices"),
        (dict(heads=[0, 1, 8]), "head indices"),
        (dict(layers=[1, 1, 0], heads=[2, 2, 0]), "listed twice"),
        (dict(directions=np.ones((3, 12))), "head_dim"),
        (dict(directions=np.zeros((3, 16))), "all zeros"),
    ],
)
def test_build_refuses_bad_arrays(overrides, message):
    with pytest.raises(LockFormatError, match=message):
        small_lock(**overrides)


def _rewrite_manifest(src, dst, edit):
    """Copy a lock, changing its manifest (bypassing the writer's validation)."""
    from weightlock.io.safetensors_file import read_header

    manifest = json.loads(read_header(src).metadata["weightlock"])
    edit(manifest)
    shutil.copyfile(src, dst)
    rewrite_safetensors(dst, lambda tensors: tensors, {"weightlock": json.dumps(manifest)})


def test_manifest_failing_schema_is_refused(tmp_path):
    save_lock(small_lock(), tmp_path / "ok.wlock")
    _rewrite_manifest(
        tmp_path / "ok.wlock", tmp_path / "bad.wlock", lambda m: m["source_model"].update(num_hidden_layers="four")
    )
    with pytest.raises(LockFormatError, match="schema"):
        load_lock(tmp_path / "bad.wlock")


def test_manifest_disagreeing_with_tensors_is_refused(tmp_path):
    save_lock(small_lock(), tmp_path / "ok.wlock")
    _rewrite_manifest(tmp_path / "ok.wlock", tmp_path / "bad.wlock", lambda m: m.update(num_heads_selected=2))
    with pytest.raises(LockFormatError, match="shape"):
        load_lock(tmp_path / "bad.wlock")


def test_nan_in_stored_lock_is_refused(tmp_path):
    save_lock(small_lock(), tmp_path / "ok.wlock")
    data = bytearray((tmp_path / "ok.wlock").read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    begin = 8 + header_size + header["scale"]["data_offsets"][0]
    data[begin : begin + 4] = np.array([np.nan], np.float32).tobytes()
    (tmp_path / "nan.wlock").write_bytes(bytes(data))
    with pytest.raises(LockFormatError, match="finite"):
        load_lock(tmp_path / "nan.wlock")


def test_pickle_in_disguise_is_refused_with_a_pointer_to_import_legacy(tmp_path):
    fake = tmp_path / "sneaky.wlock"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(LockFormatError, match="import-legacy"):
        load_lock(fake)


def test_model_shard_is_not_a_lock(tmp_path):
    write_safetensors(tmp_path / "shard.safetensors", [TensorData("w", "F32", (2,), b"\0" * 8)])
    with pytest.raises(LockFormatError, match="manifest"):
        load_lock(tmp_path / "shard.safetensors")


def test_missing_lock_file(tmp_path):
    with pytest.raises(LockFormatError, match="does not exist"):
        load_lock(tmp_path / "nope.wlock")
