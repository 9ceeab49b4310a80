"""Every record weightlock writes, tampered with in every way its own content suggests (issue 24, class 2).

For each record (folder provenance.json after ``apply --out``, after ``apply --in-place``, after a relock;
a GGUF's ``weightlock.edit`` after one edit and after a relock) the mutations are derived from the record
itself: every leaf of its JSON changed, zeroed or negated, every list item dropped or duplicated, every
key dropped or one added; then the stored bias bytes, the originals and the embedded locks are changed; then
the reviewer's attack (the biases zeroed and the originals rewritten so that the record still adds up).
Each tampered output must fail ``verify`` or be refused with a WeightlockError; it may pass only where the
mutation provably does not matter (fields verify never relies on: times, tool, source names, file lists).
Never a crash. A deterministic sample keeps each record under MAX_CASES.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_llama, random_lock, run_cli
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import apply_in_place
from weightlock.api import apply_lock, verify_checkpoint
from weightlock.errors import WeightlockError
from weightlock.formats.gguf.edit import FileChanges, _kv_bytes, _kv_string, write_gguf_file
from weightlock.formats.gguf.file import open_gguf
from weightlock.formats.gguf.record import LOCK_KEY, PARENT_LOCK_KEY, RECORD_KEY, embedded_bytes
from weightlock.io.safetensors_file import read_header
from weightlock.io.untrusted import MAX_JSON_DEPTH

MAX_CASES = 70
# fields no check relies on: changing them must not crash verify, and may pass
FREE = {"created_at", "tool", "source", "mode", "original_index", "edited_files", "description"}
FREE_FILES = {"carried", "left_out", "shards", "rewritten", "added_shard", "card"}
TOTAL = {"cases": 0}


def _is_free(path: tuple) -> bool:
    """Whether a record path is one verify does not rely on (after any number of ``parent`` steps)."""
    while path[:1] == ("parent",):
        path = path[1:]
    if not path:
        return False
    if path[0] in FREE:
        return True
    return path[0] == "files" and len(path) > 1 and path[1] in FREE_FILES


def mutations(record) -> list[tuple[str, tuple, object]]:
    """(description, path, mutated record) for every leaf, list item and key of ``record``."""
    out: list[tuple[str, tuple, object]] = []

    def put(path, value):
        new = copy.deepcopy(record)
        target = new
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return new

    def drop(path):
        new = copy.deepcopy(record)
        target = new
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return new

    def walk(value, path):
        if isinstance(value, dict):
            for key in value:
                walk(value[key], (*path, key))
                out.append((f"drop key {'.'.join(map(str, (*path, key)))}", (*path, key), drop((*path, key))))
            out.append((f"add key to {'.'.join(map(str, path))}", (*path, "extra"), put((*path, "extra"), 1)))
        elif isinstance(value, list):
            for i, item in enumerate(value[:4]):
                walk(item, (*path, i))
                out.append((f"drop item {'.'.join(map(str, (*path, i)))}", (*path, i), drop((*path, i))))
                dup = copy.deepcopy(value)
                dup.insert(i, copy.deepcopy(item))
                out.append((f"duplicate item {'.'.join(map(str, (*path, i)))}", (*path, i), put(path, dup)))
        elif path:
            where = ".".join(map(str, path))
            if isinstance(value, bool):
                out.append((f"flip {where}", path, put(path, not value)))
            elif isinstance(value, (int, float)):
                for new in {value + 1, 0, -value, value * 1.5}:
                    if new != value:
                        out.append((f"{where} {value!r} -> {new!r}", path, put(path, new)))
            elif isinstance(value, str):
                out.append((f"change {where}", path, put(path, value[:-1] + ("A" if value[-1:] != "A" else "B"))))
                out.append((f"empty {where}", path, put(path, "")))
            elif value is None:
                out.append((f"{where} null -> {{}}", path, put(path, {})))

    walk(record, ())
    if len(out) > MAX_CASES:  # a deterministic sample, always keeping the top-level ones
        top = [m for m in out if len(m[1]) <= 1]
        rest = [m for m in out if len(m[1]) > 1]
        out = top + random.Random(24).sample(rest, max(0, MAX_CASES - len(top)))
    return out


def _outcome(path: Path, source: Path | None = None) -> tuple[bool, str]:
    """(passed, why) of verify on ``path``; a WeightlockError is a clean refusal, anything else a crash.
    ``source``: for an output whose source already had the biases, the model verify compares the originals with
    (without it they are unverifiable, so every mutation would fail for that reason alone)."""
    try:
        # the engine each format is made for: stock transformers, llama.cpp (tests/test_serving_table.py: the rest)
        engines = "llama.cpp" if str(path).endswith(".gguf") else "transformers"
        report = verify_checkpoint(path, loader_check=False, source=source, engines=engines)
    except WeightlockError as e:
        return False, f"refused: {e.message}"
    return report.ok, "; ".join(report.failures())


def _folder_free(path: tuple, record: dict) -> bool:
    """Also free in a folder record (its schema is open): a key weightlock does not read, added anywhere; a
    config flag dropped from an original config where it held its default (False: the same config)."""
    if path[-1:] == ("extra",):
        return True
    target = record
    for step in path:
        target = target[step] if isinstance(target, dict) and step in target else None
    return len(path) >= 2 and path[-2] == "original_config" and target is False


def _expect(described: str, path: tuple, passed: bool, why: str, failures: list[str], free=False) -> None:
    TOTAL["cases"] += 1
    if passed and not (free or _is_free(path)):
        failures.append(f"{described}: passed verify")
    if not passed and not why:
        failures.append(f"{described}: failed without saying why")


# --- the records ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    src = make_llama(root / "src")
    biased = make_llama(root / "biased", attention_bias=True)  # the source carries o_proj biases: originals
    fast = {"loader_check": False}  # the transformers class check reads no record
    out = {"out": apply_lock(src, random_lock(src, seed=1), out=root / "out", **fast).out}
    out["relock"] = apply_lock(root / "out", random_lock(src, seed=2), out=root / "relock", **fast).out
    out["biased"] = apply_lock(biased, random_lock(biased, seed=3), out=root / "biased-out", **fast).out
    out["biased-source"] = biased
    shutil.copytree(src, root / "inplace")
    apply_in_place(root / "inplace", random_lock(src, seed=4), **fast)
    out["inplace"] = root / "inplace"
    return out


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ggufs")
    src = write_gguf(root / "src.gguf", out_type="Q8_0")
    out = {"one": apply_lock(src, lock_for_gguf(src, n_heads=4), out=root / "one.gguf").out}
    out["relock"] = apply_lock(root / "one.gguf", lock_for_gguf(src, seed=5), out=root / "relock.gguf").out
    existing = write_gguf(root / "sc.gguf", arch="starcoder2", bias=True)
    out["existing"] = apply_lock(existing, lock_for_gguf(existing, model_type="starcoder2"), out=root / "sc1.gguf").out
    out["existing-source"] = existing
    return out


def _rewrite_gguf(locked: Path, out: Path, record: dict, lock: bytes | None = None, parents=None) -> Path:
    """A copy of a locked GGUF with its record (and optionally its embedded locks) replaced."""
    model = open_gguf(locked)
    if parents is None:
        parents, depth = [], 1
        while model.metadata.get(PARENT_LOCK_KEY.format(depth)) is not None:
            parents.append(embedded_bytes(model, PARENT_LOCK_KEY.format(depth)))
            depth += 1
    extra = [
        _kv_string(RECORD_KEY, json.dumps(record)),
        _kv_bytes(LOCK_KEY, embedded_bytes(model, LOCK_KEY) if lock is None else lock),
        *(_kv_bytes(PARENT_LOCK_KEY.format(i), data) for i, data in enumerate(parents, start=1)),
    ]
    out.unlink(missing_ok=True)
    write_gguf_file(model.files[0], out, extra, [], FileChanges(), None)
    return out


def _gguf_record(path: Path) -> dict:
    return json.loads(open_gguf(path).metadata[RECORD_KEY].value)  # type: ignore[arg-type]


# --- the generated cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["out", "relock", "biased", "inplace"])
def test_every_folder_record_mutation_fails_verify_or_does_not_matter(folders, which):
    folder, source = folders[which], folders.get(f"{which}-source")
    record_path = folder / "weightlock" / "provenance.json"
    good = record_path.read_bytes()
    assert verify_checkpoint(folder, loader_check=False, source=source, engines="transformers").ok
    failures: list[str] = []
    cases = mutations(json.loads(good))
    try:
        for described, path, mutated in cases:
            record_path.write_text(json.dumps(mutated))
            free = described.startswith(("add key", "drop key")) and _folder_free(path, json.loads(good))
            _expect(described, path, *_outcome(folder, source), failures, free)
    finally:
        record_path.write_bytes(good)
    assert verify_checkpoint(folder, loader_check=False, source=source, engines="transformers").ok
    assert len(cases) >= 30 and not failures, failures


@pytest.mark.parametrize("which", ["one", "relock", "existing"])
def test_every_gguf_record_mutation_fails_verify_or_does_not_matter(ggufs, tmp_path, which):
    locked, source = ggufs[which], ggufs.get(f"{which}-source")
    record = _gguf_record(locked)
    same = _rewrite_gguf(locked, tmp_path / "same.gguf", record)
    assert verify_checkpoint(same, source=source, engines="llama.cpp").ok
    failures: list[str] = []
    cases = mutations(record)
    for described, path, mutated in cases:
        _expect(described, path, *_outcome(_rewrite_gguf(locked, tmp_path / "t.gguf", mutated), source), failures)
    assert len(cases) >= 30 and not failures, failures


def _flip_tensor_bytes(path: Path, begin: int, count: int = 4) -> bytes:
    data = path.read_bytes()
    changed = bytearray(data)
    for i in range(begin, begin + count):
        changed[i] ^= 0x55
    path.write_bytes(bytes(changed))
    return data


@pytest.mark.parametrize("which", ["out", "relock", "biased", "inplace"])
def test_every_written_bias_and_original_changed_fails_verify(folders, which):
    """Each bias tensor the record chain explains, and each stored original (of this edit and the ones before)."""
    folder, source = folders[which], folders.get(f"{which}-source")
    assert verify_checkpoint(folder, loader_check=False, source=source, engines="transformers").ok
    record = json.loads((folder / "weightlock" / "provenance.json").read_text())
    added = read_header(folder / record["files"]["added_shard"]).tensors
    targets = [(folder / record["files"]["added_shard"], e.begin) for e in added.values()]
    for originals in sorted((folder / "weightlock").rglob("originals.wlt")):
        targets += [(originals, e.begin) for e in read_header(originals).tensors.values()]
    for lock in sorted((folder / "weightlock").rglob("lock.wlock")):
        targets.append((lock, lock.stat().st_size // 2))
    failures = []
    for file, begin in targets:
        saved = _flip_tensor_bytes(file, begin)
        try:
            passed, why = _outcome(folder, source)
            _expect(f"{file.relative_to(folder)} at {begin}", ("bytes",), passed, why, failures)
        finally:
            file.write_bytes(saved)
    assert targets and not failures, failures


@pytest.mark.parametrize("which", ["one", "relock", "existing"])
def test_every_gguf_bias_and_embedded_lock_changed_fails_verify(ggufs, tmp_path, which):
    locked, source = ggufs[which], ggufs.get(f"{which}-source")
    assert verify_checkpoint(locked, source=source, engines="llama.cpp").ok
    model = open_gguf(locked)
    failures = []
    for name, tensor in sorted(model.tensors.items()):
        if not name.endswith("attn_output.bias"):
            continue
        copy_ = tmp_path / "t.gguf"
        shutil.copyfile(locked, copy_)
        _flip_tensor_bytes(copy_, model.files[0].data_start + tensor.offset + 8)
        _expect(name, ("bias",), *_outcome(copy_, source), failures)
    keys = [k for k in model.metadata if k == LOCK_KEY or k.startswith(PARENT_LOCK_KEY.format(""))]
    for key in keys:
        entry = model.metadata[key]
        copy_ = tmp_path / "t.gguf"
        shutil.copyfile(locked, copy_)
        _flip_tensor_bytes(copy_, (entry.start + entry.end) // 2 + 8)
        _expect(key, ("lock",), *_outcome(copy_, source), failures)
    assert keys and not failures, failures


# --- the reviewer's attack: the biases zeroed, the originals rewritten to match ------------------------------


def _zeroed_with_matching_originals(locked: Path, out: Path) -> Path:
    """The locked biases set to zero and the record's originals rewritten so that original + W_o @ d = 0."""
    model = open_gguf(locked)
    record = _gguf_record(locked)
    data = bytearray(locked.read_bytes())
    replaced = record["tensors"]["replaced"]
    for name in record["tensors"]["added"] + list(replaced):
        tensor = model.tensors[name]
        start = model.files[0].data_start + tensor.offset
        stored = np.frombuffer(bytes(data[start : start + tensor.nbytes]), dtype="<f4")
        original = np.frombuffer(base64.b64decode(replaced[name]["data"]), dtype="<f4") if name in replaced else 0.0
        replaced[name] = {"type": 0, "data": base64.b64encode((original - stored).astype("<f4").tobytes()).decode()}
        data[start : start + tensor.nbytes] = bytes(tensor.nbytes)
    record["tensors"]["added"] = []
    zeroed = out.with_suffix(".zeroed.gguf")
    zeroed.write_bytes(bytes(data))
    return _rewrite_gguf(zeroed, out, record, lock=embedded_bytes(model, LOCK_KEY))


