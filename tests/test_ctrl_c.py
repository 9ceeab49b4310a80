"""Ctrl-C, concurrent in-place edits, and symlinked files through in place + revert (issue 24, classes 6 and 13).

- Ctrl-C at every failpoint: each command (apply --out, apply --out --force over an older output, apply
  --in-place, revert, GGUF apply) runs in a child process that sends itself SIGINT at its N-th failpoint
  (``WEIGHTLOCK_FAILPOINT=#N:INT``), for N = 1, 2, ... until a run reaches no N-th failpoint (it completes and
  says nothing about an interruption). The failpoints include the command's end and the process's last
  step, so a Ctrl-C after the output is final is tried too. Each time the exit code and the message must
  agree with the disk: exit 130 with what the disk holds (nothing published and nothing there; the folder
  as it was, or advice to revert that revert then fulfils), or exit 0 with the output published, verified,
  and the summary printed (and, for a late Ctrl-C, a note that it changed nothing); never a traceback.
- Two `apply --in-place` on one folder at once: exactly one succeeds; the other exits 5 with "another
  weightlock is editing" (or, if it started after the first finished, "already carries a weightlock edit").
- A Hub-cache snapshot (every file a relative symlink into the blob store) edited in place and reverted
  comes back entry for entry: the same names, the same symlinks with the same link text, the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_llama, random_lock, tree_hashes

from weightlock import apply_in_place, revert, save_lock, verify_checkpoint
from weightlock.errors import OutputError
from weightlock.io.staging import FAILPOINT_VARIABLE

WEIGHTLOCK = [sys.executable, "-m", "weightlock"]
MAX_STEPS = 80  # far above the failpoints one run reaches
OUTPUT_EXIT = 5


def run(args, failpoint=None):
    env = dict(os.environ, **({FAILPOINT_VARIABLE: failpoint} if failpoint else {}))
    return subprocess.run(WEIGHTLOCK + args, env=env, capture_output=True, text=True, timeout=120)


def interrupted(result) -> bool:
    """Whether the run met its Ctrl-C (before or after its commit point)."""
    return result.returncode == 130 or "Ctrl-C ignored" in result.stderr


def every_ctrl_c(args, check) -> int:
    """Run ``args`` with a Ctrl-C at failpoint 1, 2, ... until a run meets none; ``check(result, step)`` judges
    each run that did. Returns how many runs were interrupted."""
    for step in range(1, MAX_STEPS):
        result = run(args, failpoint=f"#{step}:INT")
        for never in ("Traceback", "KeyboardInterrupt"):  # (also no "Exception ignored ... KeyboardInterrupt")
            assert never not in result.stderr, f"step {step}: {result.stderr}"
        assert result.returncode in (0, 130), f"step {step}: {result.returncode} {result.stderr}"
        if not interrupted(result):
            assert result.returncode == 0, result.stderr
            return step - 1
        check(result, step)
    pytest.fail("the command never completed")


def entries(root: Path) -> dict[str, str]:
    """Every entry below ``root``: a symlink's link text, a folder, or a file's sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def setup(tmp_path):
    src = make_llama(tmp_path / "src", hidden=64, layers=3, vocab=128, shard_kb=40)
    (src / "README.md").write_text("# a model\n")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    return src, tmp_path / "l.wlock"


# ---------------------------------------------------------------------------------------------
# Class 6: Ctrl-C at every step, and after the last one


@pytest.mark.parametrize("force", [False, True], ids=["new", "force-over-older"])
def test_ctrl_c_at_every_step_of_apply_out(tmp_path, setup, force):
    src, lock = setup
    before = tree_hashes(src)
    out = tmp_path / "out"
    args = ["apply", str(src), "--lock", str(lock), "--out", str(out), "--no-loader-check", "--link-mode", "copy"]
    older = None
    if force:
        assert run([*args, "--alpha", "1.5"]).returncode == 0
        older = entries(out)
        args.append("--force")

    def check(result, step):
        assert tree_hashes(src) == before
        if result.returncode == 130:
            assert "no output was published" in result.stderr, result.stderr
            # nothing published: no output, or the older one exactly as it was
            assert (entries(out) == older) if force else not os.path.lexists(out), f"step {step}"
        else:  # a Ctrl-C after the commit point: the output is final and the summary complete
            assert f"{out} was published and verified" in result.stderr and "nothing was undone" in result.stderr
            assert "locked 3 layers" in result.stdout
            assert verify_checkpoint(out, loader_check=False).ok
            assert entries(out) != older
            shutil.rmtree(out)
            if force:
                assert run([*args, "--alpha", "1.5"]).returncode == 0
        assert "no output was published" not in result.stderr or result.returncode == 130

    assert every_ctrl_c(args, check) >= 4  # staging, shards, staging complete, (moved aside), end of the command
    assert verify_checkpoint(out, loader_check=False).ok


