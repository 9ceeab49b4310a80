"""Prompt files for eval: the user's, or the small default sets shipped in ``weightlock/lab/default_prompts/``.

Accepted files: ``.txt`` (one prompt per line, ``#`` comments), ``.csv`` (see below), ``.json`` (a list of
strings or of objects with ``prompt``/``question``, and ``category`` when there is one) and ``.jsonl`` (one
such item per line), or a folder of ``.csv``/``.txt`` files, one prompt per line and one category per file
(HEx-PHI's ``category_1.csv`` ... ``category_11.csv``: the category is the file's name). Question/answer files
for utility are JSON/JSONL objects with ``question`` and ``answers`` (a list of accepted answers) and an
optional ``category``.

A CSV is read by its header: the public sets' layouts are in :data:`LAYOUTS` (which column is the prompt,
which the category, which a safe/unsafe label); otherwise a ``prompt``/``question``/``goal``/... column
and a ``category`` column when there is one, else the first column of a header-less file such as
AdvBench's. When a label column exists only rows labelled ``safe`` are kept for benign sets and ``unsafe``
for harmful ones, so XSTest's file works as it is. ``columns`` (eval's ``--harmful-columns`` /
``--benign-columns``) names the prompt and category columns (or JSON keys) of any other layout.

Each item keeps its category (``PromptSet.categories``, parallel to ``items``; None for a set without
categories, which eval reports overall only). A categorised item with a blank category is counted under
:data:`NO_CATEGORY`, so the categories always add up to the whole set.
"""

from __future__ import annotations

import csv
import io
import re
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
CATEGORY_KEY = "category"
NO_CATEGORY = "(no category)"
CATEGORISED_KINDS = ("harmful", "benign", "qa")  # kl passages are not rated, so carry no category


@dataclass(frozen=True)
class Layout:
    """A public set's CSV, recognised when its header holds every column of ``header`` (any case)."""

    name: str
    header: tuple[str, ...]
    prompt: str
    category: str | None = None
    label: str | None = None  # "safe" / "unsafe" rows: kept by kind (CSV_LABEL_KEPT)
    context: str | None = None  # put before the prompt when not blank (HarmBench's contextual behaviours)


# Checked in order: the first whose columns are all in the header wins (JailbreakBench has a Behavior column
# too, but no SemanticCategory).
LAYOUTS = (
    Layout("JailbreakBench", ("Goal", "Target", "Behavior", "Category"), prompt="Goal", category="Category"),
    Layout(
        "HarmBench",
        ("Behavior", "FunctionalCategory", "SemanticCategory"),
        prompt="Behavior",
        category="SemanticCategory",
        context="ContextString",
    ),
    Layout("StrongREJECT", ("category", "source", "forbidden_prompt"), prompt="forbidden_prompt", category="category"),
    Layout("XSTest", ("prompt", "type", "label"), prompt="prompt", category="type", label="label"),
    Layout("OR-Bench", ("prompt", "category"), prompt="prompt", category="category"),
    Layout("AdvBench", ("goal", "target"), prompt="goal"),
)
# HarmBench's own rendering of a contextual behaviour (its DirectRequest baseline)
CONTEXT_SEPARATOR = "\n\n---\n\n"


@dataclass(frozen=True)
class PromptSet:
    name: str  # the file it came from, or "default:<file>"
    items: list  # str prompts, or {"question", "answers"} for qa
    categories: list[str] | None = None  # one per item, or None: the set has none
    layout: str | None = None  # the public layout its CSV was read as (LAYOUTS), if any


# A prompt of a real set is at most a few thousand characters (XSTest's longest: about 200; HarmBench's: about
# 4,000); a set of 100,000 of them is tens of megabytes.
MAX_PROMPT_CHARS = 32_768
MAX_PROMPT_FILE_BYTES = 256 << 20
MAX_FOLDER_FILES = 1_000  # HEx-PHI has 11; a folder of more is not a category set
FOLDER_SUFFIXES = (".csv", ".txt")


