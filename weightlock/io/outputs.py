"""Where weightlock may write: the one check every output goes through, and the one way a file is written.

:func:`check_output_file` is called by every command that writes a single file (forge and import-legacy
``--out``, eval and tune ``--report`` / ``--plot``, ``inspect --heatmap``) before any expensive work, and
:func:`check_output_folder` by apply ``--out``. An output

- that exists is refused unless ``--force`` was given (a folder or a non-file is refused even then);
- is never an input the command reads, nor inside one, nor (a folder output) a folder that holds one; paths
  are compared with their symlinks resolved;
- needs an existing, writable folder to go in (a file output) or no regular file among its parents.

:func:`write_file_atomically` then writes the file beside its place and renames it there, so a kill
leaves the old file or the new one, never half of one (the staging file of a killed run is removed by the
next write to the same place), and a refused write leaves nothing.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from weightlock.errors import OutputError
from weightlock.io.staging import pid_alive
from weightlock.io.untrusted import file_kind

PARTIAL_SUFFIX = ".weightlock-partial"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _input_paths(inputs: Iterable) -> list[Path]:
    """The inputs that are local paths (a Hub id that names nothing here is not one)."""
    found = []
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        if path.exists() or path.is_symlink():
            found.append(_resolved(path))
    return found


def _check_not_an_input(path: Path, inputs: Iterable, option: str, folder: bool) -> None:
    target = _resolved(path)
    for source in _input_paths(inputs):
        if target == source:
            raise OutputError(
                f"{option} {path} is the source {source}, an input of this command",
                hint=f"choose a new {option}; weightlock never writes over what it reads",
            )
        if source in target.parents:
            raise OutputError(
                f"{option} {path} is inside the source {source}, an input of this command",
                hint=f"choose an {option} outside the folders weightlock reads",
            )
        if folder and target in source.parents:
            raise OutputError(
                f"{option} {path} contains the source {source}, an input of this command",
                hint=f"choose an {option} that does not contain what weightlock reads",
            )


def _check_parents(path: Path, option: str) -> None:
    """No regular file (or other non-folder) among the parents of ``path``."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(
                f"{option} {path} cannot be created: {parent} is a file, not a folder",
                hint=f"choose an {option} in an existing folder",
            )


def check_output_file(
    path: str | os.PathLike, *, inputs: Iterable = (), force: bool = False, option: str = "--out"
) -> Path:
    """Refuse ``path`` as a file output unless it is safe to write (see the module's text); returns it."""
    path = Path(path)
    _check_parents(path, option)
    _check_not_an_input(path, inputs, option, folder=False)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(
            f"the folder of {option} {path} does not exist", hint=f"create {parent} first, or choose another {option}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {path}: you may not write in {parent}", hint=f"choose an {option} in a folder you can write"
        )
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{option} {path} is a folder", hint=f"name a file as {option}")
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputError(
                f"{option} {path} already exists", hint=f"choose another {option}, or pass --force to replace it"
            )
        if not path.is_symlink() and not path.is_file():
            raise OutputError(
                f"{option} {path} exists and is not a regular file",
                hint=f"choose another {option}; --force replaces only a regular file",
            )
    return path


def check_output_folder(path: str | os.PathLike, *, inputs: Iterable = (), option: str = "--out") -> Path:
    """The checks of a folder output that do not depend on its format: not an input, not inside one, not
    holding one, no regular file among its parents (whether it may exist is the writer's business)."""
    path = Path(path)
    _check_parents(path, option)
    _check_not_an_input(path, inputs, option, folder=True)
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():  # as for a file output: weightlock creates the output, not folders above it
        raise OutputError(
            f"the folder of {option} {path} does not exist", hint=f"create {parent} first, or choose another {option}"
        )
    return path


def check_replaceable(path: Path, *, force: bool, kind: str, option: str = "--out") -> None:
    """Whether an existing ``path`` may be replaced by an output of ``kind`` ("folder" or "file"): never without
    ``force``, and even then only a real folder (an earlier output) or a regular file, or a symlink (the link is
    replaced, never what it points to). A device, a FIFO or a file where a folder goes is refused: ``--force``
    replacing ``/dev/null`` with a model folder is not what anyone asked for. Every writer calls this before its
    work and again right before it publishes."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not force:
        raise OutputError(f"{path} already exists", hint=f"choose another {option}, or pass --force to replace it")
    if stat.S_ISLNK(mode):
        return
    wanted = stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISREG(mode)
    if not wanted:
        wanted_kind = "an output folder" if kind == "folder" else "a file"
        raise OutputError(
            f"{option} {path} exists and is {file_kind(mode)}, not {wanted_kind}",
            hint=f"choose another {option}; --force replaces only an earlier output "
            f"({'a folder' if kind == 'folder' else 'a regular file'})",
        )


def _remove_stale_partials(path: Path) -> None:
    """Staging files of killed runs that wrote ``path``."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        pid = name[len(prefix) : -len(PARTIAL_SUFFIX)].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _publish(tmp: Path, path: Path, force: bool) -> None:
    """Rename the finished staging file to ``path`` (without ``force``: never over an existing file)."""
    if force:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # fails if path exists: no check-then-write race
        except FileExistsError:
            raise OutputError(
                f"{path} appeared while weightlock worked", hint="choose another name, or pass --force"
            ) from None
        except OSError:  # a filesystem without hardlinks
            if os.path.lexists(path):
                raise OutputError(
                    f"{path} appeared while weightlock worked", hint="choose another name, or pass --force"
                ) from None
            os.replace(tmp, path)
        os.unlink(tmp)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_file_atomically(
    path: str | os.PathLike,
    data: bytes | Callable[[Path], object],
    *,
    force: bool = True,
    commit: str | None = None,
) -> None:
    """Write one output file: staged beside its place (``data``, or ``data(staging_path)`` writing it), made
    durable, then renamed over ``path``; without ``force`` an existing ``path`` is never replaced, even one
    that appeared while the work ran. Any failure removes the staging file and is an OutputError.

    The rename is one ``commit.critical`` section; ``commit`` (what is then true, e.g. "X was written"): the
    command's commit point is reached with it (``commit.committing``), so a Ctrl-C after that no longer stops
    the command. Leave it None for a file that is not the command's final output (a temporary copy)."""
    from weightlock.io.commit import committing, critical
    from weightlock.io.staging import write_failure

    path = Path(path)
    _remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        try:
            if callable(data):
                data(tmp)
            else:
                with open(tmp, "xb") as f:
                    f.write(data)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            with committing(commit) if commit is not None else critical():
                _publish(tmp, path, force)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise write_failure(e, path) from None