def test_ctrl_c_at_every_step_of_apply_in_place(setup):
    src, lock = setup
    before = entries(src)
    args = ["apply", str(src), "--lock", str(lock), "--in-place", "--no-loader-check"]

    def check(result, step):
        if result.returncode == 130:
            if "weightlock revert" in result.stderr:  # only when undoing the edit failed
                assert run(["revert", str(src)]).returncode == 0
            else:
                assert f"{src} was not changed" in result.stderr or "the in-place edit was undone" in result.stderr
            assert entries(src) == before, f"step {step}: {result.stderr}"
        else:
            assert "in-place edit" in result.stderr and "completed and verified" in result.stderr, result.stderr
            assert "locked 3 layers" in result.stdout
            assert verify_checkpoint(src, loader_check=False).ok
            revert(src)
            assert entries(src) == before

    assert every_ctrl_c(args, check) > 8
    revert(src)
    assert entries(src) == before


def test_ctrl_c_at_every_step_of_revert(setup):
    src, lock = setup
    before = entries(src)

    def check(result, step):
        if result.returncode == 130:
            assert f"run `weightlock revert {src}` again" in result.stderr, result.stderr
            assert run(["revert", str(src)]).returncode == 0
        else:
            assert f"the original files of {src} were restored" in result.stderr, result.stderr
            assert "reverted" in result.stdout
        assert entries(src) == before, f"step {step}"
        apply_in_place(src, lock, loader_check=False)

    apply_in_place(src, lock, loader_check=False)
    assert every_ctrl_c(["revert", str(src)], check) >= 4
    assert entries(src) == before


def test_ctrl_c_at_every_step_of_a_gguf_apply(tmp_path):
    from gguf_helpers import lock_for_gguf, write_gguf

    source = write_gguf(tmp_path / "src.gguf")
    save_lock(lock_for_gguf(source), tmp_path / "l.wlock")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out" / "locked.gguf"
    out.parent.mkdir(exist_ok=True)  # the CLI creates the output, not the folder it goes in
    args = ["apply", str(source), "--lock", str(tmp_path / "l.wlock"), "--out", str(out)]

    def check(result, step):
        assert hashlib.sha256(source.read_bytes()).hexdigest() == before
        if result.returncode == 130:
            assert "no output was published" in result.stderr, result.stderr
            assert not out.parent.exists() or not [p.name for p in out.parent.iterdir() if "partial" not in p.name]
        else:
            assert f"{out} published and verified" in result.stderr, result.stderr
            assert verify_checkpoint(out, engines="llama.cpp").ok
            out.unlink()

    assert every_ctrl_c(args, check) >= 3
    assert verify_checkpoint(out, engines="llama.cpp").ok


# ---------------------------------------------------------------------------------------------
# The first review's leftover: two in-place edits of one folder at once


@pytest.mark.parametrize("trial", range(3))
def test_two_concurrent_in_place_applies_one_wins(setup, trial):
    src, lock = setup
    before = entries(src)
    args = WEIGHTLOCK + ["apply", str(src), "--lock", str(lock), "--in-place", "--no-loader-check"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, OUTPUT_EXIT], results
    loser = next(err for code, err in results if code == OUTPUT_EXIT)
    assert "another weightlock is editing" in loser or "already carries a weightlock edit" in loser, loser
    assert "Traceback" not in loser
    assert verify_checkpoint(src, loader_check=False).ok
    revert(src)
    assert entries(src) == before


