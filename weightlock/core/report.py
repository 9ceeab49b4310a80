"""The verify report, the same for every format: checks with a status (pass, fail, warn, skip, not-run), the
checks the user asked for (which must run), the ``locked`` summary, and the errors an apply or in-place edit
raises when its output fails verification.

Each check yields pass, fail, warn or skip; a report is ok when nothing failed and every requested check ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from weightlock import __version__
from weightlock.errors import CheckpointError, InvalidInputError, VerificationError, WeightlockError
from weightlock.io.schema import schema_errors

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


# A check the user asked for (--engine, --deep) that did not run: it fails the report, since what was asked
# for was not shown. SKIP is only for checks nobody asked for (no record to check, transformers not installed).
NOT_RUN = "not-run"


# Rounding unit of each stored dtype: the recomputed bias may differ by float32
# summation order (BLAS blocking), which after rounding is at most about one unit.
DTYPE_EPS = {"F32": 2.0**-20, "F16": 2.0**-10, "BF16": 2.0**-7}


@dataclass
class Check:
    name: str
    status: str
    message: str
    details: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The checks' outcomes. ``ok``: nothing failed, and every check that was asked for (:meth:`require`) ran
    and passed or warned; a requested check that is absent or skipped fails the report, whichever code path
    left it out (:meth:`finish` turns it into a visible NOT_RUN line)."""

    path: str
    checks: list[Check] = field(default_factory=list)
    locked: dict | None = None
    required: dict[str, str] = field(default_factory=dict)  # check name -> the option that asked for it

    @property
    def ok(self) -> bool:
        return all(c.status not in (FAIL, NOT_RUN) for c in self.checks) and not self.unmet()

    def require(self, name: str, requested_by: str) -> None:
        self.required[name] = requested_by

    def unmet(self) -> list[str]:
        """Requested checks without a pass or a warning."""
        ran = {c.name for c in self.checks if c.status in (PASS, WARN)}
        return [name for name in self.required if name not in ran]

    def finish(self) -> Report:
        """Mark each requested check that did not run NOT_RUN (a skipped one keeps its reason); idempotent."""
        for name in self.unmet():
            asked = f"requested by {self.required[name]} but did not run"
            found = [c for c in self.checks if c.name == name and c.status in (SKIP, NOT_RUN)]
            for check in found:
                if check.status == SKIP:
                    check.status, check.message = NOT_RUN, f"{asked}: {check.message}"
            if not found and not any(c.name == name for c in self.checks):
                self.add(name, NOT_RUN, f"{asked}: verification stopped before it (see the checks above)")
        return self

    def failures(self) -> list[str]:
        failed = [f"{c.name}: {c.message}" for c in self.checks if c.status in (FAIL, NOT_RUN)]
        listed = {c.name for c in self.checks if c.status in (FAIL, NOT_RUN)}
        return failed + [
            f"{name}: requested by {self.required[name]} but did not run" for name in self.unmet() if name not in listed
        ]

    def add(self, name: str, status: str, message: str, details: list[str] | None = None) -> None:
        self.checks.append(Check(name, status, message, list(details or [])[:20]))

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "weightlock_version": __version__,
            "locked": self.locked,
            "checks": [c.__dict__ for c in self.checks],
        }


def requested(report: Report, deep: bool, engine: str | None, engine_checks: dict[str, str], source=None) -> Report:
    """The checks the options ask for: each must run and pass (or warn), else the report is not ok."""
    if deep:
        report.require("finite", "--deep")
    if engine is not None:
        report.require(engine_checks[engine], f"--engine {engine}")
    if source is not None:
        report.require(ORIGINALS_CHECK, "--source")
    return report


ORIGINALS_CHECK = "original_biases"


NO_ORIGINALS = "no originals claimed"


SOURCE_HINT = "pass --source SOURCE (the model the lock was applied to) to check them"


WRONG_SOURCE_HINT = "pass the model the lock was applied to (the original, not a locked output or another model)"


def source_note(report: Report) -> list[str]:
    """apply's warning for an output whose originals only the source can confirm (its own check had the source)."""
    if not any(c.name == ORIGINALS_CHECK and not c.message.startswith(NO_ORIGINALS) for c in report.checks):
        return []
    return [
        "the source already had o_proj biases: a standalone `weightlock verify` of this output needs "
        "--source SOURCE (the model the lock was applied to, kept outside the output: an in-place edit's "
        "weightlock/backup/ is not accepted) to confirm the recorded originals"
    ]


def source_error(source, message: str, hint: str = WRONG_SOURCE_HINT) -> InvalidInputError:
    return InvalidInputError(f"--source {source}: {message}", hint=hint)


def traces_without_record(report: Report, traces: str, record_name: str, biases: list[str], what: str) -> None:
    """Traces of a weightlock edit (folder or GGUF) but no record: a lock lives only in attention-output biases,
    so with none of them (``biases``) no lock can hide and the traces are reported (a README tag, a note); with
    them the output may carry a lock whose record was removed, which fails."""
    if not biases:
        report.add(
            "provenance",
            WARN,
            f"traces of a weightlock edit ({traces}) but no record ({record_name}); no {what} bias, so no lock is "
            "present",
        )
        return
    report.add(
        "provenance",
        FAIL,
        f"carries a weightlock edit's traces ({traces}) and {len(biases)} {what} bias(es) but no record "
        f"({record_name}): the lock cannot be verified",
        ["hint: re-lock the original model (the record was deleted or never completed)"],
    )


