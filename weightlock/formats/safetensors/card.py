"""The model card (README.md) a locked checkpoint carries, made with huggingface_hub's ModelCard.

A locked checkpoint is published or handed on; its card must say what was done to it. The source's card
is kept (body and metadata) and added to: ``base_model`` (the source, when its Hub id is known), the tags
``weightlock`` and ``safety-lock``, and one section between markers that says which lock, at what alpha,
made how, when, by which weightlock, and how to verify and undo it. Behaviour is described only from an
eval report that was given (``--eval-report``); otherwise the card says that it was not measured.
A second edit replaces the section rather than stacking another.
"""

from __future__ import annotations

import math
import re

from weightlock.errors import CheckpointError
from weightlock.io.text import HIDDEN

CARD_NAME = "README.md"
TAGS = ("weightlock", "safety-lock")
BEGIN, END = "<!-- weightlock:begin -->", "<!-- weightlock:end -->"
_SECTION = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
MAX_CARD_BYTES = 16 << 20
MAX_QUOTED_CHARS = 200  # of one value from an input
MAX_QUOTED_SETS, MAX_QUOTED_ROWS = 16, 64  # of an eval report: the section stays a few KB whatever its size
MAX_YAML_DEPTH = 32
# front matter keys huggingface_hub's ModelCardData reads as text or lists of text (the Hub's own rules)
_TEXT_KEYS = ("library_name", "license", "license_name", "license_link", "model_name", "pipeline_tag")
_TEXT_LIST_KEYS = ("base_model", "datasets", "language", "metrics", "tags")
_CARD_HINT = (
    "fix README.md's YAML front matter (a mapping of keys to values, between two '---' lines, as the Hub "
    "expects), or move README.md out of the folder"
)


def _front_matter(text: str) -> tuple[dict, str]:
    """The source card's YAML front matter (checked) and its body, split where huggingface_hub splits them.

    The one place a card's YAML is parsed: ``yaml.safe_load`` only (a ``!!python/object`` tag is an error),
    and anything the library would raise on or silently misread (a list, a tag of numbers, a cycle) is
    refused as the input's fault, rather than the card losing the source's license or metadata unsaid."""
    import yaml  # type: ignore[import-untyped]  # PyYAML, a huggingface_hub dependency, ships no stubs
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    # a byte order mark before the front matter is read past, as huggingface_hub reads past it: else the YAML
    # would become text and the card would lose the source's license unsaid
    text = text.removeprefix("\ufeff")
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return {}, text
    try:
        data = yaml.safe_load(match.group(2))
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"the source's {CARD_NAME} has front matter that is not YAML ({problem})", hint=_CARD_HINT
        ) from None
    if data is None:
        return {}, text[match.end() :]
    if not isinstance(data, dict):
        raise CheckpointError(
            f"the source's {CARD_NAME} front matter is a YAML {type(data).__name__}, not a mapping of keys to values",
            hint=_CARD_HINT,
        )
    _check_yaml_tree(data)
    for key, value in data.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"the source's {CARD_NAME} front matter has a key {key!r} that is not text", hint=_CARD_HINT
            )
        if value is None:
            continue
        if key in _TEXT_KEYS and not isinstance(value, str):
            raise CheckpointError(
                f"the source's {CARD_NAME} front matter has {key}: {str(value)[:60]!r}, not text", hint=_CARD_HINT
            )
        if key in _TEXT_LIST_KEYS and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise CheckpointError(
                f"the source's {CARD_NAME} front matter has {key}: {str(value)[:60]!r}, not text or a list of text",
                hint=_CARD_HINT,
            )
    if isinstance(data.get("tags"), str):  # "tags: foo" is one tag, not the letters f, o, o
        data["tags"] = [data["tags"]]
    return data, text[match.end() :]


def _check_yaml_tree(data) -> None:
    """Refuse a YAML document that refers to itself (an alias inside its own anchor) or nests too deeply;
    shared (aliased) nodes are visited once, so a "billion laughs" document is walked in linear time."""
    seen: set[int] = set()

    def walk(node, path: tuple[int, ...]) -> None:
        if not isinstance(node, (dict, list)):
            return
        if id(node) in path:
            raise CheckpointError(
                f"the source's {CARD_NAME} front matter contains itself (a YAML alias cycle)", hint=_CARD_HINT
            )
        if len(path) >= MAX_YAML_DEPTH:
            raise CheckpointError(
                f"the source's {CARD_NAME} front matter nests more than {MAX_YAML_DEPTH} levels deep", hint=_CARD_HINT
            )
        if id(node) in seen:
            return
        seen.add(id(node))
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        for child in children:
            walk(child, (*path, id(node)))

    walk(data, ())


def _model_card(text: str | None):
    """The card data and body of ``text`` (None: no card), its front matter read by :func:`_front_matter`."""
    from huggingface_hub import ModelCardData

    metadata, body = _front_matter(text) if text is not None else ({}, "")
    return body, ModelCardData(**metadata, ignore_metadata_errors=True)