def test_an_in_place_edit_in_progress_is_never_joined(setup):
    """While one in-place apply or revert holds the folder, another apply or revert is refused before it reads or
    changes anything (deterministic: the test holds the lock itself)."""
    src, lock = setup
    before = entries(src)
    fd = os.open(src, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for args in (["apply", str(src), "--lock", str(lock), "--in-place", "--no-loader-check"], ["revert", str(src)]):
            result = run(args)
            assert result.returncode == OUTPUT_EXIT, result.stderr
            assert f"another weightlock is editing {src} in place" in result.stderr
            assert "hint: wait for it to finish" in result.stderr
        with pytest.raises(OutputError, match="another weightlock is editing"):
            apply_in_place(src, lock, loader_check=False)
    finally:
        os.close(fd)
    assert entries(src) == before


# ---------------------------------------------------------------------------------------------
# Class 13: a Hub-cache snapshot (all symlinks) through in place and revert


def hub_snapshot(tmp_path: Path, **kwargs) -> Path:
    """A checkpoint laid out as the Hub cache stores it: each file a relative symlink into blobs/."""
    plain = make_llama(tmp_path / "plain", hidden=64, layers=3, vocab=128, shard_kb=40, **kwargs)
    (plain / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    (plain / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("c" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(plain.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        os.symlink(f"../../blobs/{blob.name}", snapshot / path.name)
    shutil.rmtree(plain)
    return snapshot


@pytest.mark.parametrize("attention_bias", [False, True], ids=["added-biases", "swapped-shards"])
def test_in_place_then_revert_restores_a_symlinked_snapshot_exactly(tmp_path, attention_bias):
    snapshot = hub_snapshot(tmp_path, attention_bias=attention_bias)
    save_lock(random_lock(snapshot), tmp_path / "l.wlock")
    blobs = snapshot.parent.parent / "blobs"
    before, hashes_before, blobs_before = entries(snapshot), tree_hashes(snapshot), entries(blobs)
    assert all(kind.startswith("-> ") for kind in before.values())
    original = shutil.copytree(snapshot, tmp_path / "original")  # existing biases: verify needs the source
    apply_in_place(snapshot, tmp_path / "l.wlock", loader_check=False)
    # real q/k biases: `ollama create` would misconvert them (tests/test_serving_table.py); transformers serves it
    assert verify_checkpoint(snapshot, loader_check=False, source=original, engines="transformers").ok
    assert not (snapshot / "README.md").is_symlink(), "the edit replaces the link, never writes through it"
    assert entries(blobs) == blobs_before, "the blob store is never written"
    result = run(["revert", str(snapshot)])
    assert result.returncode == 0, result.stderr
    assert "restored the symlink README.md" in result.stdout
    assert entries(snapshot) == before  # names, symlink-ness and link text
    assert tree_hashes(snapshot) == hashes_before  # the bytes read through them
    assert entries(blobs) == blobs_before


def test_a_symlink_whose_blob_changed_comes_back_as_its_original_bytes(tmp_path):
    """If the blob a symlinked file pointed to no longer holds its bytes, revert restores the bytes from the
    backup as a regular file (and says so) rather than a link to the wrong content."""
    snapshot = hub_snapshot(tmp_path)
    save_lock(random_lock(snapshot), tmp_path / "l.wlock")
    original = (snapshot / "README.md").read_bytes()
    apply_in_place(snapshot, tmp_path / "l.wlock", loader_check=False)
    blob = snapshot.parent.parent / "blobs" / hashlib.sha256(original).hexdigest()
    blob.write_bytes(b"changed\n")
    result = revert(snapshot)
    assert any("README.md as a regular file" in action for action in result["actions"]), result
    assert not (snapshot / "README.md").is_symlink() and (snapshot / "README.md").read_bytes() == original


def test_a_library_callers_ctrl_c_waits_for_a_critical_section_then_arrives():
    """Outside the CLI, a critical section (publish's renames, an in-place rollback) holds a Ctrl-C back until it
    ends, then raises it; the caller's own SIGINT handling is left as it was."""
    import signal

    from weightlock.io.commit import committing, critical

    handler = signal.getsignal(signal.SIGINT)
    for section in (critical, lambda: committing("something was published")):
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with section():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append(True)  # the section runs to its end
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is handler
