"""The class check's remembered verdicts (weightlock/engines/class_check_cache.py): a verdict comes back only for
exactly the inputs it was computed from (the config, every tensor's name, dtype and shape, the installed
transformers and torch, weightlock's own check), only a pass or a warning is kept, and a store entry that is not
exactly what weightlock writes is a miss, never a pass."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_llama, random_lock

from weightlock import verify_checkpoint
from weightlock.core.report import Report
from weightlock.engines import class_check_cache
from weightlock.engines import transformers as transformers_check
from weightlock.engines.transformers import check_loader_names as _check_loader_names
from weightlock.formats.safetensors.folder import open_checkpoint
from weightlock.io.safetensors_file import TensorData, read_header, write_safetensors


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The cache on, in a private folder of this test's; this process's store empty before and after."""
    folder = tmp_path / "class-check"
    monkeypatch.setenv(class_check_cache.CACHE_VARIABLE, str(folder))
    class_check_cache.forget()
    class_check_cache._environment.cache_clear()
    yield folder
    class_check_cache.forget()
    class_check_cache._environment.cache_clear()


def names_check(folder: Path):
    report = Report(str(folder))
    _check_loader_names(open_checkpoint(folder), report)
    return next(c for c in report.checks if c.name == "transformers_names")


def key(folder: Path):
    return class_check_cache.key_for(open_checkpoint(folder))


def rewrite_tensors(folder: Path, edit) -> None:
    """Rewrite the single model.safetensors through ``edit(list[TensorData])`` (zeros: only names, dtypes and
    shapes matter to the class check)."""
    path = folder / "model.safetensors"
    header = read_header(path)
    tensors = [TensorData(e.name, e.dtype, e.shape, b"\0" * e.nbytes) for e in header.tensors.values()]
    path.unlink()
    write_safetensors(path, edit(tensors))


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def test_a_pass_is_remembered_and_recalled_for_an_identical_checkpoint(tmp_path, store):
    src = make_llama(tmp_path / "src")
    first = names_check(src)
    assert first.status == "pass"
    assert len(entries(store)) == 1
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert key(copy) == key(src)  # the key is the content, not the folder's path
    class_check_cache.forget()  # from disk, as a new process would
    again = names_check(copy)
    assert (again.status, again.message) == (first.status, first.message + class_check_cache.RECALLED)


@pytest.mark.parametrize(
    "change",
    [
        "rename a tensor",
        "change a shape",
        "change a dtype",
        "add a tensor",
        "change a config field",
        "add a config field",
        "add a file transformers may read",
        "change a versioned config",
    ],
)
def test_a_changed_checkpoint_is_another_key(tmp_path, store, change):
    src = make_llama(tmp_path / "src")
    before = key(src)
    assert before is not None
    if change == "rename a tensor":
        rewrite_tensors(
            src,
            lambda ts: [replace(t, name="model.norm.weights") if t.name == "model.norm.weight" else t for t in ts],
        )
    elif change == "change a shape":
        rewrite_tensors(
            src,
            lambda ts: [
                TensorData(t.name, t.dtype, (t.shape[0] + 1,), b"\0" * 4 * (t.shape[0] + 1))
                if t.name == "model.norm.weight"
                else t
                for t in ts
            ],
        )
    elif change == "change a dtype":
        rewrite_tensors(
            src,
            lambda ts: [
                TensorData(t.name, "F16", t.shape, b"\0" * 2 * t.shape[0]) if t.name == "model.norm.weight" else t
                for t in ts
            ],
        )
    elif change == "add a tensor":
        rewrite_tensors(
            src, lambda ts: [*ts, TensorData("model.layers.0.self_attn.o_proj.bias", "F32", (64,), b"\0" * 256)]
        )
    elif change == "add a file transformers may read":
        (src / "modeling_custom.py").write_text("# remote code a config's auto_map could name\n")
    elif change == "change a versioned config":
        (src / "config.4.0.0.json").write_text((src / "config.json").read_text())
        assert key(src) != before
        before = key(src)
        (src / "config.4.0.0.json").write_text((src / "config.json").read_text().replace("{", '{"x": 1, ', 1))
    else:
        config = json.loads((src / "config.json").read_text())
        if change == "change a config field":
            config["rms_norm_eps"] = 2e-5
        else:
            config["attention_bias"] = True
        (src / "config.json").write_text(json.dumps(config))
    assert key(src) != before


