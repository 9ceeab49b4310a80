"""Publishing a GGUF output, above all a split set, as all-or-nothing (weightlock/formats/gguf/publish.py).

The apply runs in a child process that SIGKILLs itself at its N-th failpoint (WEIGHTLOCK_FAILPOINT=#N), for
N = 1, 2, ... until a run completes, so every step is tried without listing the steps. After each kill the
output is all or nothing as a loader sees it: the set's first file (its entry point) is absent, or it opens as
a whole set that verify accepts and that is wholly the old output or wholly the new one, never a mix. Then a
rerun recovers: it finishes or undoes what the killed run began, succeeds, and leaves exactly the output's
files (no staging folder, no stray part).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import finish, lock_for_gguf

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.errors import OutputError
from weightlock.formats.gguf.file import open_gguf
from weightlock.formats.gguf.publish import JOURNAL_NAME, recover_publish
from weightlock.formats.gguf.record import RECORD_KEY
from weightlock.io.staging import FAILPOINT_VARIABLE, PARTIAL_MARK

gguf = pytest.importorskip("gguf")

PARTS = 3


def _split_source(folder: Path) -> Path:
    """A 3-file split set (split.* keys as llama.cpp's gguf-split writes them), one layer's attn_output weight
    and bias in each later file; phi2, whose graph requires the biases, so that verify can explain them."""
    folder.mkdir()
    names = [folder / f"m-{i:05d}-of-{PARTS:05d}.gguf" for i in range(1, PARTS + 1)]
    rng = np.random.default_rng(0)
    for index, path in enumerate(names):
        writer = gguf.GGUFWriter(str(path), "phi2")
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", PARTS)
        writer.add_int32("split.tensors.count", 6)
        if index == 0:
            writer.add_block_count(2)
            writer.add_head_count(4)
            writer.add_embedding_length(32)
            writer.add_tensor("token_embd.weight", rng.normal(size=(8, 32)).astype(np.float32))
            writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
        else:
            weight = rng.normal(0, 0.2, size=(32, 32)).astype(np.float32)
            writer.add_tensor(f"blk.{index - 1}.attn_output.weight", weight)
            # a bias the edit rewrites in this file, so that every file of an output depends on the alpha
            writer.add_tensor(f"blk.{index - 1}.attn_output.bias", rng.normal(0, 0.1, size=32).astype(np.float32))
        finish(writer)
    return names[0]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    source = _split_source(root / "src")
    save_lock(lock_for_gguf(source, n_heads=2, model_type="phi"), root / "lock.wlock")
    return source, root / "lock.wlock"


def _apply_child(source: Path, lock: Path, out: Path, alpha: float, force: bool, failpoint: str | None):
    env = dict(os.environ, **({FAILPOINT_VARIABLE: failpoint} if failpoint else {}))
    code = (
        "import sys; from weightlock import apply_lock; "
        "apply_lock(sys.argv[1], sys.argv[2], out=sys.argv[3], alpha=float(sys.argv[4]), force=sys.argv[5] == '1')"
    )
    args = [str(source), str(lock), str(out), str(alpha), "1" if force else "0"]
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)


def _hashes(paths: list[Path]) -> list[str | None]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in paths]


def _alpha_of(first: Path) -> float:
    return json.loads(open_gguf(first).files[0].value(RECORD_KEY))["alpha"]


def _outputs(out: Path) -> list[Path]:
    return [out.with_name(f"{out.stem}-{i:05d}-of-{PARTS:05d}.gguf") for i in range(1, PARTS + 1)]


def _assert_all_or_nothing(outputs: list[Path], old: list[str | None] | None, new_alpha: float, source: Path) -> str:
    """The set as a loader sees it through its first file: "absent", "old" (byte-identical) or "new"."""
    if not outputs[0].exists():
        return "absent"
    hashes = _hashes(outputs)
    if old is not None and hashes == old:
        return "old"
    # phi2 always has the bias: its originals are checked against the source
    assert verify_checkpoint(outputs[0], source=source).ok, "a visible first file opens a whole set that verifies"
    assert _alpha_of(outputs[0]) == new_alpha
    if old is not None:
        assert not set(hashes) & set(old), "no file of the old set beside the new first file"
    return "new"


def _assert_only_outputs(folder: Path, outputs: list[Path]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in outputs), "no staging, no stray part"


def _kill_at_every_step(split, tmp_path, force: bool):
    source, lock = split
    source_files = [f.path for f in open_gguf(source).files]
    before = _hashes(source_files)
    out = tmp_path / "out" / "locked.gguf"
    out.parent.mkdir(exist_ok=True)  # the CLI creates the output, not the folder it goes in
    outputs = _outputs(out)
    old = None
    if force:
        apply_lock(source, lock, out=out, alpha=1.0)
        old = _hashes(outputs)
    seen: dict[str, int] = {}
    step = 1
    while True:
        result = _apply_child(source, lock, out, 2.0, force, f"#{step}")
        assert _hashes(source_files) == before, "the source is untouched"
        if result.returncode == 0:
            break
        assert result.returncode == -9, result.stderr[-2000:]
        state = _assert_all_or_nothing(outputs, old, 2.0, source)
        seen[state] = seen.get(state, 0) + 1
        # the rerun (the same command) recovers: it finishes or undoes the killed publish first
        if state == "new" and not force:  # the killed run had published: the rerun tidies, then refuses
            with pytest.raises(OutputError, match="already exists"):
                apply_lock(source, lock, out=out, alpha=2.0)
        else:
            rerun = apply_lock(source, lock, out=out, alpha=2.0, force=force)
            assert rerun.outputs == outputs
        assert _assert_all_or_nothing(outputs, old, 2.0, source) == "new"
        _assert_only_outputs(out.parent, outputs)
        if force:  # back to the state before the killed run
            apply_lock(source, lock, out=out, alpha=1.0, force=True)
            old = _hashes(outputs)
        else:
            for path in outputs:
                path.unlink()
        step += 1
        assert step < 60
    assert _assert_all_or_nothing(outputs, old, 2.0, source) == "new"
    _assert_only_outputs(out.parent, outputs)
    return step - 1, seen


def test_kill_at_every_step_of_publishing_a_new_split_set(split, tmp_path):
    steps, seen = _kill_at_every_step(split, tmp_path, force=False)
    # data copied and file written per part, the journal, each part's rename: all were tried
    assert steps >= 2 * PARTS + 1 + PARTS
    assert seen.get("absent", 0) >= 2 * PARTS + PARTS and seen.get("new", 0) >= 1, seen


def test_kill_at_every_step_of_replacing_a_split_set_with_force(split, tmp_path):
    steps, seen = _kill_at_every_step(split, tmp_path, force=True)
    assert steps >= 2 * PARTS + 1 + 2 * PARTS  # as above, plus moving each old part aside
    assert seen.get("old", 0) >= 2 * PARTS + 1 and seen.get("absent", 0) >= PARTS, seen


def test_recovery_alone_puts_the_previous_set_back(split, tmp_path):
    """Killed after moving the old set aside and publishing some new parts: the next run's recovery (before
    anything else) takes the new parts back and restores the old set byte for byte."""
    source, lock = split
    out = tmp_path / "locked.gguf"
    outputs = _outputs(out)
    assert _apply_child(source, lock, out, 1.0, False, None).returncode == 0
    old = _hashes(outputs)
    result = _apply_child(source, lock, out, 2.0, True, "gguf-file-published")  # the first rename: part 3
    assert result.returncode == -9
    assert not outputs[0].exists() and outputs[2].exists()
    done = recover_publish(outputs)
    assert len(done) == 1 and "undid" in done[0]
    assert _hashes(outputs) == old
    _assert_only_outputs(tmp_path, outputs)


def test_a_staging_folder_of_a_live_or_foreign_run_is_left_alone(split, tmp_path):
    source, lock = split
    out = tmp_path / "locked.gguf"
    outputs = _outputs(out)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    crafted = tmp_path / f".{outputs[0].name}.{PARTIAL_MARK}-{dead}-abc"
    crafted.mkdir()
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"mine")
    name = "../victim.gguf"
    journal = {"format": "weightlock-gguf-publish", "outputs": [name], "staged": {name: [0, 0]}}
    (crafted / JOURNAL_NAME).write_text(json.dumps(journal))
    assert recover_publish(outputs) == []
    assert crafted.is_dir() and victim.read_bytes() == b"mine"
    live = tmp_path / f".{outputs[0].name}.{PARTIAL_MARK}-{os.getpid()}-abc"
    live.mkdir()
    (live / JOURNAL_NAME).write_text(json.dumps({"format": "weightlock-gguf-publish", "outputs": [outputs[0].name]}))
    assert recover_publish(outputs) == [] and live.is_dir()