@pytest.mark.parametrize("which", ["one", "relock"])
def test_the_zeroed_bias_attack_on_a_gguf_fails_verify_and_inspect_does_not_say_locked(ggufs, tmp_path, capsys, which):
    attacked = _zeroed_with_matching_originals(ggufs[which], tmp_path / "attacked.gguf")
    code, out, _ = run_cli(capsys, "verify", str(attacked))
    # one edit: the originals are a claim llama.cpp's llama files cannot back; a relock: no longer the earlier
    # edit's output, which its embedded lock recomputes
    assert code == 1 and "verified: all checks hold" not in out, out
    assert ("unverifiable" if which == "one" else "[FAIL] edit chain") in out, out
    code, out, _ = run_cli(capsys, "inspect", str(attacked))
    assert code == 0 and "locked: yes" not in out and "not verified" in out, out
    TOTAL["cases"] += 2


def test_the_zeroed_bias_attack_on_an_existing_bias_gguf_says_the_source_must_confirm(ggufs, tmp_path, capsys):
    """Where llama.cpp's architecture always has the bias (starcoder2), an original is what the source had:
    consistent originals cannot be told from the source's without the source, and verify says so."""
    attacked = _zeroed_with_matching_originals(ggufs["existing"], tmp_path / "attacked.gguf")
    code, out, _ = run_cli(capsys, "verify", str(attacked))
    assert "only the source can confirm their values" in out, out
    TOTAL["cases"] += 1


