"""In place and revert as a journal (issue 11, classes 1-3).

- Records are hostile: every path field of weightlock/in-place.json is tried with every kind of path that
  leaves the checkpoint or names a file weightlock did not write; revert refuses each, and nothing inside or
  outside the folder changes. Files whose bytes differ from the recorded hashes are never removed or replaced.
- In place never replaces what it did not create: a file already holding a name the edit needs is refused.
- Crash windows: the process is stopped at *every* failpoint it reaches (``WEIGHTLOCK_FAILPOINT=#N``, N = 1, 2,
  ... until a run completes), by SIGKILL and by Ctrl-C (SIGINT), during apply --in-place and during revert,
  and revert started from every state an interrupted apply leaves is itself stopped at every step. Each
  time, finishing with `weightlock revert` gives the original folder byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_llama, random_lock, run_cli, tree_hashes

from weightlock import apply_in_place, revert, save_lock, verify_checkpoint
from weightlock.errors import CheckpointError, OutputError
from weightlock.io.staging import FAILPOINT_VARIABLE

WEIGHTLOCK = [sys.executable, "-m", "weightlock"]
MAX_STEPS = 60  # far above the failpoints one run reaches; the loops below must end well before


@pytest.fixture(params=["sharded", "single"])
def setup(request, tmp_path):
    shard_kb = 40 if request.param == "sharded" else None
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128, shard_kb=shard_kb)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    save_lock(random_lock(src), tmp_path / "l.wlock")
    return src, tmp_path / "l.wlock"


def run(args, failpoint=None):
    env = dict(os.environ, **({FAILPOINT_VARIABLE: failpoint} if failpoint else {}))
    return subprocess.run(WEIGHTLOCK + args, env=env, capture_output=True, text=True, timeout=120)


def apply_args(src, lock):
    # The loader check is not what these tests are about; without it each child process starts in a second.
    return ["apply", str(src), "--lock", str(lock), "--in-place", "--no-loader-check"]


def everything_below(root: Path) -> dict[str, str]:
    """Every entry's kind and, for files, hash: also notices leftover folders and links."""
    out = tree_hashes(root)
    for path in root.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            out[str(path.relative_to(root)) + "/"] = "dir"
    return out


# ---------------------------------------------------------------------------------------------
# Class 3: crash windows, at every step


def stop_at_every_step(args, how: str, after_each) -> int:
    """Run ``args`` stopped at failpoint 1, 2, ... (``how``: "" for SIGKILL, ":INT" for Ctrl-C) until a run
    completes; ``after_each(result, step)`` checks each stopped run. Returns the step that completed."""
    for step in range(1, MAX_STEPS):
        result = run(args, failpoint=f"#{step}{how}")
        if result.returncode == 0:
            return step
        after_each(result, step)
    pytest.fail("the command never completed")


def test_sigkill_at_every_step_of_in_place_apply(setup):
    src, lock = setup
    before = everything_below(src)

    def killed(result, step):
        assert result.returncode == -signal.SIGKILL, result.stderr
        if everything_below(src) != before:
            revert(src)
        assert everything_below(src) == before, f"not restored after a kill at step {step}"

    steps = stop_at_every_step(apply_args(src, lock), "", killed)
    assert steps > 8, "the failpoints should cover every step of an in-place apply"
    assert verify_checkpoint(src, loader_check=False).ok
    revert(src)
    assert everything_below(src) == before


def test_ctrl_c_at_every_step_of_in_place_apply_reverts_by_itself(setup):
    src, lock = setup
    before = everything_below(src)

    def interrupted(result, step):
        assert result.returncode == 130, result.stderr
        # the interrupted apply undid itself, and says so (tests/test_ctrl_c.py checks every message)
        assert "Traceback" not in result.stderr, result.stderr
        assert "was not changed" in result.stderr or "the in-place edit was undone" in result.stderr, result.stderr
        assert everything_below(src) == before, f"not restored after Ctrl-C at step {step}"

    stop_at_every_step(apply_args(src, lock), ":INT", interrupted)
    revert(src)


