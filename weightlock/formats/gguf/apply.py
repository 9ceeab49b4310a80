"""``apply`` for a GGUF file: the order of work of :func:`weightlock.api.apply_lock` for this format (plan,
compute, write a staging copy, verify it with the GGUF's own checks, publish every file of a split set or none)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from weightlock.core.lock import Lock
from weightlock.core.records import check_record_depth
from weightlock.errors import OutputError
from weightlock.formats.gguf.edit import (
    GGUFEditPlan,
    compute_gguf_biases,
    edit_record,
    output_paths,
    plan_gguf_edit,
    provisional_record,
    write_locked_gguf,
)
from weightlock.formats.gguf.file import GGUFModel, open_gguf
from weightlock.formats.gguf.publish import publish_set, recover_publish
from weightlock.formats.gguf.record import RECORD_KEY
from weightlock.formats.gguf.verify import output_failure_gguf, verify_gguf
from weightlock.io.commit import committing
from weightlock.io.staging import recover_interrupted, removed_on_failure, staging_path


@dataclass
class GGUFApplyResult:
    out: Path
    outputs: list[Path]
    plan: GGUFEditPlan
    bytes_written: int
    seconds: float
    report: object = None

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "files": [str(p) for p in self.outputs],
            "format": "gguf",
            "alpha": self.plan.alpha,
            "architecture": self.plan.architecture.name,
            "lock_sha256": self.plan.lock.sha256,
            "locked_layers": sorted(self.plan.displacements),
            "tensors_added": len(self.plan.added),
            "tensors_replaced": len(self.plan.replaced),
            "bytes_read_weights": self.plan.weight_bytes_to_read,
            "bytes_written": self.bytes_written,
            # a qwen2 file is written as llama (formats/gguf/rewrite.py): its Q/K tensors are read and permuted
            "rewritten_from": self.plan.rewrite.rule.source if self.plan.rewrite else None,
            "tensors_permuted": len(self.plan.rewrite.permuted) if self.plan.rewrite else 0,
            "bytes_permuted": sum(p.tensor.nbytes for p in self.plan.rewrite.permuted) if self.plan.rewrite else 0,
            "warnings": self.plan.warnings,
            "seconds": round(self.seconds, 3),
        }


def _check_output(source: GGUFModel, outputs: list[Path], force: bool) -> None:
    sources = {f.path.resolve() for f in source.files}
    for path in outputs:
        if path.resolve() in sources:
            raise OutputError(
                f"the output {path} is a file of the source",
                hint="choose a new --out; weightlock never modifies its input",
            )
        if path.is_dir():
            raise OutputError(f"the output {path} is a folder", hint="pass a file name ending in .gguf as --out")
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputError(f"{path} already exists", hint="choose another --out, or pass --force to replace it")
    if not outputs[0].name.lower().endswith(".gguf"):
        raise OutputError(f"the output {outputs[0]} does not end in .gguf", hint="name the output NAME.gguf")


def apply_lock_gguf(
    model: str | os.PathLike | GGUFModel,
    lock: Lock,
    lock_bytes: bytes,
    *,
    out: str | os.PathLike,
    alpha: float | None = None,
    force: bool = False,
    allow_architecture_mismatch: bool = False,
    progress=None,
) -> GGUFApplyResult:
    """Bake ``lock`` into a copy of a GGUF model at ``out``; published only after verify passes."""
    from weightlock.core.report import source_note

    started = time.perf_counter()
    if not isinstance(model, GGUFModel):
        model = open_gguf(model)
    out = Path(out)
    outputs = output_paths(model, out)
    recovered = recover_publish(outputs)  # a killed run's half-published set, finished or undone first
    _check_output(model, outputs, force)
    plan = plan_gguf_edit(
        model,
        lock,
        lock.default_alpha if alpha is None else alpha,
        allow_architecture_mismatch=allow_architecture_mismatch,
    )
    check_record_depth(provisional_record(plan, lock_bytes), model.path.name)
    computed = compute_gguf_biases(plan, progress(plan) if progress is not None else None)
    record = edit_record(plan, computed, lock_bytes)
    try:
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from weightlock.io.staging import write_failure

        raise write_failure(e, outputs[0].parent) from None
    plan.warnings.extend(recovered)
    for path in outputs:
        plan.warnings.extend(recover_interrupted(path))
    staging = staging_path(outputs[0])
    with removed_on_failure(staging, outputs[0]):
        staging.mkdir()
        written = write_locked_gguf(plan, computed, lock_bytes, record, staging, [p.name for p in outputs])
        first_edit = model if model.metadata.get(RECORD_KEY) is None else None  # the source it read
        report = verify_gguf(staging / outputs[0].name, expected=computed, source=first_edit)
        if not report.ok:
            raise output_failure_gguf(report, model, "the output was discarded")
        plan.warnings.extend(source_note(report))
    # all files or none (formats/gguf/publish.py): journaled, the first file renamed last; a kill is finished
    # or undone by the next run's recover_publish
    with committing(f"{', '.join(map(str, outputs))} published and verified"):  # the commit point
        publish_set(staging, outputs, force)
    return GGUFApplyResult(out, outputs, plan, written, time.perf_counter() - started, report)