@pytest.mark.parametrize("keep_added", [True, False])
def test_the_zeroed_bias_attack_on_a_folder_fails_verify(folders, tmp_path, capsys, keep_added):
    from weightlock.io.safetensors_file import TensorData, write_safetensors

    folder = tmp_path / "attacked"
    shutil.copytree(folders["out"], folder)
    record_path = folder / "weightlock" / "provenance.json"
    record = json.loads(record_path.read_text())
    shard = folder / record["files"]["added_shard"]
    header = read_header(shard)
    raw = shard.read_bytes()
    zeros, originals = [], []
    for name, entry in header.tensors.items():
        stored = np.frombuffer(raw[entry.begin : entry.end], dtype="<f4")
        zeros.append(TensorData(name, entry.dtype, entry.shape, bytes(entry.nbytes)))
        originals.append(TensorData(name, entry.dtype, entry.shape, (-stored).astype("<f4").tobytes()))
    assert all(e.dtype == "F32" for e in header.tensors.values())
    shard.unlink()
    write_safetensors(shard, zeros, {"format": "pt"})
    write_safetensors(folder / "weightlock" / "originals.wlt", originals, {"format": "weightlock-originals"})
    record["files"]["originals"] = "weightlock/originals.wlt"
    record["tensors"]["replaced"] = sorted(header.tensors)
    if not keep_added:
        record["tensors"]["added"] = []
    record_path.write_text(json.dumps(record))
    code, out, _ = run_cli(capsys, "verify", str(folder), "--no-loader-check")
    assert code == 1 and "[FAIL] provenance" in out and "all checks hold" not in out, out
    TOTAL["cases"] += 1


