"""``apply``: lock + checkpoint -> a new checkpoint with the lock baked into o_proj biases.

Order of work: refuse bad input (from headers and config alone), compute the biases
(reading only the o_proj weights the lock touches), write everything into a staging
folder beside the output, verify the staging folder, then rename it into place.
Any failure removes the staging folder; the source is only ever read.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightlock import __version__
from weightlock.core.edit import ProgressBar
from weightlock.core.lock import Lock
from weightlock.core.records import check_record_depth
from weightlock.core.report import Report, output_failure, source_note
from weightlock.errors import OutputError, WeightlockError
from weightlock.formats.safetensors.card import locked_card, read_eval_report, source_card_text
from weightlock.formats.safetensors.folder import Checkpoint, contained
from weightlock.formats.safetensors.plan import EditPlan, compute_biases, plan_edit
from weightlock.formats.safetensors.write import WrittenFiles, write_locked_checkpoint
from weightlock.io.commit import committing, set_interrupt_advice
from weightlock.io.outputs import check_replaceable
from weightlock.io.staging import publish, recover_interrupted, removed_on_failure, staging_path, write_failure
from weightlock.io.untrusted import read_json

PROVENANCE_FORMAT = "weightlock-provenance"


@dataclass
class ApplyResult:
    out: Path
    plan: EditPlan
    written: WrittenFiles
    provenance: dict
    seconds: float
    report: object = None  # the verify Report the output passed before it was published

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "alpha": self.plan.alpha,
            "architecture": self.plan.shape.architecture,
            "lock_sha256": self.plan.lock.sha256,
            "locked_layers": sorted(self.plan.displacements),
            "tensors_added": len(self.plan.biases) - len(self.plan.replaced) + len(self.plan.extra_tensors),
            "tensors_replaced": len(self.plan.replaced),
            "config_changes": self.plan.config_changes,
            "redeclared": self.plan.spec is not self.plan.target,
            "tensors_split": len(self.plan.splits),  # fused weights stored as their parts
            "tensors_stacked": len(self.plan.merges),  # tensors gathered from stored pieces
            "gate": self.plan.gate_record,  # a gated lock: the MLPs' growth (None: a constant lock)
            "added_shard": self.written.added_shard,
            "shards_linked": self.written.linked,
            "files_copied": self.written.copied,
            "shards_rewritten": self.written.rewritten,
            "left_out": self.written.left_out,
            "bytes_read_weights": self.plan.weight_bytes_to_read,
            "bytes_written": self.written.bytes_written,
            "warnings": self.plan.warnings,
            "seconds": round(self.seconds, 3),
        }


def _check_output_location(source: Path, out: Path) -> None:
    source, resolved = source.resolve(), out.resolve()
    if resolved == source:
        raise OutputError(
            "the output folder is the source folder", hint="choose a new --out; weightlock never modifies its input"
        )
    if source in resolved.parents:
        raise OutputError(
            f"the output folder {out} is inside the source {source}",
            hint="choose an --out outside the checkpoint folder",
        )
    if resolved in source.parents:
        raise OutputError(
            f"the output folder {out} contains the source {source}",
            hint="choose an --out that does not contain the checkpoint",
        )


def provenance_record(checkpoint: Checkpoint, plan: EditPlan, lock_bytes: bytes) -> dict:
    """The edit's record; refused (exit 3) if, nesting its parents, it would be deeper than weightlock reads."""
    record = {
        "format": PROVENANCE_FORMAT,
        "format_version": 1,
        "tool": f"weightlock {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(checkpoint.root),
            "name": checkpoint.name,
            "revision": checkpoint.revision,
            "layout": checkpoint.layout,
            # Header hashes identify each source shard without reading its data.
            "shards": {
                shard: {"size": h.file_size, "header_sha256": h.header_sha256()}
                for shard, h in checkpoint.headers.items()
            },
        },
        "lock": {"sha256": hashlib.sha256(lock_bytes).hexdigest(), "manifest": plan.lock.manifest()},
        "alpha": plan.alpha,
        "architecture_family": plan.spec.family,
        "output_family": plan.target.family,
        "locked_layers": {str(layer): heads for layer, heads in plan.lock.heads_by_layer().items()},
        "config_changes": plan.config_changes,
        # carried files rewritten for the output, with their original content for undo
        "edited_files": {
            path: read_json(contained(checkpoint.root, path), "tokenizer config") for path in plan.file_edits
        },
        "tensors": {
            "added": [b.name for b in plan.biases if b.base is None],
            "replaced": plan.replaced,
            "locked": [b.name for b in plan.biases if b.weight is not None],
            **({"split": plan.split_record} if plan.splits else {}),
            **({"merged": plan.merge_record} if plan.merges else {}),
        },
        "original_config": checkpoint.config,
        "original_index": checkpoint.index,
        "parent": checkpoint.provenance,
    }
    check_record_depth(record, str(checkpoint.root))
    return record