def test_a_changed_checkpoint_is_not_passed_by_the_verdict_of_the_original(tmp_path, store):
    """The attack the cache must not open: a pass stored for the good checkpoint, then a tensor transformers would
    drop added (an o_proj bias with attention_bias off): the check runs and fails."""
    src = make_llama(tmp_path / "src")
    assert names_check(src).status == "pass"
    rewrite_tensors(
        src, lambda ts: [*ts, TensorData("model.layers.0.self_attn.o_proj.bias", "F32", (64,), b"\0" * 256)]
    )
    assert names_check(src).status == "fail"
    assert len(entries(store)) == 1  # a failure is not remembered


def test_another_transformers_is_another_key(tmp_path, store, monkeypatch):
    """The environment part of the key: another transformers (another version's files, another install) or
    another torch changes it; an upgrade in place changes the files' sizes and times."""
    fake = tmp_path / "site-packages"
    for package in ("transformers", "torch"):
        (fake / package / "models" / "llama").mkdir(parents=True)
        (fake / package / "__init__.py").write_text("__version__ = '5.0.0'\n")
        (fake / package / "version.py").write_text("__version__ = '5.0.0'\n")
    (fake / "transformers" / "models" / "llama" / "modeling_llama.py").write_text("# 1\n")
    monkeypatch.setattr(class_check_cache, "_package_origin", lambda name: str(fake / name / "__init__.py"))
    src = make_llama(tmp_path / "src")
    before = key(src)

    def after(edit):
        edit()
        class_check_cache._environment.cache_clear()
        return key(src)

    seen = {before}
    for edit in (
        lambda: (fake / "transformers" / "__init__.py").write_text("__version__ = '5.0.1'\n"),  # an upgrade
        lambda: (fake / "transformers" / "models" / "llama" / "modeling_llama.py").write_text("# 2, edited\n"),
        lambda: (fake / "transformers" / "models" / "auto").mkdir(parents=True),
        lambda: (fake / "torch" / "version.py").write_text("__version__ = '5.0.1+cu'\n"),
        lambda: (fake / "some_quantization_library").mkdir(),  # an install beside them
    ):
        changed = after(edit)
        assert changed not in seen
        seen.add(changed)
    monkeypatch.setattr(class_check_cache, "_package_origin", lambda name: None)  # not found: nothing is remembered
    class_check_cache._environment.cache_clear()
    assert key(src) is None


def test_the_weightlock_check_itself_is_part_of_the_key(tmp_path, store, monkeypatch):
    src = make_llama(tmp_path / "src")
    before = key(src)
    monkeypatch.setattr(class_check_cache, "_weightlock_code", lambda: "another weightlock")
    class_check_cache._environment.cache_clear()
    assert key(src) != before


def test_a_versioned_config_that_drops_the_bias_is_not_passed_by_a_verdict_for_one_that_keeps_it(tmp_path, store):
    """transformers reads the newest ``config.X.Y.Z.json`` a config.json's ``configuration_files`` lists, not
    config.json: two folders with the same config.json and tensors, one whose versioned config declares the bias
    and one whose versioned config does not. The second must not recall the first's pass (transformers would drop
    its biases: the lock would be silently gone)."""
    src = make_llama(tmp_path / "src", attention_bias=True)
    config = json.loads((src / "config.json").read_text())
    folders = {}
    for name, bias in (("keeps", True), ("drops", False)):
        folder = shutil.copytree(src, tmp_path / name)
        (folder / "config.4.0.0.json").write_text(json.dumps(dict(config, attention_bias=bias)))
        (folder / "config.json").write_text(json.dumps(dict(config, configuration_files=["config.4.0.0.json"])))
        folders[name] = folder
    assert names_check(folders["keeps"]).status == "pass"
    class_check_cache.forget()
    dropped = names_check(folders["drops"])
    assert dropped.status == "fail" and class_check_cache.RECALLED not in dropped.message


def test_a_file_changed_while_the_check_reads_stores_nothing(tmp_path, store, monkeypatch):
    """The key is taken again after the check: a config changed meanwhile leaves no verdict under the old key."""
    src = make_llama(tmp_path / "src")
    real = transformers_check.run_loader_check

    def changing(checkpoint, report):
        real(checkpoint, report)
        (src / "config.json").write_text((src / "config.json").read_text().replace("{", '{"x": 1, ', 1))

    monkeypatch.setattr(transformers_check, "run_loader_check", changing)
    assert names_check(src).status == "pass"
    assert entries(store) == []