# --- the record depth limit -------------------------------------------------------------------------------


def test_relocking_past_the_record_depth_limit_is_refused_up_front(ggufs, tmp_path, capsys):
    """The 62nd relock used to write a record deeper than weightlock reads back (exit 6); it is refused (exit 3)
    before any work, and every relock up to the limit still verifies."""
    from weightlock.core.lock import save_lock
    from weightlock.formats.gguf.file import open_gguf as read

    source = write_gguf(tmp_path / "src.gguf", layers=1, hidden=16, heads=2, kv_heads=2, head_dim=8)
    lock = lock_for_gguf(source, n_heads=1)
    save_lock(lock, tmp_path / "lock.wlock")
    current, edits = source, 0
    while True:
        out = tmp_path / f"e{edits + 1}.gguf"
        code, _, err = run_cli(capsys, "apply", str(current), "--lock", str(tmp_path / "lock.wlock"), "--out", str(out))
        if code != 0:
            break
        current, edits = out, edits + 1
        (tmp_path / f"e{edits - 1}.gguf").unlink(missing_ok=True)
    assert code == 3 and "edit(s)" in err and "hint" in err.lower() and not out.exists(), err
    assert MAX_JSON_DEPTH - 5 <= edits < MAX_JSON_DEPTH, edits
    assert verify_checkpoint(current, engines="llama.cpp").ok and read(current).metadata[RECORD_KEY]
    TOTAL["cases"] += edits + 1


