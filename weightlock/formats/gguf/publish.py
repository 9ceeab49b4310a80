"""Publishing the files of a GGUF output (one file, or a split set) so that a kill leaves the old output or the
new one, never a mix, and the next run finishes or undoes what a killed one began.

A set of N files cannot appear in a folder in one rename, so the publish is a small journaled transaction:

1. every file is written and verified in one staging folder beside the output (``writer.staging_path``);
2. a journal is written into that folder: the output names, and the inode of each staged file;
3. each existing output file (``--force``) is moved aside into the staging folder, the first file first;
4. the new files are renamed into place, the first file of the set *last*: that rename is the commit point.
   The first file is the set's entry point (llama.cpp and weightlock open a set by it), so until it arrives
   the output is absent (or, under ``--force``, already moved aside), and once it arrives the set is whole;
5. the staging folder, with the journal and what was moved aside, is removed.

A run killed anywhere leaves its staging folder, named with its process id. The next apply to the same
output (:func:`recover_publish`, run before anything is checked) rolls it back if the first file was not yet
published (the new files already in place, recognised by their inodes, are taken back; what was moved aside
is put back) and forward otherwise (only the clean-up was left). A staging folder without a journal was
killed before step 2: nothing was published, and ``writer.recover_interrupted`` removes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from weightlock.errors import OutputError
from weightlock.io.outputs import check_replaceable
from weightlock.io.staging import PARTIAL_MARK, failpoint, fsync_dir, pid_alive, siblings_starting, write_failure

JOURNAL_NAME = "weightlock-publish.json"  # not *.gguf, so never an output name
MOVED_ASIDE = "replaced"  # the previous output's files, inside the staging folder
JOURNAL_FORMAT = "weightlock-gguf-publish"
MAX_JOURNAL_BYTES = 1 << 20


def _identity(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_dev, st.st_ino]


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def publish_set(staging: Path, outputs: list[Path], force: bool) -> None:
    """Move the verified files ``staging/NAME`` to ``outputs`` (all in one folder, the set's first file
    first in the list) as one transaction; an existing output is replaced only with ``force``."""
    folder = outputs[0].parent
    names = [p.name for p in outputs]
    try:
        for path in outputs:
            check_replaceable(path, force=force, kind="file")  # again: something may have appeared meanwhile
        journal = {
            "format": JOURNAL_FORMAT,
            "outputs": names,
            "staged": {name: _identity(staging / name) for name in names},
        }
        with open(staging / JOURNAL_NAME, "x", encoding="utf-8") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
    except BaseException as e:  # nothing was published: the staging folder goes
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failure(e, outputs[0]) from None
        raise
    failpoint("gguf-publish-journal")
    try:
        _move_aside(staging, folder, names)
        for name in reversed(names):  # the first file last: its rename publishes the set
            os.rename(staging / name, folder / name)
            failpoint("gguf-file-published")
        fsync_dir(folder)
        shutil.rmtree(staging)
    except OSError as e:
        try:
            _finish(staging, folder, journal)
        except OSError:
            raise OutputError(
                f"publishing {outputs[0]} failed ({e.strerror or e}) and could not be undone",
                hint=f"run the same command again: it finishes or undoes the publish ({staging.name} holds it)",
            ) from None
        raise write_failure(e, outputs[0]) from None


def _move_aside(staging: Path, folder: Path, names: list[str]) -> None:
    """Step 3: each existing output file whose replacement is still staged, into ``staging/replaced``."""
    aside = staging / MOVED_ASIDE
    for name in names:
        if _exists(staging / name) and _exists(folder / name) and not _exists(aside / name):
            aside.mkdir(exist_ok=True)
            os.rename(folder / name, aside / name)
            failpoint("gguf-publish-moved-aside")
    fsync_dir(folder)


def _finish(staging: Path, folder: Path, journal: dict) -> str:
    """Roll a journaled publish forward (the first file is published) or back; returns what was done."""
    names: list[str] = journal["outputs"]
    aside = staging / MOVED_ASIDE
    if not _exists(staging / names[0]):  # committed: every file is in place, only the clean-up was left
        shutil.rmtree(staging)
        return f"finished publishing {names[0]}, which an interrupted run had published"
    for name in names[1:]:  # take back the new files already published (ours: the staged inodes)
        target = folder / name
        if not _exists(staging / name) and _exists(target) and _identity(target) == journal["staged"][name]:
            os.rename(target, staging / name)
            failpoint("gguf-publish-rolled-back")
    kept_aside = False
    for name in reversed(names):  # put back what was moved aside, the first file last
        if _exists(aside / name):
            if _exists(folder / name):  # someone else's file arrived meanwhile: keep both, tell the user
                kept_aside = True
                continue
            os.rename(aside / name, folder / name)
            failpoint("gguf-publish-restored")
    fsync_dir(folder)
    if kept_aside:
        return f"an interrupted publish of {names[0]} was undone, but {aside} holds files that could not be put back"
    shutil.rmtree(staging)
    return f"undid the unfinished publish of {names[0]} by an interrupted run; the previous state is back"


def _read_journal(path: Path) -> dict | None:
    """The journal a dead run left, or None when it is not one weightlock wrote (then it is left alone)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOURNAL_BYTES + 1)
        journal = json.loads(data) if len(data) <= MAX_JOURNAL_BYTES else None
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or journal.get("format") != JOURNAL_FORMAT:
        return None
    names, staged = journal.get("outputs"), journal.get("staged")
    if not isinstance(names, list) or not names or not isinstance(staged, dict):
        return None
    for name in names:
        if not (
            isinstance(name, str)
            and name == Path(name).name
            and name.lower().endswith(".gguf")
            and not name.startswith(".")
            and isinstance(staged.get(name), list)
            and len(staged[name]) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in staged[name])
        ):
            return None
    return journal


def recover_publish(outputs: list[Path]) -> list[str]:
    """Finish or undo the publish of every dead run's journaled staging folder beside ``outputs[0]``;
    returns what was done. Run before the output is checked, so that a rerun sees the state a completed
    (or never started) publish leaves."""
    first = outputs[0]
    done: list[str] = []
    if not first.parent.is_dir():
        return done
    for staging in siblings_starting(first, f".{first.name}.{PARTIAL_MARK}-"):
        pid = staging.name.rsplit(f"{PARTIAL_MARK}-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)) or staging.is_symlink() or not staging.is_dir():
            continue
        journal = _read_journal(staging / JOURNAL_NAME)
        if journal is None or journal["outputs"][0] != first.name:
            continue  # killed before its journal: nothing was published (writer.recover_interrupted removes it)
        try:
            done.append(_finish(staging, first.parent, journal))
        except OSError as e:
            raise write_failure(e, first) from None
    return done