def test_an_entry_of_another_type_of_version_is_a_miss(tmp_path, store):
    src = make_llama(tmp_path / "src")
    assert names_check(src).status == "pass"
    (entry,) = entries(store)
    entry.write_text(entry.read_text().replace('"version": 1', '"version": true'))
    class_check_cache.forget()
    assert class_check_cache.recall(key(src)) is None


CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2],
    "not JSON": lambda text: "\0\1\2",
    "a failure": lambda text: text.replace('"pass"', '"fail"'),
    "another status": lambda text: text.replace('"pass"', '"ok"'),
    "another key": lambda text: text.replace('"key": "', '"key": "0'),
    "an extra field": lambda text: text.replace("{", '{"trusted": true, ', 1),
    "no message": lambda text: text.replace('"message": "', '"message": 1, "x": "'),
    "another format": lambda text: text.replace(class_check_cache.FORMAT, "other"),
    "a list": lambda text: "[" + text + "]",
    "too large": lambda text: text.replace(
        '"details": []', '"details": ["' + "x" * (class_check_cache.MAX_ENTRY_BYTES) + '"]'
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_entry_is_a_miss_and_the_check_runs(tmp_path, store, monkeypatch, corruption):
    src = make_llama(tmp_path / "src")
    assert names_check(src).status == "pass"
    (entry,) = entries(store)
    entry.write_text(CORRUPTIONS[corruption](entry.read_text()))
    class_check_cache.forget()
    assert class_check_cache.recall(key(src)) is None
    ran = []
    import weightlock.engines.transformers as verify

    real = verify.run_loader_check
    monkeypatch.setattr(verify, "run_loader_check", lambda *a: (ran.append(1), real(*a)))
    assert names_check(src).status == "pass" and ran == [1]


def test_a_forged_entry_for_a_failing_checkpoint_outside_a_private_folder_is_not_read(tmp_path, store):
    """An entry in a folder others may write (or a file others may write, or a symlink) is not read: only the
    user's own account can leave a verdict (and it can as well edit weightlock itself)."""
    src = make_llama(tmp_path / "src")
    assert names_check(src).status == "pass"
    (entry,) = entries(store)
    class_check_cache.forget()
    os.chmod(entry, 0o666)
    assert class_check_cache.recall(key(src)) is None
    os.chmod(entry, 0o600)
    assert class_check_cache.recall(key(src)) is not None
    class_check_cache.forget()
    os.chmod(store, 0o777)
    assert class_check_cache.recall(key(src)) is None
    os.chmod(store, 0o700)
    real = tmp_path / "elsewhere.json"
    entry.rename(real)
    entry.symlink_to(real)
    assert class_check_cache.recall(key(src)) is None


def test_off_remembers_nothing(tmp_path, store, monkeypatch):
    monkeypatch.setenv(class_check_cache.CACHE_VARIABLE, "off")
    src = make_llama(tmp_path / "src")
    assert key(src) is None
    assert names_check(src).status == "pass"
    assert not entries(store)


def test_an_unwritable_store_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv(class_check_cache.CACHE_VARIABLE, str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    class_check_cache.forget()
    src = make_llama(tmp_path / "src")
    assert names_check(src).status == "pass"
    class_check_cache.forget()


def test_apply_again_recalls_the_verdict_and_its_report_is_the_same(tmp_path, store):
    """Two applies of one model (another alpha: tune's bakes) write outputs of one key: the second recalls the
    verdict, the report of every other check is unchanged, and the verdict's file is private."""
    from weightlock import apply_lock

    src = make_llama(tmp_path / "src")
    lock = random_lock(src)
    first = apply_lock(src, lock, out=tmp_path / "a", alpha=2.0)
    assert len(entries(store)) == 1
    (entry,) = entries(store)
    assert stat.S_IMODE(entry.stat().st_mode) & 0o077 == 0 and stat.S_IMODE(store.stat().st_mode) == 0o700
    second = apply_lock(src, lock, out=tmp_path / "b", alpha=4.0)
    assert [(c.name, c.status) for c in second.report.checks] == [(c.name, c.status) for c in first.report.checks]
    names = next(c for c in second.report.checks if c.name == "transformers_names")
    assert names.status == "pass" and names.message.endswith(class_check_cache.RECALLED)  # not run again
    assert verify_checkpoint(tmp_path / "b").ok
