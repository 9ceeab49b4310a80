"""Staging, publishing and recovery, the same for every output: a staging sibling named with our pid, a
publish by rename inside one critical section, recovery of what a killed run left, fsync, and the failpoints
the crash tests stop at. Format-free: the folder and GGUF writers both build on it."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path

from weightlock.errors import OutputError
from weightlock.io.commit import critical

FAILPOINT_VARIABLE = "WEIGHTLOCK_FAILPOINT"


_failpoints_passed = 0


def failpoint(name: str) -> None:
    """Crash here when asked to (crash tests; no effect otherwise). WEIGHTLOCK_FAILPOINT is a failpoint's
    name, or ``#N`` for the N-th failpoint this process reaches, whatever its name (so a test can stop a
    run at every step without listing them); ``:INT`` after either sends SIGINT (a Ctrl-C) instead of
    SIGKILL. Every step of apply, in place and revert that changes the disk is followed by one."""
    global _failpoints_passed
    wanted = os.environ.get(FAILPOINT_VARIABLE)
    if not wanted:
        return
    _failpoints_passed += 1
    target, _, how = wanted.partition(":")
    if target == name or target == f"#{_failpoints_passed}":
        os.kill(os.getpid(), signal.SIGINT if how == "INT" else signal.SIGKILL)


def write_failure(error: OSError, where: Path) -> OutputError:
    """A clear error for a write that the system refused."""
    hints = {
        errno.ENOSPC: "free some space on that filesystem, or choose an --out on another one",
        errno.EDQUOT: "your disk quota is exhausted; free some space or choose another --out",
        errno.EFBIG: "a file size limit (ulimit -f) stops the write; raise it or use hardlinks",
        errno.EROFS: "that filesystem is read-only; choose a writable --out",
        errno.EACCES: "you may not write there; choose a writable --out",
        errno.EPERM: "you may not write there; choose a writable --out",
    }
    return OutputError(
        f"writing under {where} failed: {error.strerror or error}",
        hint=hints.get(error.errno or 0, "check the destination and try again")
        + "; nothing was published and the partial output was removed",
    )


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


@contextmanager
def removed_on_failure(staging: Path, where: Path):
    """Remove ``staging`` if the block fails; a refused write becomes a clear OutputError."""
    try:
        yield
    except OSError as e:
        with critical():  # a second Ctrl-C does not leave half a staging folder
            shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(e, where) from None
    except BaseException:
        with critical():
            shutil.rmtree(staging, ignore_errors=True)
        raise


PARTIAL_MARK = "weightlock-partial"


REPLACED_MARK = "weightlock-replaced"


def staging_path(out: Path) -> Path:
    """A sibling of ``out`` (same filesystem, so the final rename is atomic), named with our pid."""
    return out.parent / f".{out.name}.{PARTIAL_MARK}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def siblings_starting(out: Path, prefix: str) -> list[Path]:
    """Entries beside ``out`` whose names start with ``prefix``, compared as text: a glob pattern built
    from a user's folder name would treat its [, ] and * as wildcards and miss (or catch) other names."""
    return sorted(out.parent / name for name in os.listdir(out.parent) if name.startswith(prefix))


def recover_interrupted(out: Path) -> list[str]:
    """Tidy what an earlier run killed mid-way left beside ``out``; returns what was done.

    Staging folders of dead processes are removed. A previous output moved aside by
    ``--force`` whose replacement never arrived is moved back, so nothing is lost.
    """
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    for item in siblings_starting(out, f".{out.name}.{PARTIAL_MARK}-"):
        pid = item.name.rsplit(f"{PARTIAL_MARK}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True)
            done.append(f"removed the partial output {item.name} of an interrupted run")
    for item in siblings_starting(out, f".{out.name}.{REPLACED_MARK}-"):
        if out.exists():
            shutil.rmtree(item, ignore_errors=True)
            done.append(f"removed {item.name}, an output already replaced by an interrupted --force run")
        else:
            os.rename(item, out)
            done.append(f"restored {out.name}, which an interrupted --force run had moved aside")
    return done


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out``; an existing ``out`` is replaced only with force.

    One critical section (weightlock.io.commit): a Ctrl-C never falls between moving the old output aside and
    renaming the new one in. The caller marks its commit point once everything it publishes is in place,
    inside ``committing(...)`` so that a Ctrl-C during the renames no longer stops it."""
    with critical():
        if out.exists() or out.is_symlink():
            if not force:
                raise OutputError(f"{out} already exists", hint="choose another --out, or pass --force to replace it")
            trash = out.parent / f".{out.name}.{REPLACED_MARK}-{uuid.uuid4().hex[:12]}"
            os.rename(out, trash)
            failpoint("publish-moved-aside")
            os.rename(staging, out)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash)
            else:
                trash.unlink()
        else:
            os.rename(staging, out)
        fsync_dir(out.parent)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a staging file or folder named with it is then not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