def test_sigkill_at_every_step_of_revert_then_revert_again(setup):
    """Revert of a finished edit, and of the state every interrupted apply leaves, each killed at every step."""
    src, lock = setup
    before = everything_below(src)

    def reach(apply_step) -> bool:
        """Leave the folder as a finished apply (None) or one killed at ``apply_step`` does; False when that
        apply ran to the end (no such step)."""
        if apply_step is None:
            apply_in_place(src, lock, loader_check=False)
            return True
        return run(apply_args(src, lock), failpoint=f"#{apply_step}").returncode == -signal.SIGKILL

    kills = 0
    for apply_step in [None, *range(1, MAX_STEPS)]:
        if not reach(apply_step):
            revert(src)
            break
        if everything_below(src) == before:  # killed before it changed anything
            continue
        for step in range(1, MAX_STEPS):
            reverted = run(["revert", str(src)], failpoint=f"#{step}")
            if reverted.returncode != -signal.SIGKILL:
                assert reverted.returncode == 0, reverted.stderr
                break
            kills += 1
            if everything_below(src) != before:  # a kill after its last change leaves nothing to do
                revert(src)  # finishing it restores everything
            assert everything_below(src) == before, f"apply step {apply_step}, revert killed at step {step}"
            assert reach(apply_step)
        else:
            pytest.fail("revert never completed")
        assert everything_below(src) == before
    assert kills > 20


def test_ctrl_c_during_revert_gives_advice(setup):
    src, lock = setup
    before = everything_below(src)
    apply_in_place(src, lock)
    result = run(["revert", str(src)], failpoint="#2:INT")
    assert result.returncode == 130 and "weightlock revert" in result.stderr and "Traceback" not in result.stderr
    assert run(["revert", str(src)]).returncode == 0
    assert everything_below(src) == before


# ---------------------------------------------------------------------------------------------
# Class 1: records are hostile

ESCAPING_NAMES = [
    "../victim.txt",
    "/tmp/weightlock-victim.txt",
    "sub/victim.txt",
    "..",
    ".",
    "",
    "victim.txt",
    "README.md",
    "model.safetensors.index.json/../../victim.txt",
    "a\nb",
    "config.json",
]


def _record_variants():
    """(description, edit of the record dict) for every path-bearing field and every escaping name."""

    def set_added(name):
        return lambda r: r.update(added={name: "0" * 64})

    def set_created(name):
        return lambda r: r.update(created={name: "0" * 64})

    def set_replaced(name):
        return lambda r: r["replaced"].update({name: {"original_sha256": "0" * 64, "new_sha256": "0" * 64}})

    def set_renamed_key(name):
        return lambda r: r.update(
            renamed={name: {"to": "model-00001-of-00002.safetensors", "size": 8, "header_sha256": "0" * 64}}
        )

    def set_renamed_to(name):
        return lambda r: r.update(renamed={"model.safetensors": {"to": name, "size": 8, "header_sha256": "0" * 64}})

    def swap(to):
        return {"to": to, "size": 8, "header_sha256": "0" * 64, "new_sha256": "0" * 64}

    def set_swapped_key(name):
        return lambda r: r.update(swapped={name: swap("model-00001-of-00002.safetensors")})

    def set_swapped_to(name):
        return lambda r: r.update(swapped={"model.safetensors": swap(name)})

    for field, make in (
        ("added", set_added),
        ("created", set_created),
        ("replaced", set_replaced),
        ("renamed", set_renamed_key),
        ("renamed.to", set_renamed_to),
        ("swapped", set_swapped_key),
        ("swapped.to", set_swapped_to),
    ):
        for name in ESCAPING_NAMES:
            yield f"{field}={name!r}", make(name)
    # shard names a swap could hold: escaping ones (schema), and a real shard whose backup does not exist
    for name in ("../victim.safetensors", "sub/x.safetensors", ".hidden.safetensors", "model.safetensors"):
        yield f"swapped={name!r}", set_swapped_key(name)
    for value in ({}, [], "x", 1, None, {"format": "weightlock-in-place"}):
        yield f"record={value!r}", (lambda v: lambda r: (r.clear(), r.update({"whole": v})))(value)
    yield "format_version=1", lambda r: r.update(format_version=1)
    yield "extra key", lambda r: r.update(extra=["../victim.txt"])
    yield "hash not hex", lambda r: next(iter(r["replaced"].values())).update(new_sha256="../x")


RECORD_VARIANTS = list(_record_variants())