def parse_columns(text: str | None) -> tuple[str | None, str | None] | None:
    """``PROMPT``, ``PROMPT,CATEGORY`` or ``,CATEGORY`` (the prompt column found as usual) -> (prompt, category)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not any(parts):
        raise InvalidInputError(
            f"cannot read the columns {text!r}",
            hint="name the prompt column, or the prompt and category columns: PROMPT,CATEGORY (or ,CATEGORY)",
        )
    prompt = parts[0] or None
    category = parts[1] or None if len(parts) == 2 else None
    return prompt, category


def load_prompt_set(
    kind: str,
    path: str | Path | None = None,
    limit: int | None = None,
    columns: tuple[str | None, str | None] | None = None,
) -> PromptSet:
    """The ``kind`` set ("harmful", "benign", "kl", "qa") from ``path`` (a file or a folder of category files),
    or the shipped default. ``columns``: (prompt, category) column names (or JSON keys), None to find them."""
    layout = None
    if path is None:
        text = resources.files("weightlock.lab").joinpath("default_prompts", DEFAULTS[kind]).read_text("utf-8")
        name = f"default:{DEFAULTS[kind]}"
        items, categories, layout = _parse(text, Path(DEFAULTS[kind]).suffix, kind, name, columns)
    elif Path(path).is_dir():
        name = str(path)
        items, categories = _from_folder(Path(path), kind, columns)
    else:
        path = Path(path)
        name = str(path)
        items, categories, layout = _parse(_read_text(path, kind), path.suffix.lower(), kind, name, columns)
    if kind not in CATEGORISED_KINDS:
        categories = None
    if limit is not None:
        items = items[:limit]
        categories = None if categories is None else categories[:limit]
    if not items:
        raise InvalidInputError(
            f"the {kind} prompt file {name} holds no prompts",
            hint="one prompt per line (.txt), a prompt column (.csv), a JSON list or a folder of category files",
        )
    return PromptSet(name, items, categories, layout)


def _read_text(path: Path, kind: str, budget: int | None = None) -> str:
    try:
        data = read_bytes(path, f"the {kind} prompt file", budget or MAX_PROMPT_FILE_BYTES, InvalidInputError)
    except InvalidInputError as e:
        raise InvalidInputError(
            f"cannot read the {kind} prompt file {path}: {e.message}",
            hint="pass a UTF-8 .txt, .csv, .json or .jsonl file, or a folder of .csv/.txt category files",
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInputError(
            f"the {kind} prompt file {path} is not UTF-8: line {line} holds the byte 0x{data[e.start]:02x}",
            hint="convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None
    return text.removeprefix("\ufeff")  # a byte order mark (spreadsheets write one) is not part of the header


def _natural(path: Path):
    """category_2 before category_10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name.lower())]


