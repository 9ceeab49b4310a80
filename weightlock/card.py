"""The model card (README.md) a locked checkpoint carries, made with huggingface_hub's ModelCard.

A locked checkpoint is published or handed on; its card must say what was done to it. The source's card
is kept (body and metadata) and added to: ``base_model`` (the source, when its Hub id is known), the tags
``weightlock`` and ``safety-lock``, and one section between markers that says which lock, at what alpha,
made how, when, by which weightlock, and how to verify and undo it. Behaviour is described only from an
eval report that was given (``--eval-report``); otherwise the card says that it was not measured.
A second edit replaces the section rather than stacking another.
"""

from __future__ import annotations

import re

from .errors import CheckpointError

CARD_NAME = "README.md"
TAGS = ("weightlock", "safety-lock")
BEGIN, END = "<!-- weightlock:begin -->", "<!-- weightlock:end -->"
_SECTION = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
MAX_CARD_BYTES = 16 << 20


def _model_card(text: str | None):
    from huggingface_hub import ModelCard, ModelCardData

    if text is None:
        return ModelCard("---\n\n---\n"), ModelCardData()
    if not text.lstrip().startswith("---"):  # no metadata block: say so, rather than have the library warn
        text = "---\n\n---\n" + text
    card = ModelCard(text, ignore_metadata_errors=True)
    return card, card.data


def locked_card(source_text: str | None, provenance: dict, lock, eval_report: dict | None = None) -> str:
    """The output's card: the source's (or a new one) with the metadata and the section for this edit."""
    from huggingface_hub import ModelCard

    card, data = _model_card(source_text)
    name = provenance["source"]["name"]
    if name:  # the Hub lineage points at the direct parent: the checkpoint this one was made from
        data.base_model = name
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS]))
    body = _SECTION.sub("", card.text).rstrip("\n")
    if not body.strip():
        body = f"# {name or 'Model'} (safety-locked)"
    section = _section(provenance, lock, eval_report)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}\n\n{section}\n"))


def _text(value) -> str:
    """A value from a lock, record or report, made inert in Markdown: one line, no HTML (so no marker can be
    forged), no table-breaking bar, at most 200 characters."""
    text = re.sub(r"[\x00-\x1f\x7f<>]", " ", str(value)).replace("|", "/")
    return text if len(text) <= 200 else text[:200] + "..."


def _section(provenance: dict, lock, eval_report: dict | None) -> str:
    src = lock.source_model
    source = provenance["source"]
    where = _text(source["name"]) if source["name"] else "a local checkpoint"
    if source["revision"]:
        where += f" (revision {_text(source['revision'])})"
    heads = lock.num_heads_selected
    layers = sorted(lock.heads_by_layer())
    lines = [
        BEGIN,
        "## Safety lock (weightlock)",
        "",
        f"This checkpoint is {where} with a [SafetyLock](https://arxiv.org/abs/2410.10343) baked into its "
        "attention output biases by weightlock: `alpha * std * direction` added to the o_proj input of "
        f"{heads} attention heads in {len(layers)} layers, written as o_proj biases that stock transformers loads.",
        "",
        "| | |",
        "| --- | --- |",
        f"| lock sha256 | `{provenance['lock']['sha256']}` |",
        f"| lock made from | {_text(src.name or src.architecture)} ({_text(lock.creation.get('method', '?'))}) |",
        f"| heads | {heads} in layers {', '.join(map(str, layers))} |",
        f"| alpha | {provenance['alpha']:g} |",
        f"| edited | {_text(provenance['created_at'])} by {_text(provenance['tool'])} |",
        "",
        "Verify it (the biases are recomputed from the stored weights and the lock in `weightlock/`): "
        "`weightlock verify <this folder>`. "
        + (
            "Undo it: `weightlock revert <this folder>` (the edit was made in place; the original files are "
            "in `weightlock/backup/`)."
            if provenance.get("mode") == "in-place"
            else f"Undo it: `weightlock apply <this folder> --lock weightlock/lock.wlock --alpha "
            f"{-provenance['alpha']:g} --out <new folder>`, or use the source checkpoint."
        ),
        "",
    ]
    if eval_report is None:
        lines.append("Behaviour was not measured when this checkpoint was written.")
    else:
        lines += _eval_lines(eval_report)
    lines.append(END)
    return "\n".join(lines)


def _eval_lines(report: dict) -> list[str]:
    def pct(value):
        return "-" if value is None else f"{value:.0%}"

    sets = ", ".join(
        f"{_text(kind)}: {_text(info['source'])} ({info['count']})" for kind, info in report["sets"].items()
    )
    lines = [
        f"Measured by `weightlock eval` ({_text(report['weightlock_version'])}) on {_text(report['model'])}"
        + (f" with the lock {_text(report['lock'])} at run time" if report["lock"] else "")
        + f"; judge: {_text(report['judge'])}; prompt sets: {sets}.",
        "",
        "| alpha | harmful compliance | over-refusal | degenerate | QA accuracy | KL (nats/token) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        alpha = "none" if r["alpha"] is None else format(r["alpha"], "g")
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(
            f"| {alpha} | {pct(r['harmful_compliance'])} | {pct(r['over_refusal'])} | {pct(r['degenerate'])} "
            f"| {pct(r['qa_accuracy'])} | {kl} |"
        )
    return lines


def read_eval_report(path) -> dict:
    """An eval report (``weightlock eval --report`` or ``--json``), checked against schemas/eval.schema.json."""
    from .untrusted import read_json

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
    _, data = _model_card(text)
    return list(data.tags or [])


def source_card_text(root) -> str | None:
    """The source folder's README.md as text, or None when it has none."""
    import os

    from .checkpoint import contained
    from .untrusted import read_bytes

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
