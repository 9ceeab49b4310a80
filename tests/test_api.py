"""The dispatcher (``weightlock.api``): every kind of location the public API takes goes to the right format.

A path, a cached-Hub-id-like string, or a model weightlock already opened (a folder's ``Checkpoint``, a
``GGUFModel``) is accepted wherever a location is; anything else, and a ``source`` of the other format, is refused
with an error of the one family (exit 3, a hint), never a bare ``TypeError``; in place and revert on a GGUF file
are refused by name. Real files throughout: a tiny Llama folder and a GGUF written by the ``gguf`` package.
"""

from __future__ import annotations

import pytest
from conftest import make_llama, random_lock
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import apply_in_place, apply_lock, open_checkpoint, revert, verify_checkpoint
from weightlock.errors import InvalidInputError, WeightlockError
from weightlock.formats import GGUF, SAFETENSORS, detect
from weightlock.formats.gguf.file import open_gguf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    llama = make_llama(root / "llama")
    gguf = write_gguf(root / "llama.gguf")
    return {
        "llama": llama,
        "llama-out": apply_lock(llama, random_lock(llama), out=root / "llama-out", loader_check=False).out,
        "gguf": gguf,
        "gguf-out": apply_lock(gguf, lock_for_gguf(gguf), out=root / "gguf-out.gguf").out,
    }


def test_detect_decides_from_the_name_or_the_opened_model(models, tmp_path):
    assert detect(models["llama"]) == SAFETENSORS and detect(str(models["gguf"])) == GGUF
    assert detect(open_checkpoint(models["llama"])) == SAFETENSORS and detect(open_gguf(models["gguf"])) == GGUF
    folder_named_gguf = tmp_path / "x.gguf"
    folder_named_gguf.mkdir()
    assert detect(folder_named_gguf) == SAFETENSORS  # a folder is never a GGUF file, whatever its name
    assert detect("org/model.GGUF") == GGUF
    for bad in (42, None, b"llama", 1.5, ["a"]):
        with pytest.raises(InvalidInputError) as refused:
            detect(bad)
        assert refused.value.exit_code == 3 and refused.value.hint


@pytest.mark.parametrize("bad", [42, None, b"x.gguf"])
def test_apply_refuses_what_is_not_a_location(models, tmp_path, bad):
    with pytest.raises(InvalidInputError):
        apply_lock(bad, random_lock(models["llama"]), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_opened_models_are_verified_as_their_paths(models):
    for key, opener in (("llama-out", open_checkpoint), ("gguf-out", open_gguf)):
        # the GGUF is for llama.cpp (transformers' and SGLang's GGUF loaders drop the bias)
        by_path = verify_checkpoint(models[key], loader_check=False, engines="llama.cpp,vllm")
        by_object = verify_checkpoint(opener(models[key]), loader_check=False, engines="llama.cpp,vllm")
        assert by_path.ok and by_object.ok
        assert [(c.name, c.status) for c in by_path.checks] == [(c.name, c.status) for c in by_object.checks]


def test_a_source_of_the_other_format_is_refused(models):
    cases = [
        (models["llama-out"], open_gguf(models["gguf"])),
        (models["gguf-out"], open_checkpoint(models["llama"])),
        (models["llama-out"], models["gguf"]),
        (models["gguf-out"], models["llama"]),
    ]
    for checkpoint, source in cases:
        with pytest.raises(InvalidInputError) as refused:
            verify_checkpoint(checkpoint, source=source, loader_check=False)
        assert "--source" in refused.value.message and refused.value.hint


def test_in_place_and_revert_refuse_a_gguf_file_by_name(models):
    before = models["gguf"].read_bytes()
    for call in (
        lambda: apply_in_place(models["gguf"], lock_for_gguf(models["gguf"])),
        lambda: apply_in_place(open_gguf(models["gguf"]), lock_for_gguf(models["gguf"])),
        lambda: revert(models["gguf"]),
    ):
        with pytest.raises(WeightlockError) as refused:
            call()
        assert refused.value.exit_code == 3 and "GGUF" in refused.value.message and refused.value.hint
    assert models["gguf"].read_bytes() == before


def test_an_opened_folder_is_edited_in_place_and_reverted(models, tmp_path):
    import shutil

    folder = shutil.copytree(models["llama"], tmp_path / "copy")
    result = apply_in_place(open_checkpoint(folder), random_lock(folder), loader_check=False)
    assert result.report.ok and verify_checkpoint(folder, loader_check=False).locked is not None
    revert(open_checkpoint(folder))
    assert verify_checkpoint(folder, loader_check=False).locked is None