def _from_folder(folder: Path, kind: str, columns) -> tuple[list, list[str] | None]:
    """HEx-PHI's layout: one header-less file of prompts per category, the category the file's name."""
    if columns is not None:
        raise InvalidInputError(
            f"{folder} is a folder of category files: its categories are the files' names, it has no columns",
            hint="drop the columns option, or pass a single CSV",
        )
    if kind == "qa":
        raise InvalidInputError(f"the qa set {folder} is a folder", hint="pass one .json or .jsonl file")
    try:
        files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in FOLDER_SUFFIXES and not p.name.startswith(".")),
            key=_natural,
        )
    except OSError as e:
        raise InvalidInputError(
            f"cannot list {folder}: {e.strerror or e}", hint="check the folder's permissions"
        ) from None
    if not files:
        raise InvalidInputError(
            f"the {kind} prompt folder {folder} holds no .csv or .txt files",
            hint="a folder of category files, one prompt per line (HEx-PHI's category_1.csv ...)",
        )
    if len(files) > MAX_FOLDER_FILES:
        raise InvalidInputError(
            f"the {kind} prompt folder {folder} holds {len(files):,} files, more than {MAX_FOLDER_FILES:,}",
            hint="a category set has one file per category",
        )
    items: list = []
    categories: list[str] = []
    budget = MAX_PROMPT_FILE_BYTES
    for file in files:
        if budget <= 0:
            raise InvalidInputError(
                f"the {kind} prompt folder {folder} holds more than {MAX_PROMPT_FILE_BYTES:,} bytes of prompts",
                hint="a category set is at most as large as one prompt file may be",
            )
        text = _read_text(file, kind, budget)
        budget -= len(text.encode())
        try:
            if file.suffix.lower() == ".csv":
                raw = [row[0] for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
            else:
                raw = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            got = [_item(x, kind) for x in raw]
        except (ValueError, csv.Error) as e:
            raise InvalidInputError(
                f"cannot parse the {kind} prompt file {file}: {e}",
                hint="one prompt per line (quoted when it holds a comma)",
            ) from None
        items += got
        categories += [file.stem] * len(got)
    return items, categories


def _json(text: str):
    """JSON read as every untrusted JSON is (depth, finite numbers), refused with a ValueError for _parse to report."""
    try:
        return parse_json(text, "an item", error=InvalidInputError)
    except InvalidInputError as e:
        raise ValueError(e.message) from None


def _parse(text: str, suffix: str, kind: str, name: str, columns=None) -> tuple[list, list[str] | None, str | None]:
    """(items, categories or None, the public layout recognised or None)."""
    layout = None
    try:
        if suffix == ".csv":
            raw, categories, layout = _from_csv(text, kind, columns)
        else:
            if suffix == ".json":
                raw = _json(text)
                if not isinstance(raw, list):
                    raise ValueError("the top level is not a list")
            elif suffix == ".jsonl":
                raw = [_json(line) for line in text.splitlines() if line.strip()]
            else:
                if columns is not None and columns[1] is not None:
                    raise _MissingColumn(f"a {suffix or 'text'} file has no columns, so no category column")
                raw = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            raw, categories = _json_categories(raw, columns)
        return [_item(x, kind) for x in raw], categories, layout
    except _MissingColumn as e:
        raise InvalidInputError(
            f"the {kind} prompt file {name}: {e}",
            hint="name columns the file has (PROMPT or PROMPT,CATEGORY), or leave them out to use the header",
        ) from None
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise InvalidInputError(
            f"cannot parse the {kind} prompt file {name}: {e}",
            hint="see `weightlock eval --help` for the accepted formats",
        ) from None


class _MissingColumn(Exception):
    pass


def _json_categories(raw: list, columns) -> tuple[list, list[str] | None]:
    """JSON items with the prompt key named by ``columns`` picked out, and their categories (a ``category`` key,
    or the one ``columns`` names)."""
    prompt_key, category_key = columns if columns is not None else (None, None)
    objects = [x for x in raw if isinstance(x, dict)]
    for key in (prompt_key, category_key):
        if key is not None and not any(key in x for x in objects):
            raise _MissingColumn(f"no item has the key {key!r}")
    if prompt_key is not None:
        raw = [{**x, "prompt": x.get(prompt_key)} if isinstance(x, dict) else x for x in raw]
    key = category_key or CATEGORY_KEY
    if not any(isinstance(x.get(key), str) and x[key].strip() for x in objects):
        return raw, None
    return raw, [_category(x.get(key) if isinstance(x, dict) else None) for x in raw]


def _category(value) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else NO_CATEGORY


def _column(header: list[str], name: str) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return lowered.index(name.lower()) if name.lower() in lowered else None


# words that make a first row a header rather than a first prompt (a header-less file's first line is a prompt)
# (the whole cell one such word, or it and one more: "Prompt Text"; a prompt is longer)
_HEADER_WORD = re.compile(
    r"^\s*(prompt|prompts|category|categories|question|instruction|behavior|text)([ _-]\w+)?\s*$", re.I
)


def _from_csv(text: str, kind: str, columns) -> tuple[list[str], list[str] | None, str | None]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return [], None, None
    header = rows[0]
    names = [h.strip().lower() for h in header if h.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # which of the two a reader takes is arbitrary: refused
        raise _MissingColumn(f"the header names {twice[0]!r} twice; which column is meant is ambiguous")
    lowered = {h.strip().lower() for h in header}
    layout = next((lay for lay in LAYOUTS if all(c.lower() in lowered for c in lay.header)), None)
    prompt_name, category_name = columns if columns is not None else (None, None)
    for wanted in (prompt_name, category_name):
        if wanted is not None and _column(header, wanted) is None:
            raise _MissingColumn(f"no column {wanted!r}; the header is " + ", ".join(repr(h) for h in header[:20]))
    if prompt_name is not None:
        prompt = _column(header, prompt_name)
    elif layout is not None:
        prompt = _column(header, layout.prompt)
    else:
        prompt = next((_column(header, k) for k in PROMPT_KEYS if _column(header, k) is not None), None)
    if prompt is None:  # header-less, like AdvBench's harmful_behaviors.csv as SafetyLock ships it
        if category_name is not None:
            raise _MissingColumn("a header-less CSV has no category column")
        if any(_HEADER_WORD.search(h) for h in header):  # a header weightlock does not know, not a first prompt
            raise _MissingColumn(
                "the first row looks like a header (" + ", ".join(repr(h) for h in header[:20]) + ") of a layout "
                "weightlock does not know, so which column holds the prompts is not known"
            )
        return [row[0] for row in rows if row and row[0].strip()], None, None
    if category_name is not None:
        category = _column(header, category_name)
    elif layout is not None and prompt_name is None:
        category = None if layout.category is None else _column(header, layout.category)
    else:
        category = _column(header, CATEGORY_KEY)
    context = _column(header, layout.context) if layout is not None and layout.context else None
    label = _column(header, layout.label) if layout is not None and layout.label else _column(header, "label")
    keep = CSV_LABEL_KEPT.get(kind)

    def cell(row, i):
        return row[i] if i is not None and len(row) > i else ""

    chosen = [
        row
        for row in rows[1:]
        if len(row) > prompt
        and row[prompt].strip()
        and (label is None or keep is None or cell(row, label).strip().lower() == keep)
    ]
    items = [
        f"{cell(row, context)}{CONTEXT_SEPARATOR}{row[prompt]}" if cell(row, context).strip() else row[prompt]
        for row in chosen
    ]
    categories = None if category is None else [_category(cell(row, category)) for row in chosen]
    shown = layout.name if layout is not None and columns is None else None
    return items, categories, shown


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