def locked_summary(record: dict, lock) -> dict:
    """The report's ``locked`` entry, from a record (folder or GGUF) whose lock was checked: ``alpha`` is the
    newest edit's, ``net_alpha`` what its lock nets to over the record chain (``net_alphas``: every lock's)."""
    from weightlock.core.records import chain_length, net_alphas

    nets = net_alphas(record)
    return {
        "alpha": record["alpha"],
        "net_alpha": nets[record["lock"]["sha256"]],
        "net_alphas": nets,
        "edits": chain_length(record),
        "lock_sha256": record["lock"]["sha256"],
        "source_model": lock.source_model.to_dict(),
        "heads": lock.num_heads_selected,
        "locked_layers": record["locked_layers"],
        "created_at": record["created_at"],
    }


NET_LOCK_CHECK = "net_lock"


NET_LOCK_HINT = "hint: apply the lock at a positive alpha to the original (unlocked) model"


def check_net_lock(record: dict, report: Report) -> None:
    """What the record chain's edits add up to (folder or GGUF): each relock adds its alpha times its lock, so
    ``-6`` then ``+3`` of one lock is an anti-lock at -3, whatever the newest edit's alpha says. A lock netting
    below zero fails; netting to zero (an undo, +a then -a) is reported, not failed: the lock is off."""
    from weightlock.core.records import chain_length, net_alphas

    nets, sha, edits = net_alphas(record), record["lock"]["sha256"], chain_length(record)
    net = nets[sha]
    others = [f"lock {other[:12]}: net alpha {value:g}" for other, value in nets.items() if other != sha]
    negative = [f"lock {other[:12]}: net alpha {value:g}" for other, value in nets.items() if value < 0]
    over = f"over {edits} edit(s)" if edits > 1 else "in one edit"
    if net < 0 or negative:
        what = (
            f"the edits net to alpha {net:g} of lock {sha[:12]}: the model is not locked (it carries the lock's "
            "opposite)"
            if net < 0
            else f"an earlier lock of the chain nets below zero ({'; '.join(negative)}): the model carries its opposite"
        )
        report.add(NET_LOCK_CHECK, FAIL, what, [*others, NET_LOCK_HINT])
    elif net == 0:
        report.add(
            NET_LOCK_CHECK,
            WARN,
            f"the edits net to alpha 0 of lock {sha[:12]} {over}: the lock was taken off again; "
            "the model is not locked",
            others,
        )
    else:
        report.add(NET_LOCK_CHECK, PASS, f"lock {sha[:12]} nets to alpha {net:g} {over}", others)


def provenance_line(record: dict) -> str:
    """The lock and alpha a provenance check names: the newest edit's alpha and, for a chain, the net."""
    from weightlock.core.records import chain_length, net_alphas

    line = f"lock {record['lock']['sha256'][:12]} at alpha {record['alpha']}"
    if chain_length(record) > 1:
        line += f" (the chain's edits net to alpha {net_alphas(record)[record['lock']['sha256']]:g})"
    return line


def output_failure(
    report: Report, source, loader_check: bool, done: str, verify: Callable[..., Report]
) -> WeightlockError:
    """The error for an output that failed verification. When the source fails the same checks the input is at
    fault (exit 3: apply refuses what verify would refuse); otherwise it is a bug or a disk fault (exit 6).
    ``verify``: :func:`weightlock.api.verify_checkpoint` (passed in: formats do not import the engines it runs)."""
    return failure_against_source(report, verify(source, loader_check=loader_check), source, done)


def failure_against_source(report: Report, source_report: Report, source, done: str) -> WeightlockError:
    failed = {c.name for c in report.checks if c.status == FAIL}
    if failed & {c.name for c in source_report.checks if c.status == FAIL}:
        return CheckpointError(
            f"the source fails verify's own checks, so {done}: " + "; ".join(source_report.failures()),
            hint=f"run `weightlock verify {source}` for details; repair or download it again",
        )
    return VerificationError(
        f"the written output failed verification and {done}: " + "; ".join(report.failures()),
        hint="this is a bug in weightlock or a fault in the disk; please report it",
    )


def report_json(report: Report) -> str:
    data = report.to_dict()
    problems = schema_errors(data, "report")
    if problems:  # a bug in weightlock, not in the user's input
        raise AssertionError("verify report does not match schemas/report.schema.json: " + "; ".join(problems))
    return json.dumps(data, indent=2)


@dataclass(frozen=True)
class EngineChecks:
    """The engine checks a format's verify runs, supplied by :mod:`weightlock.api` (formats never import
    engines). ``serving``: called once the architecture is known, as ``check(checkpoint, spec, shape, report)``
    for a folder and ``check(model, architecture, shape, report)`` for a GGUF file (which engines apply the bias:
    data, no engine imported); ``loading``: ``check(model, report)`` at the end (an engine's own loader on the
    output)."""

    serving: tuple[Callable[..., None], ...] = ()
    loading: tuple[Callable[..., None], ...] = ()


NO_ENGINES = EngineChecks()  # the format's own checks alone (what apply runs on a GGUF, and tests)