def test_hostile_records_are_refused_and_touch_nothing(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    apply_in_place(src, tmp_path / "l.wlock")
    record_path = src / "weightlock" / "in-place.json"
    good = json.loads(record_path.read_text())
    victim = tmp_path / "victim.txt"
    victim.write_text("must survive\n")
    assert len(RECORD_VARIANTS) > 60
    for description, edit in RECORD_VARIANTS:
        record = json.loads(json.dumps(good))
        edit(record)
        if "whole" in record:
            record = record["whole"]
        record_path.write_text(json.dumps(record))
        before = everything_below(src)
        with pytest.raises(CheckpointError) as refused:
            revert(src)
        assert refused.value.hint, description
        assert everything_below(src) == before, description
        assert victim.read_text() == "must survive\n", description
    record_path.write_text(json.dumps(good))
    revert(src)
    assert victim.read_text() == "must survive\n"


def test_revert_never_removes_or_overwrites_files_it_did_not_write(tmp_path, capsys):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    original = everything_below(src)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    apply_in_place(src, tmp_path / "l.wlock")
    # the bias shard replaced by the user's own file: not ours any more, so not removed
    shard = src / "model-00002-of-00002.safetensors"
    ours = shard.read_bytes()
    shard.write_bytes(b"the user's file")
    code, _, err = run_cli(capsys, "revert", str(src))
    assert code == 3 and "not the file the in-place edit wrote" in err and "hint:" in err
    assert shard.read_bytes() == b"the user's file"
    shard.write_bytes(ours)
    # config.json edited after the edit: revert will not overwrite the user's changes
    config = src / "config.json"
    edited = config.read_text().replace("{", '{"user_note": 1,', 1)
    locked_config = config.read_text()
    config.write_text(edited)
    code, _, err = run_cli(capsys, "revert", str(src))
    assert code == 3 and "changed after the in-place edit" in err
    assert config.read_text() == edited
    config.write_text(locked_config)
    # the record folder reached through a symlink out of the checkpoint is refused
    assert run_cli(capsys, "revert", str(src))[0] == 0
    assert everything_below(src) == original


def test_a_folder_that_borrows_our_prefix_is_not_removed(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    (src / ".weightlock-in-place-123-abc").mkdir()
    (src / ".weightlock-in-place-123-abc" / "precious.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="precious.txt"):
        revert(src)
    assert (src / ".weightlock-in-place-123-abc" / "precious.txt").read_text() == "mine"


def test_record_folder_that_is_a_symlink_outside_is_refused(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    apply_in_place(src, tmp_path / "l.wlock")
    os.rename(src / "weightlock", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", src / "weightlock")
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        revert(src)


# ---------------------------------------------------------------------------------------------
# Class 2: in place never replaces what it did not create


@pytest.mark.parametrize(
    "layout,name",
    [
        ("single", "model-00002-of-00002.safetensors"),
        ("single", "model-00001-of-00002.safetensors"),
        ("single", "model.safetensors.index.json"),
        ("sharded", "model-weightlock-bias.safetensors"),
        ("sharded", "model-00009-of-00009.safetensors"),
    ],
)
@pytest.mark.parametrize("kind", ["file", "folder", "symlink"])
def test_in_place_refuses_names_it_would_create_or_that_loaders_would_glob(tmp_path, capsys, layout, name, kind):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128, shard_kb=40 if layout == "sharded" else None)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    target = src / name
    if kind == "file":
        target.write_bytes(b"not weightlock's")
    elif kind == "folder":
        target.mkdir()
    else:
        os.symlink(tmp_path / "nowhere", target)
    before = everything_below(src)
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--in-place")
    assert code in (3, 5), err
    assert "hint:" in err and "Traceback" not in err
    assert everything_below(src) == before
    assert not os.path.lexists(src / "weightlock")


def test_in_place_apply_reports_interrupted_leftovers(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    (src / ".weightlock-reverted-abc").mkdir()
    with pytest.raises(OutputError, match="interrupted"):
        apply_in_place(src, tmp_path / "l.wlock")
    assert revert(src)["reverted"] is False
    apply_in_place(src, tmp_path / "l.wlock")


def test_a_lost_record_is_explained_not_guessed(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    apply_in_place(src, tmp_path / "l.wlock")
    os.remove(src / "weightlock" / "in-place.json")
    before = everything_below(src)
    with pytest.raises(CheckpointError, match="record in-place.json is missing") as refused:
        revert(src)
    assert "backup" in refused.value.hint
    assert everything_below(src) == before