def apply_folder(
    checkpoint: Checkpoint,
    lock: Lock,
    lock_bytes: bytes,
    *,
    out: str | os.PathLike,
    alpha: float | None,
    force: bool,
    link_mode: str,
    allow_architecture_mismatch: bool,
    progress: bool,
    loader_check: bool,
    eval_report: str | os.PathLike | None,
    verify: Callable[..., Report],
) -> ApplyResult:
    """Bake ``lock`` (and the exact bytes of its file) into a copy of the folder ``checkpoint`` at ``out``: the
    order of work of :func:`weightlock.api.apply_lock` for this format. ``verify`` is
    :func:`weightlock.api.verify_checkpoint` (passed in: formats do not import the engines it runs); the output
    is published only if it passes, with the byte comparison against the values just computed."""
    started = time.perf_counter()
    # true until the output is published (the staging folder is removed on the way out, publish's renames are
    # never split, and a --force run's previous output is moved back by the next run if ever left aside)
    set_interrupt_advice("no output was published (a rerun tidies what the interrupted run left)")
    out = Path(out)
    _check_output_location(checkpoint.root, out)
    check_replaceable(out, force=force, kind="folder")
    if lock.gate is not None:  # the push in neurons the gate opens (gated.py), not in the o_proj biases
        from weightlock.formats.safetensors.gated import plan_gated_edit

        plan = plan_gated_edit(
            checkpoint,
            lock,
            lock.default_alpha if alpha is None else alpha,
            allow_architecture_mismatch=allow_architecture_mismatch,
        )
    else:
        plan = plan_edit(
            checkpoint,
            lock,
            lock.default_alpha if alpha is None else alpha,
            allow_architecture_mismatch=allow_architecture_mismatch,
        )
    provenance = provenance_record(checkpoint, plan, lock_bytes)  # before the work: it refuses too deep a chain
    # the card's inputs too, before the work: a bad eval report or source card file is refused (exit 3) first
    source_text = source_card_text(checkpoint.root)
    quoted = None if eval_report is None else read_eval_report(eval_report)
    bar = ProgressBar(plan) if progress else None
    # The card is made with huggingface_hub's ModelCard, whose import is CPU work about as long as reading a few
    # hundred MiB of weights: it is made on a thread while compute_biases reads and multiplies (preadv and numpy
    # release the GIL, and compute_biases imports nothing, so neither thread waits on the other's import locks).
    # Nothing is written before both are done, and a refusal of the card (exit 3) wins over one of the computation,
    # as when the card was made first; a refused card stops the reading at the next layer, so a bad card is
    # reported about as early as before.
    card = _CardInBackground(source_text, provenance, lock, quoted)
    try:
        computed = compute_biases(plan, progress=_stop_on_card_refusal(card, bar))
    except _CardRefused:
        computed = []
    except WeightlockError:
        card.result()  # the card's refusal first
        raise
    card_text = card.result()
    if plan.gate_record is not None:
        from weightlock.formats.safetensors.gated import compute_gate

        compute_gate(plan, checkpoint)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(e, out.parent) from None
    plan.warnings.extend(recover_interrupted(out))
    staging = staging_path(out)
    with removed_on_failure(staging, out):
        written = write_locked_checkpoint(
            checkpoint, plan, computed, lock_bytes, staging, link_mode, provenance, card_text
        )
        # the source it read: the originals it recorded are compared with the source's biases (a relock's
        # first edit's originals are the source's own record's, which its verify checked)
        first_edit = checkpoint if checkpoint.provenance is None else None
        report = verify(staging, expected=computed, loader_check=loader_check, source=first_edit)
        if not report.ok:
            raise output_failure(report, checkpoint.root, loader_check, "the output was discarded", verify)
        plan.warnings.extend(source_note(report))
        with committing(f"{out} was published and verified"):
            publish(staging, out, force)
    return ApplyResult(out, plan, written, provenance, time.perf_counter() - started, report)


class _CardRefused(Exception):
    """Stops compute_biases once the card made in the background was refused (the card's error is raised)."""


class _CardInBackground:
    """``locked_card(...)`` run on a daemon thread; :meth:`result` waits and returns the text or raises its error."""

    def __init__(self, *args):
        self._text: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=args, name="weightlock-card", daemon=True)
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            self._text = locked_card(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread by result()
            self._error = e

    @property
    def refused(self) -> bool:
        return not self._thread.is_alive() and self._error is not None

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._text is not None
        return self._text


def _stop_on_card_refusal(card: _CardInBackground, bar):
    """compute_biases' per-layer progress callback: the bar (if any), and a stop once the card is refused."""

    def progress(nbytes: int) -> None:
        if bar is not None:
            bar(nbytes)
        if card.refused:
            raise _CardRefused

    return progress