def test_a_folder_relock_past_the_record_depth_limit_is_refused_up_front(folders, tmp_path, capsys):
    """A folder whose record chain is as deep as weightlock reads: one more relock is refused with exit 3 (the
    chain is built by nesting the record's own copies, as 60-odd relocks would)."""
    from weightlock.core.lock import save_lock
    from weightlock.core.records import json_depth

    folder = tmp_path / "deep"
    shutil.copytree(folders["out"], folder)
    record_path = folder / "weightlock" / "provenance.json"
    record = json.loads(record_path.read_text())
    chain = record
    while json_depth(chain) < MAX_JSON_DEPTH:
        chain = {**record, "parent": chain}
    record_path.write_text(json.dumps(chain))
    save_lock(random_lock(folders["out"], seed=9), tmp_path / "lock.wlock")
    out = tmp_path / "relocked"
    code, _, err = run_cli(capsys, "apply", str(folder), "--lock", str(tmp_path / "lock.wlock"), "--out", str(out))
    assert code == 3 and "edit(s)" in err and "original" in err and not out.exists(), err
    TOTAL["cases"] += 1


@pytest.mark.parametrize("mode", ["out", "in-place"])
def test_a_config_as_deep_as_weightlock_reads_is_refused_before_the_edit(tmp_path, capsys, mode):
    """The record holds the original config one level down: a config at the depth limit would make a record
    weightlock cannot read back, so the edit is refused (exit 3) and nothing changes."""
    from conftest import tree_hashes

    from weightlock.core.lock import save_lock

    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "lock.wlock")
    config = json.loads((src / "config.json").read_text())
    nested: dict = {}
    for _ in range(MAX_JSON_DEPTH - 2):
        nested = {"x": nested}
    config["deep"] = nested
    (src / "config.json").write_text(json.dumps(config))
    before = tree_hashes(src)
    where = ["--out", str(tmp_path / "out")] if mode == "out" else ["--in-place"]
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "lock.wlock"), *where)
    assert code == 3 and "levels deep" in err and "hint" in err.lower(), err
    assert tree_hashes(src) == before and not (tmp_path / "out").exists()
    TOTAL["cases"] += 1


def test_zz_report_case_count():
    print(f"\nrecord tampering: {TOTAL['cases']} cases")
    assert TOTAL["cases"] > 0
