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
import functools
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
from pathlib import Path

from weightlock.errors import CheckpointError, WeightlockError
from weightlock.io.schema import schema_errors

MAX_JSON_DEPTH = 64
# A config or tokenizer config of a real model is kilobytes to a few megabytes (chat templates, added
# tokens); an index of a 405B model is about 100 KB; a record holds an original config and index.
MAX_JSON_BYTES = {"config": 16 << 20, "tokenizer config": 64 << 20, "index": 64 << 20, "record": 256 << 20}
DEFAULT_MAX_JSON_BYTES = 64 << 20
HASH_CHUNK_BYTES = 8 << 20
# The largest integer a JSON number may be: what a double holds (a float() of it must not overflow).
MAX_JSON_INT = int(sys.float_info.max)
MAX_JSON_INT_DIGITS = len(str(MAX_JSON_INT))


def _refusal(path: Path, what: str, problem: str, error=CheckpointError) -> WeightlockError:
    return error(
        f"{what} {path} {problem}",
        hint="weightlock reads only regular files; replace it with the real file, or remove it",
    )


_FILE_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def file_kind(mode: int) -> str:
    """What a file of ``mode`` (``st_mode``) is, in words, for a refusal."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


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
            raise _refusal(path, what, f"is {file_kind(mode)}, not a regular file", error)
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
        return json.loads(
            text,
            object_pairs_hook=object_pairs_hook,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except _NumberRefused as e:
        raise error(
            f"{where} holds the number {e}, which weightlock does not accept",
            hint="numbers must be finite and within a double's range (no NaN, Infinity or 10^400); "
            "the file is damaged or hostile: restore it from the original",
        ) from None
    except (ValueError, RecursionError) as e:
        raise error(
            f"{where} is not valid JSON ({e})", hint="the file is damaged; restore it from the original"
        ) from None


class _NumberRefused(Exception):
    """A JSON number no value in a file weightlock reads may be (raised inside json.loads, reported by parse_json)."""


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...({len(literal)} characters)"


def _bounded_int(literal: str) -> int:
    # Python's json accepts any integer, and 10^400 passes a schema's "integer" or "number", then overflows
    # the first float() or format() that meets it. Bounded by a double's range, since some real files
    # (tokenizer configs' model_max_length = 10^30) hold integers beyond int64.
    if len(literal.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _NumberRefused(_shown(literal))
    value = int(literal)
    if abs(value) > MAX_JSON_INT:
        raise _NumberRefused(_shown(literal))
    return value


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400 reads as inf
        raise _NumberRefused(_shown(literal))
    return value


def _no_constant(literal: str):
    raise _NumberRefused(literal)  # NaN, Infinity, -Infinity: not JSON, though Python's json writes them


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


# --- regular expressions from an input (compressed-tensors' "re:" rules) ---------------------------------
#
# Python's re backtracks and has no time limit: (a+)+$ against 30 a's and a b runs for minutes. A pattern
# from an input is therefore compiled here only if the work of one match is bounded: no quantifier inside a
# repeated group (nested or optional, (a+)+ and (a?){30}), no alternation or backreference under a repeat,
# and the product of the choices its quantifiers leave (each unbounded one counted as the longest name it
# may meet) under MAX_PATTERN_WORK. Names longer than MAX_MATCHED_NAME_CHARS are not matched, so that bound
# holds, and all the matches against one input's patterns together get MAX_MATCH_SECONDS.

MAX_MATCHED_NAME_CHARS = 256  # module names of real checkpoints are under 100 characters
MAX_PATTERN_WORK = 1 << 28  # e.g. three unbounded quantifiers and some alternatives against 256 characters: ~1 s
MAX_MATCH_SECONDS = 30.0


class _PatternRefused(Exception):
    pass


def _regex_parser():
    try:
        from re import _constants as constants  # type: ignore[attr-defined]
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # Python 3.10
        import sre_constants as constants  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]
    return parser, constants


def _pattern_work(items, c, under_repeat: bool) -> int:
    """Worst-case number of paths a backtracking match of ``items`` (a parsed pattern) can try."""
    work = 1
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT} | ({c.POSSESSIVE_REPEAT} if hasattr(c, "POSSESSIVE_REPEAT") else set())
    for op, av in items:
        if op in repeats:
            low, high, body = av
            inner = _pattern_work(body, c, under_repeat or high > 1)
            if high > 1:
                if inner > 1:
                    raise _PatternRefused("it repeats a group that itself has a quantifier or alternatives")
                work *= min(high, MAX_MATCHED_NAME_CHARS) - min(low, MAX_MATCHED_NAME_CHARS) + 1
            else:
                work *= inner + (1 if low == 0 else 0)
        elif op == c.BRANCH:
            if under_repeat:
                raise _PatternRefused("it repeats a group of alternatives")
            work *= sum(_pattern_work(branch, c, under_repeat) for branch in av[1])
        elif op == c.SUBPATTERN:
            work *= _pattern_work(av[-1], c, under_repeat)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            work *= _pattern_work(av[1], c, under_repeat)
        elif getattr(c, "ATOMIC_GROUP", None) is not None and op == c.ATOMIC_GROUP:
            work *= _pattern_work(av, c, under_repeat)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS) or str(op).startswith("GROUPREF"):
            raise _PatternRefused("it has a backreference or a conditional group")
        if work > MAX_PATTERN_WORK:
            raise _PatternRefused(f"matching it could try more than {MAX_PATTERN_WORK:,} ways per name")
    return work


@functools.lru_cache(maxsize=4096)
def bounded_pattern(pattern: str) -> re.Pattern:
    """``pattern`` (from an input) compiled, or a ValueError saying why it is refused: invalid, or a shape
    whose backtracking is not bounded (see above)."""
    parser, constants = _regex_parser()
    try:
        parsed = parser.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"it is not a valid regular expression ({e})") from None
    try:
        _pattern_work(parsed, constants, False)
    except _PatternRefused as e:
        raise ValueError(f"{e}, which can make matching run for minutes") from None
    except RecursionError:
        raise ValueError("it nests groups too deeply") from None
    return compiled


class BoundedMatcher:
    """Matches names against one input's patterns (each checked by :func:`bounded_pattern`) within
    MAX_MATCH_SECONDS for all its matches together; refusals are ``error`` (what the input is: ``where``)."""

    def __init__(self, where: str, error=CheckpointError, hint: str | None = None):
        self.where, self.error = where, error
        self.hint = hint or "the file is damaged or hostile; restore it from the original"
        self.seconds = 0.0

    def compiled(self, pattern: str) -> re.Pattern:
        try:
            return bounded_pattern(pattern)
        except ValueError as e:
            raise self.error(f"{self.where} holds the pattern {pattern[:80]!r}: {e}", hint=self.hint) from None

    def match(self, pattern: str, name: str) -> bool:
        """``re.match(pattern, name)`` (as compressed-tensors and vLLM match), bounded."""
        compiled = self.compiled(pattern)
        if len(name) > MAX_MATCHED_NAME_CHARS:
            raise self.error(
                f"the module name {name[:60]!r}... is {len(name)} characters long; weightlock matches the patterns "
                f"of {self.where} only against names of up to {MAX_MATCHED_NAME_CHARS}",
                hint="the checkpoint's tensor names are damaged or hostile; restore it from the original",
            )
        started = time.perf_counter()
        found = compiled.match(name) is not None
        self.seconds += time.perf_counter() - started
        if self.seconds > MAX_MATCH_SECONDS:
            raise self.error(
                f"matching the patterns of {self.where} took more than {MAX_MATCH_SECONDS:g} s",
                hint="use fewer and simpler patterns (a real config has a handful); the file may be hostile",
            )
        return found
