"""Reading files that weightlock did not just write: every one of them is hostile until checked.

One place decides how a file from a checkpoint, a lock or a record is opened and parsed:

- only regular files are read: a FIFO would block a read forever and a character device
  (``/dev/zero``) would never end, so files are opened non-blocking and ``fstat``-checked
  before a byte is read;
- JSON documents are read whole only below a size limit, their nesting depth is checked
  before Python's recursive parser sees them (100,000 nested brackets would otherwise end
  in a ``RecursionError`` traceback), and each is validated against a schema before any
  value is used;
- the values that come out carry the types the schema promises, so code past this point
  can index them without defending against strings where objects belong.

Hand-written rather than taken from a library: the standard library's ``json`` has no depth
or size limit, and the checks here must run before it does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from .errors import CheckpointError, WeightlockError
from .schema import schema_errors

MAX_JSON_DEPTH = 64
# A config or tokenizer config of a real model is kilobytes to a few megabytes (chat templates, added
# tokens); an index of a 405B model is about 100 KB; a record holds an original config and index.
MAX_JSON_BYTES = {"config": 16 << 20, "tokenizer config": 64 << 20, "index": 64 << 20, "record": 256 << 20}
DEFAULT_MAX_JSON_BYTES = 64 << 20
HASH_CHUNK_BYTES = 8 << 20


def _refusal(path: Path, what: str, problem: str, error=CheckpointError) -> WeightlockError:
    return error(
        f"{what} {path} {problem}",
        hint="weightlock reads only regular files; replace it with the real file, or remove it",
    )


def open_regular(path: str | os.PathLike, what: str = "file", error=CheckpointError) -> int:
    """An O_RDONLY descriptor of ``path``, refused unless it is a regular file. Never blocks."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(
                f"{what} {path} is a symlink whose target does not exist",
                hint="the download or copy is incomplete; fetch the missing file",
            ) from None
        raise error(f"{what} {path} does not exist", hint="check the path; the folder may be incomplete") from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, or a FIFO with no writer on some systems
            raise _refusal(path, what, "is not a regular file", error) from None
        raise error(
            f"cannot open {what} {path}: {e.strerror or e}", hint="check that the file exists and is readable"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a folder"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "not a regular file"
            )
            raise _refusal(path, what, f"is {kind}, not a regular file", error)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_regular(path: str | os.PathLike, what: str = "file", error=CheckpointError) -> None:
    """Refuse ``path`` unless it opens as a regular file (a check before it is linked or copied)."""
    os.close(open_regular(path, what, error))


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int, error=CheckpointError) -> bytes:
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise error(
                f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} this kind of file may be",
                hint="the file is damaged or not what its name says; restore it from the original",
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew while we read
            raise error(
                f"{what} {path} grew past {max_bytes:,} bytes while being read",
                hint="do not edit the checkpoint while weightlock reads it",
            )
        return data
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}", hint="check that the file is readable") from None
    finally:
        os.close(fd)


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in ``text`` nests deeper than ``limit`` (brackets inside strings ignored).
    Linear in the text; run before ``json.loads``, whose recursion a hostile file can exhaust."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(data: bytes | str, where: str, *, object_pairs_hook=None, error=CheckpointError):
    """JSON text from an untrusted source, with the depth checked first."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise error(
            f"{where} is not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})",
            hint="the file is damaged; restore it from the original",
        ) from None
    if not json_depth_ok(text):
        raise error(
            f"{where} nests arrays or objects more than {MAX_JSON_DEPTH} levels deep",
            hint="no file weightlock reads needs that; the file is damaged or hostile",
        )
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as e:
        raise error(
            f"{where} is not valid JSON ({e})", hint="the file is damaged; restore it from the original"
        ) from None


def check_schema(value, schema: str, where: str, error=CheckpointError, hint: str | None = None):
    """``value`` if it matches ``schemas/<schema>.schema.json``, else a refusal naming the first problems."""
    problems = schema_errors(value, schema)
    if problems:
        raise error(
            f"{where} is not what weightlock expects: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""),
            hint=hint or "the file is damaged or hostile; restore it from the original",
        )
    return value


def read_json(
    path: str | os.PathLike, what: str, schema: str | None = None, *, error=CheckpointError, hint: str | None = None
):
    """A JSON document from disk: a regular file, within its size limit and depth, matching ``schema``."""
    data = read_bytes(path, what, MAX_JSON_BYTES.get(what, DEFAULT_MAX_JSON_BYTES), error)
    value = parse_json(data, f"{what} {path}", error=error)
    return value if schema is None else check_schema(value, schema, f"{what} {path}", error, hint)


def file_sha256(path: str | os.PathLike, what: str = "file", error=CheckpointError) -> str:
    """sha256 of a regular file's bytes, read in chunks."""
    fd = open_regular(path, what, error)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}", hint="check that the file is readable") from None
    return digest.hexdigest()


def is_plain_name(name) -> bool:
    """A file name directly inside a folder: no separators, not '.', '..' or empty, no NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )
