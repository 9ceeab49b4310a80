"""import-legacy: the nine published SafetyLock files, and hostile pickles.

Reads ../shared/data/legacy-locks (see that folder's README)."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from conftest import LEGACY_LOCKS

from weightlock import import_legacy, load_lock, save_lock
from weightlock.core.legacy import PUBLISHED_LOCKS, NumpyOnlyUnpickler, read_legacy
from weightlock.core.lock import SourceModel
from weightlock.errors import LockFormatError, UnsafePickleError

PUBLISHED = sorted(LEGACY_LOCKS.glob("*.safelock"))
# file stem -> (heads, first layer >=, last layer <, layers of the source model)
EXPECTED = {
    "Meta-Llama-3-8B-Instruct": (24, 32),
    "Meta-Llama-3__1-8B-Instruct": (24, 32),
    "Meta-Llama-3-70B-Instruct": (24, 80),
    "Meta-Llama-3-70B-Instruct_48": (48, 80),
    "Meta-Llama-3__1-70B-Instruct": (24, 80),
    "Meta-Llama-3__1-70B-Instruct_48": (48, 80),
    "Mistral_Nemo_12B": (24, 40),
    "Mistral_large_123B": (24, 88),
    "Mistral_large_123B_48": (48, 88),
}


def test_all_nine_published_files_are_present():
    assert sorted(p.stem for p in PUBLISHED) == sorted(EXPECTED)


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_published_lock_converts_faithfully(tmp_path, path):
    heads, layers = EXPECTED[path.stem]
    lock = import_legacy(path)
    assert lock.num_heads_selected == heads and lock.head_dim == 128
    assert lock.source_model.num_hidden_layers == layers
    assert 0 <= lock.layers.min() and lock.layers.max() < layers
    save_lock(lock, tmp_path / "x.wlock")
    loaded = load_lock(tmp_path / "x.wlock")
    # scale * unit direction reproduces the legacy std * float16 direction
    legacy = {(layer, head): std * direction for layer, head, direction, std in read_legacy(path)}
    for layer, head, direction, scale in zip(
        loaded.layers, loaded.heads, loaded.directions, loaded.scales, strict=True
    ):
        np.testing.assert_allclose(scale * direction, legacy[(int(layer), int(head))], rtol=1e-5, atol=1e-6)


def _torch_zip(tmp_path, payload: bytes, name="evil.safelock"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")
    return path


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_pickle_calling_os_system_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model.layers.0.self_attn.head_out": [_System(f"touch {marker}")]}, protocol=2)
    path = _torch_zip(tmp_path, payload)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        import_legacy(path, SourceModel("LlamaForCausalLM", "llama", 2, 2, 128, 256))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x80\x02cbuiltins\neval\nq\x00X\x04\x00\x00\x001+1q\x01\x85q\x02Rq\x03.", "builtins.eval"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "_codecs.encode"),
        (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R.", "object"),
    ],
)
def test_other_unsafe_pickles_are_refused(payload, match):
    with pytest.raises(UnsafePickleError, match=match):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_numpy_arrays_still_load_through_the_restricted_unpickler():
    data = {"a": np.arange(4, dtype=np.float16), "b": np.int64(3), "c": np.float32(0.5)}
    loaded = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(data, protocol=2))).load()
    np.testing.assert_array_equal(loaded["a"], data["a"])
    assert loaded["b"] == 3 and loaded["c"] == np.float32(0.5)


def test_unknown_file_needs_the_model_shape(tmp_path):
    entries = {"model.layers.1.self_attn.head_out": [(np.int64(0), np.ones(128, np.float16), np.float16(0.5))]}
    path = _torch_zip(tmp_path, pickle.dumps(entries, protocol=2), "mine.safelock")
    with pytest.raises(LockFormatError, match="--model"):
        import_legacy(path)
    lock = import_legacy(path, SourceModel("LlamaForCausalLM", "llama", 2, 4, 128, 512))
    assert lock.heads_by_layer() == {1: [0]}
    with pytest.raises(LockFormatError, match="layer indices"):
        import_legacy(path, SourceModel("LlamaForCausalLM", "llama", 1, 4, 128, 512))


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "x.safelock").write_bytes(b"hello")
    with pytest.raises(LockFormatError, match="not a torch zip"):
        import_legacy(tmp_path / "x.safelock", SourceModel("LlamaForCausalLM", "llama", 2, 4, 128, 512))


def test_published_table_covers_exactly_the_shared_files():
    from weightlock.io.untrusted import file_sha256

    assert {file_sha256(p) for p in PUBLISHED} == set(PUBLISHED_LOCKS)
