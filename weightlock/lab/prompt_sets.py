"""Prompt files for eval: the user's, or the small default sets shipped in ``weightlock/lab/default_prompts/``.

Accepted files: ``.txt`` (one prompt per line, ``#`` comments), ``.csv`` (a ``prompt`` or ``goal``
column, else the first column of a header-less file such as AdvBench's; when a ``label`` column
exists only rows labelled ``safe`` are kept for benign sets and ``unsafe`` for harmful ones, so
XSTest's file works as it is), ``.json`` (a list of strings or of objects with ``prompt``/``question``)
and ``.jsonl`` (one such item per line). Question/answer files for utility are JSON/JSONL objects
with ``question`` and ``answers`` (a list of accepted answers).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from weightlock.errors import InvalidInputError
from weightlock.io.text import HIDDEN, printable
from weightlock.io.untrusted import parse_json, read_bytes

DEFAULTS = {
    "harmful": "harmful.txt",
    "benign": "benign_risky.txt",
    "kl": "kl_text.txt",
    "qa": "utility_qa.jsonl",
    "forge-benign": "forge_benign.txt",  # forge's own benign prompts, never an eval set
}
CSV_LABEL_KEPT = {"harmful": "unsafe", "benign": "safe", "forge-benign": "safe"}
PROMPT_KEYS = ("prompt", "question", "goal", "text", "instruction")


@dataclass(frozen=True)
class PromptSet:
    name: str  # the file it came from, or "default:<file>"
    items: list  # str prompts, or {"question", "answers"} for qa


# A prompt of a real set is at most a few thousand characters (XSTest's longest: about 200; HarmBench's: about
# 4,000); a set of 100,000 of them is tens of megabytes.
MAX_PROMPT_CHARS = 32_768
MAX_PROMPT_FILE_BYTES = 256 << 20


def load_prompt_set(kind: str, path: str | Path | None = None, limit: int | None = None) -> PromptSet:
    """The ``kind`` set ("harmful", "benign", "kl", "qa") from ``path``, or the shipped default."""
    if path is None:
        text = resources.files("weightlock.lab").joinpath("default_prompts", DEFAULTS[kind]).read_text("utf-8")
        name, suffix = f"default:{DEFAULTS[kind]}", Path(DEFAULTS[kind]).suffix
    else:
        path = Path(path)
        try:
            text = read_bytes(path, f"the {kind} prompt file", MAX_PROMPT_FILE_BYTES, InvalidInputError).decode("utf-8")
        except (InvalidInputError, UnicodeDecodeError) as e:
            raise InvalidInputError(
                f"cannot read the {kind} prompt file {path}: {getattr(e, 'message', e)}",
                hint="pass a UTF-8 .txt, .csv, .json or .jsonl file",
            ) from None
        name, suffix = str(path), path.suffix.lower()
    items = _parse(text, suffix, kind, name)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise InvalidInputError(
            f"the {kind} prompt file {name} holds no prompts",
            hint="one prompt per line (.txt), a prompt column (.csv) or a JSON list",
        )
    return PromptSet(name, items)


def _json(text: str):
    """JSON read as every untrusted JSON is (depth, finite numbers), refused with a ValueError for _parse to report."""
    try:
        return parse_json(text, "an item", error=InvalidInputError)
    except InvalidInputError as e:
        raise ValueError(e.message) from None


def _parse(text: str, suffix: str, kind: str, name: str) -> list:
    try:
        if suffix == ".csv":
            raw = _from_csv(text, kind)
        elif suffix == ".json":
            raw = _json(text)
            if not isinstance(raw, list):
                raise ValueError("the top level is not a list")
        elif suffix == ".jsonl":
            raw = [_json(line) for line in text.splitlines() if line.strip()]
        else:
            raw = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return [_item(x, kind) for x in raw]
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise InvalidInputError(
            f"cannot parse the {kind} prompt file {name}: {e}",
            hint="see `weightlock eval --help` for the accepted formats",
        ) from None


def _from_csv(text: str, kind: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(k) for k in PROMPT_KEYS if k in header), None)
    if column is None:  # header-less, like AdvBench's harmful_behaviors.csv
        return [row[0] for row in rows if row and row[0].strip()]
    label = header.index("label") if "label" in header else None
    keep = CSV_LABEL_KEPT.get(kind)
    return [
        row[column]
        for row in rows[1:]
        if len(row) > column
        and row[column].strip()
        and (label is None or keep is None or row[label].strip().lower() == keep)
    ]


def _item(x, kind: str):
    if kind == "qa":
        if not (
            isinstance(x, dict)
            and isinstance(x.get("question"), str)
            and _visible(x["question"])
            and len(x["question"]) <= MAX_PROMPT_CHARS
            and isinstance(x.get("answers"), list)
            and x["answers"]
            and all(isinstance(a, str) for a in x["answers"])
        ):
            raise ValueError(f"a QA item needs 'question' (non-empty text) and 'answers' (list of text): {str(x)[:80]}")
        for answer in x["answers"]:
            # an answer is found in a reply as a whole word; "" (or one with no letter or digit, such as "-")
            # is found in nearly every reply and would score every question correct
            if not any(ch.isalnum() for ch in answer):
                raise ValueError(
                    f"the accepted answer {answer[:40]!r} of {x['question'][:60]!r} has no letter or digit, so "
                    "it would match any reply"
                )
        return {"question": x["question"], "answers": list(x["answers"])}
    if isinstance(x, str) and _visible(x):
        return _bounded(x)
    if isinstance(x, dict):
        for key in PROMPT_KEYS:
            if isinstance(x.get(key), str) and _visible(x[key]):
                return _bounded(x[key])
    raise ValueError(
        f"an item is neither visible text nor an object with a visible prompt (blank, NUL or invisible characters "
        f"only): {printable(str(x)[:80])}"
    )


def _visible(text: str) -> bool:
    """Whether ``text`` holds anything but whitespace and the hidden characters of weightlock/io/text.py (NUL,
    zero-width, soft hyphen, ...): a prompt of those is empty to a reader and to a judge."""
    return bool(HIDDEN.sub("", text).strip())


def _bounded(text: str) -> str:
    """A prompt no longer than MAX_PROMPT_CHARS: one 50 MB line would otherwise be tokenized and fed to the
    model whole (tens of gigabytes), whatever --limit says."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"an item is {len(text):,} characters long, more than the {MAX_PROMPT_CHARS:,} a prompt may be"
        )
    return text
