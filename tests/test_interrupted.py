"""Interrupted and failing writes, and in-place edits with revert.

Crashes are real: a child process running the CLI is killed with SIGKILL, either at each named failpoint
(WEIGHTLOCK_FAILPOINT makes the process SIGKILL itself there) or after a random delay. Afterwards the
source must be byte-identical, an output folder must exist only if `verify` accepts it, and a rerun (or,
in place, `revert`) must succeed."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import logits, make_llama, random_lock, run_cli, tree_hashes

from weightlock import apply_in_place, apply_lock, revert, save_lock, verify_checkpoint
from weightlock.errors import CheckpointError, OutputError
from weightlock.io.staging import FAILPOINT_VARIABLE

WEIGHTLOCK = [sys.executable, "-m", "weightlock"]
OUT_OF_PLACE_POINTS = ["staging-created", "shards-written", "staging-complete", "publish-moved-aside"]
IN_PLACE_POINTS = [
    "in-place-staged",
    "in-place-recorded",
    "in-place-shard-added",
    "in-place-renamed",
    "in-place-replaced-model.safetensors.index.json",
    "in-place-replaced-config.json",
]


@pytest.fixture
def setup(tmp_path):
    src = make_llama(tmp_path / "src", hidden=128, layers=4, vocab=512)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    return src, tmp_path / "l.wlock"


def run(args, failpoint=None, **kwargs):
    # The transformers class check adds seconds of imports to each child and is not what is tested here.
    args = args + ["--no-loader-check"] if args[0] == "apply" else args
    env = dict(os.environ, **({FAILPOINT_VARIABLE: failpoint} if failpoint else {}))
    return subprocess.run(WEIGHTLOCK + args, env=env, capture_output=True, text=True, **kwargs)


def output_is_absent_or_verified(out: Path) -> bool:
    return not out.exists() or verify_checkpoint(out, loader_check=False).ok


@pytest.mark.parametrize("point", OUT_OF_PLACE_POINTS)
def test_sigkill_at_each_step_of_apply(tmp_path, setup, point):
    src, lock = setup
    before = tree_hashes(src)
    out = tmp_path / "out"
    args = ["apply", str(src), "--lock", str(lock), "--out", str(out), "--link-mode", "copy"]
    if point == "publish-moved-aside":  # only reached when replacing an existing output
        assert run(args).returncode == 0
        args.append("--force")
    result = run(args, failpoint=point)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert tree_hashes(src) == before
    assert output_is_absent_or_verified(out)
    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr
    assert verify_checkpoint(out).ok
    assert not list(tmp_path.glob(".out.weightlock-*")), "the rerun tidies what the killed run left"


def test_sigkill_at_random_moments(tmp_path, setup):
    src, lock = setup
    before = tree_hashes(src)
    rng = random.Random(1234)
    for trial in range(6):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(
            WEIGHTLOCK
            + ["apply", str(src), "--lock", str(lock), "--out", str(out), "--link-mode", "copy", "--no-loader-check"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert tree_hashes(src) == before
        assert output_is_absent_or_verified(out)
        assert run(["apply", str(src), "--lock", str(lock), "--out", str(out), "--force"]).returncode == 0


def _limited_file_size(limit_bytes):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return set_limit


def test_file_size_limit_gives_a_clear_error_and_no_output(tmp_path, setup):
    src, lock = setup
    before = tree_hashes(src)
    out = tmp_path / "out"
    result = run(
        ["apply", str(src), "--lock", str(lock), "--out", str(out), "--link-mode", "copy"],
        preexec_fn=_limited_file_size(64 * 1024),
    )
    assert result.returncode == 5, result.stderr
    assert "File too large" in result.stderr and "ulimit" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.weightlock-*"))
    assert tree_hashes(src) == before
    assert run(["apply", str(src), "--lock", str(lock), "--out", str(out)]).returncode == 0


def _can_mount_read_only() -> bool:
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_read_only(),
    reason="needs unshare (user + mount namespaces) to mount a read-only filesystem without privileges",
)
def test_read_only_destination_gives_a_clear_error(tmp_path, setup):
    src, lock = setup
    before = tree_hashes(src)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    command = (
        f"mount -t tmpfs -o ro tmpfs {readonly} && exec {sys.executable} -m weightlock apply {src} "
        f"--lock {lock} --out {readonly}/locked"
    )
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], capture_output=True, text=True
    )
    assert result.returncode == 5, result.stderr
    assert "Read-only file system" in result.stderr and "read-only" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_hashes(src) == before and not list(readonly.iterdir())


# ------------------------------------------------------------------------------------------------ in place


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_in_place_apply_then_revert_restores_the_original_bytes(tmp_path, capsys, sharded):
    src = make_llama(tmp_path / "src", shard_kb=40 if sharded else None)
    lock = random_lock(src)
    save_lock(lock, tmp_path / "l.wlock")
    before = tree_hashes(src)
    shards_before = {p.name: p.stat().st_ino for p in src.glob("*.safetensors")}
    unlocked = logits(src)
    code, out, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--in-place", "--alpha", "3", "--json"
    )
    assert code == 0, err
    assert not (src / "model.safetensors").exists()
    assert verify_checkpoint(src).ok
    locked = logits(src)
    assert (locked - unlocked).abs().max() > 0.1
    # no shard's bytes were touched: the original inodes are all still there (one maybe renamed)
    assert set(shards_before.values()) <= {p.stat().st_ino for p in src.glob("*.safetensors")}
    code, _, err = run_cli(capsys, "revert", str(src))
    assert code == 0, err
    assert tree_hashes(src) == before
    assert (logits(src) - unlocked).abs().max() == 0


def test_in_place_matches_out_of_place(tmp_path):
    src = make_llama(tmp_path / "src")
    lock = random_lock(src)
    apply_lock(src, lock, out=tmp_path / "copy", alpha=2.0)
    apply_in_place(src, lock, alpha=2.0)
    assert (logits(src) - logits(tmp_path / "copy")).abs().max() == 0


@pytest.mark.parametrize("point", IN_PLACE_POINTS)
def test_sigkill_during_in_place_apply_then_revert(tmp_path, setup, point):
    src, lock = setup
    before = tree_hashes(src)
    result = run(["apply", str(src), "--lock", str(lock), "--in-place"], failpoint=point)
    assert result.returncode == -signal.SIGKILL, result.stderr
    reverted = run(["revert", str(src)])
    assert reverted.returncode == 0, reverted.stderr
    assert tree_hashes(src) == before
    assert run(["apply", str(src), "--lock", str(lock), "--in-place"]).returncode == 0, "a rerun succeeds"
    assert verify_checkpoint(src).ok


def test_revert_interrupted_itself_can_be_rerun(tmp_path, setup):
    src, lock = setup
    before = tree_hashes(src)
    apply_in_place(src, lock)
    # simulate a revert killed after restoring config.json but before the rest
    backup = src / "weightlock" / "backup" / "config.json"
    os.replace(src / "config.json", tmp_path / "locked-config.json")
    (src / "config.json").write_bytes(backup.read_bytes())
    revert(src)
    assert tree_hashes(src) == before


def test_in_place_refusals(tmp_path, setup):
    src, lock = setup
    apply_in_place(src, lock)
    with pytest.raises(OutputError, match="already carries a weightlock edit"):
        apply_in_place(src, lock)
    revert(src)
    with pytest.raises(CheckpointError, match="no in-place weightlock edit"):
        revert(src)
    (src / "consolidated.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="other formats"):
        apply_in_place(src, lock)
    (src / "consolidated.safetensors").unlink()
    apply_lock(src, lock, out=tmp_path / "copy")
    with pytest.raises(CheckpointError, match="not edited in place"):
        revert(tmp_path / "copy")
    biased = make_llama(tmp_path / "biased", attention_bias=True)  # existing biases: shards swapped, revertible
    before = tree_hashes(biased)
    assert apply_in_place(biased, random_lock(biased)).plan.replaced
    revert(biased)
    assert tree_hashes(biased) == before


def test_cli_needs_exactly_one_of_out_and_in_place(tmp_path, capsys, setup):
    src, lock = setup
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock))
    assert code == 3 and "exactly one" in err
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(lock), "--in-place", "--out", str(tmp_path / "o"))
    assert code == 3
    assert json.loads((src / "config.json").read_text())["attention_bias"] is False