def locked_card(source_text: str | None, provenance: dict, lock, eval_report: dict | None = None) -> str:
    """The output's card: the source's (or a new one) with the metadata and the section for this edit.

    Refused (exit 3) when the source card cannot be kept as it is: front matter that is not a YAML mapping,
    weightlock's section markers in its metadata, or a card too large to take the section under
    MAX_CARD_BYTES (what verify reads)."""
    from huggingface_hub import ModelCard

    source_body, data = _model_card(source_text)
    name = provenance["source"]["name"]
    if name:  # the Hub lineage points at the direct parent: the checkpoint this one was made from
        data.base_model = name
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS]))
    # a previous edit's section is replaced; a marker outside a whole section (a forged or broken one) is
    # dropped, so the one section this card has is the one written here (until none is left: removing one can
    # join the text around it into another)
    body = source_body
    while (cleaned := _SECTION.sub("", body).replace(BEGIN, "").replace(END, "")) != body:
        body = cleaned
    body = body.rstrip("\n")
    section = _section(provenance, lock, eval_report)
    if not body.strip():
        content = f"# {md(name) if name else 'Model'} (safety-locked)\n\n{section}\n"
    else:
        # The section comes before any of the source's text: Markdown is read top down, so nothing the source
        # body holds (an unclosed code fence, an open HTML block) can swallow it; the body follows as it was.
        content = f"{section}\n\n{body}\n"
    text = str(ModelCard(f"---\n{data.to_yaml()}\n---\n{content}"))
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise CheckpointError(
            f"the source's {CARD_NAME} front matter holds weightlock's section markers ({BEGIN} or {END})",
            hint="remove them from the front matter of README.md; they mark the section weightlock writes",
        )
    size = len(text.encode("utf-8"))
    if size > MAX_CARD_BYTES:
        raise CheckpointError(
            f"the source's {CARD_NAME} is too large: with weightlock's section the card would be {size:,} bytes, "
            f"more than the {MAX_CARD_BYTES:,} a model card may be (verify reads no more)",
            hint="shorten README.md, or move it out of the folder",
        )
    return text


# Markdown and HTML syntax, escaped with a backslash (CommonMark escapes any ASCII punctuation); $ is math on
# the Hub. Characters that are invisible, break a line or reorder text are replaced by a space.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()!<>#|&~$])")
_INVISIBLE = HIDDEN  # weightlock/io/text.py: the same characters the CLI escapes
# a zero-width space after "." before a letter or digit, ":" before "/", and "@": no autolinker (GFM's www. /
# https:// / e-mail, linkify's bare domains) sees a link, and the text reads the same
_LINK_PUNCTUATION = re.compile(r"(?<=\.)(?=\w)|(?<=:)(?=/)|(?<=@)(?=\S)")


def md(value) -> str:
    """A string from an input (a name, a path, a report's text) made inert Markdown: shown as the same text,
    on one line, never a link, image, emphasis, code, HTML, table cell break or marker; at most
    MAX_QUOTED_CHARS characters. Every input-derived string the card quotes goes through here."""
    text = " ".join(_INVISIBLE.sub(" ", str(value)).split())
    if len(text) > MAX_QUOTED_CHARS:
        text = text[:MAX_QUOTED_CHARS] + " (cut)"
    return _LINK_PUNCTUATION.sub("\u200b", _MARKDOWN_SYNTAX.sub(r"\\\1", text))


def number(value, spec: str = "g", none: str = "-") -> str:
    """A number from an input, formatted by ``spec``; ``none`` for None, "n/a" for what is not a finite number
    (NaN, inf: a report holding them is refused when read, so this is for values handed in by code)."""
    if value is None:
        return none
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "n/a"
        text = format(value, spec)
        if len(text) > 16:
            text = format(float(value), ".6g")
        return "n/a" if "inf" in text or "nan" in text else text  # 1e308 as a percentage is inf
    except (OverflowError, ValueError):
        return "n/a"


def _section(provenance: dict, lock, eval_report: dict | None) -> str:
    from weightlock.core.records import chain_length, net_alphas

    src = lock.source_model
    source = provenance["source"]
    where = md(source["name"]) if source["name"] else "a local checkpoint"
    if source["revision"]:
        where += f" (revision {md(source['revision'])})"
    heads = lock.num_heads_selected
    layers = sorted(lock.heads_by_layer())
    # a relock adds to the edits before it: what is in effect is the lock's net alpha over the record chain
    edits, net = chain_length(provenance), net_alphas(provenance).get(provenance["lock"]["sha256"], provenance["alpha"])
    alpha = number(net) + (f" (net of {edits} edits; the newest at {number(provenance['alpha'])})" if edits > 1 else "")
    undo = (
        "Undo it: `weightlock revert <this folder>` (the edit was made in place; the original files are "
        "in `weightlock/backup/`)."
        if provenance.get("mode") == "in-place"
        else "The edits net to alpha 0: the lock is off, this checkpoint is not locked."
        if net == 0
        else "Undo it: use the source checkpoint (a gated lock grows every MLP; weightlock does not edit it again)."
        if lock.gate is not None
        else f"Undo it: `weightlock apply <this folder> --lock weightlock/lock.wlock --alpha "
        f"{number(-net)} --out <new folder>` (back to alpha 0 of this lock), or use the source checkpoint."
    )
    how = (
        "attention output biases by weightlock: `alpha * std * direction` added to the o_proj input of "
        f"{heads} attention heads in {len(layers)} layers, written as o_proj biases that stock transformers loads."
        if lock.gate is None
        else "MLPs by weightlock as a gated lock (experimental): in each of "
        f"{len(layers)} layers, two added SwiGLU neurons add the push of {heads} attention heads' "
        "`alpha * std * direction` (through the layer's o_proj weight) scaled by a gate that a harmfulness probe "
        "on the MLP input opens; every MLP has `mlp_bias` on and a larger `intermediate_size`, which stock "
        "transformers, vLLM and mlx-lm load (SGLang drops MLP biases: do not serve it there)."
    )
    lines = [
        BEGIN,
        "## Safety lock (weightlock)",
        "",
        f"This checkpoint is {where} with a [SafetyLock](https://arxiv.org/abs/2410.10343) baked into its " + how,
        "",
        "| | |",
        "| --- | --- |",
        f"| lock sha256 | `{provenance['lock']['sha256']}` |",
        f"| lock made from | {md(src.name or src.architecture)} ({md(lock.creation.get('method', '?'))}) |",
        f"| heads | {heads} in layers {', '.join(map(str, layers))} |",
        f"| alpha | {alpha} |",
        f"| edited | {md(provenance['created_at'])} by {md(provenance['tool'])} |",
        "",
        "Verify it (the biases are recomputed from the stored weights and the lock in `weightlock/`): "
        "`weightlock verify <this folder>`. " + undo,
        "",
    ]
    if eval_report is None:
        lines.append("Behaviour was not measured when this checkpoint was written.")
    else:
        lines += _eval_lines(eval_report)
    lines.append(END)
    return "\n".join(lines)


def _eval_lines(report: dict) -> list[str]:
    """The report's measurements, every string through :func:`md` and every number through :func:`number`;
    at most MAX_QUOTED_SETS sets and MAX_QUOTED_ROWS rows, so the section's size does not follow the report's."""

    def pct(value):
        return number(value, ".0%")

    sets = [f"{md(kind)}: {md(info['source'])} ({number(info['count'], 'd')})" for kind, info in report["sets"].items()]
    if len(sets) > MAX_QUOTED_SETS:
        sets[MAX_QUOTED_SETS:] = [f"and {len(sets) - MAX_QUOTED_SETS} more"]
    results = report["results"]
    lines = [
        f"Measured by `weightlock eval` ({md(report['weightlock_version'])}) on {md(report['model'])}"
        + (f" with the lock {md(report['lock'])} at run time" if report["lock"] else "")
        + f"; judge: {md(report['judge'])}; prompt sets: {', '.join(sets)}.",
        "",
        "| alpha | harmful compliance | over-refusal | degenerate | QA accuracy | KL (nats/token) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results[:MAX_QUOTED_ROWS]:
        lines.append(
            f"| {number(r['alpha'], none='none')} | {pct(r['harmful_compliance'])} | {pct(r['over_refusal'])} "
            f"| {pct(r['degenerate'])} | {pct(r['qa_accuracy'])} | {number(r['kl'], '.4f')} |"
        )
    if len(results) > MAX_QUOTED_ROWS:
        lines += ["", f"The report has {len(results) - MAX_QUOTED_ROWS} more rows, not shown here."]
    return lines


def read_eval_report(path) -> dict:
    """An eval report (``weightlock eval --report`` or ``--json``), checked against schemas/eval.schema.json."""
    from weightlock.io.untrusted import read_json

    return read_json(
        path,
        "eval report",
        "eval",
        error=CheckpointError,
        hint="pass a report written by `weightlock eval --report` or `--json`",
    )


def card_lock_sha256(text: str) -> str | None:
    """The lock hash the card's weightlock section names, if any."""
    section = _SECTION.search(text)
    found = re.search(r"lock sha256 \| `([0-9a-f]{64})`", section.group(0)) if section else None
    return found.group(1) if found else None


def card_tags(text: str) -> list[str]:
    """The card's tags; none when its front matter is not what a card's may be (verify then says so)."""
    try:
        _, data = _model_card(text)
    except CheckpointError:
        return []
    return list(data.tags or [])


def source_card_text(root) -> str | None:
    """The source folder's README.md as text, or None when it has none."""
    import os

    from weightlock.formats.safetensors.folder import contained
    from weightlock.io.untrusted import read_bytes

    if not os.path.lexists(root / CARD_NAME):
        return None
    data = read_bytes(contained(root, CARD_NAME), "model card", MAX_CARD_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{root / CARD_NAME} is not UTF-8 text",
            hint="convert the model card to UTF-8, or move it out of the folder",
        ) from None
