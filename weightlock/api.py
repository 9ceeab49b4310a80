"""The dispatcher: every public operation on a checkpoint (apply, verify, in place, revert, inspect) asks
:func:`weightlock.formats.detect` which format the location is, runs that format's order of work, and adds the
engines' checks. This is the one module that joins formats and engines: formats never import engines, so a
format that must publish only what ``verify`` accepts is handed :func:`verify_checkpoint` from here.

Order of work of an apply, for every format: read the lock (its exact bytes are recorded) -> refuse bad input
from headers and config alone -> compute ``W_o @ d`` reading only the touched o_proj weights -> write into a
staging place beside the output -> verify the staged output (this module's checks, engines included) ->
publish atomically. The source is only ever read.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from typing import TYPE_CHECKING

from weightlock.core.lock import Lock, read_lock
from weightlock.core.report import EngineChecks, Report, requested
from weightlock.errors import InvalidInputError, UnsupportedError
from weightlock.formats import FORMATS, GGUF, SAFETENSORS, detect
from weightlock.io.commit import set_interrupt_advice

if TYPE_CHECKING:
    from weightlock.formats.gguf.apply import GGUFApplyResult
    from weightlock.formats.safetensors.apply import ApplyResult
    from weightlock.formats.safetensors.folder import Checkpoint


def engine_checks(
    fmt: str,
    *,
    loader_check: bool,
    engine: str | None,
    engines: tuple[str, ...] | None = None,
    enforce_serving: bool = True,
) -> EngineChecks:
    """The engine checks ``verify`` runs on a checkpoint of format ``fmt``: which engines apply the bias (the
    serving table, data, always: ``engines`` are the ones deployed to, None for all; ``enforce_serving`` off makes
    an engine that would drop the bias a warning), the transformers class check (``loader_check``, folders), and
    the engine asked for by name."""
    from weightlock.engines import serving

    if fmt == GGUF:
        from weightlock.engines import llama_cpp

        return EngineChecks(
            serving=(partial(serving.check_gguf_serving, names=engines, enforce=enforce_serving),),
            loading=(llama_cpp.check_loads_report,) if engine == "llama-cpp" else (),
        )
    loading = []
    if loader_check:
        from weightlock.engines.transformers import check_loader_names

        loading.append(check_loader_names)
    if engine == "vllm":
        from weightlock.engines.vllm import check_vllm_loading_report

        loading.append(check_vllm_loading_report)
    elif engine == "mlx":
        from weightlock.engines.mlx import check_mlx_loading_report

        loading.append(check_mlx_loading_report)
    return EngineChecks(
        serving=(
            partial(serving.check_folder_serving, names=engines, enforce=enforce_serving),
            serving.check_quantized_loaders,
        ),
        loading=tuple(loading),
    )


def verify_checkpoint(
    path,
    *,
    expected=None,
    loader_check: bool = True,
    deep: bool = False,
    engine: str | None = None,
    source=None,
    engines=None,
    enforce_serving: bool = True,
) -> Report:
    """Run every check on the checkpoint at ``path`` (a safetensors folder or a GGUF file).

    ``expected``: biases just computed by apply; when given, stored biases are compared
    with them byte for byte instead of being recomputed from the weights.
    ``loader_check``: the transformers class check (folders; skipped where transformers is not installed).
    ``deep``: also scan every floating-point tensor for NaN/Inf (reads the whole model).
    ``engine``: "vllm" (folders) also loads the tensor names into vLLM's own model class; "mlx" (folders) loads
    the folder in mlx-lm and checks its attention-output biases are the model's as stored; "llama-cpp" (GGUF)
    loads the file in llama.cpp. Each needs its engine installed.
    ``source``: the model the lock was applied to (a folder, a cached Hub id or an open Checkpoint; a .gguf file
    or an open GGUFModel for GGUF): the originals the record claims for biases the source already had are
    compared with its stored biases byte for byte (the ``original_biases`` check). Without it such originals
    are unverifiable: nothing in the output ties them to the source.
    ``engines``: the engines the checkpoint is deployed to (names of the serving table,
    :mod:`weightlock.engines.serving_table`, as a list or a comma-separated string); None: every engine. The
    report has a ``serving:<engine>`` check for each: it fails where the engine would serve the checkpoint
    without its attention-output biases (or as another model) with no error, and warns where the engine refuses
    it. ``enforce_serving`` off turns those failures into warnings (apply's own check: the output is right
    whichever engine serves it).
    """
    from weightlock.core.report import WRONG_SOURCE_HINT, source_error
    from weightlock.engines.serving import ENGINE_CHECKS
    from weightlock.engines.serving_table import parse_engines

    fmt = detect(path)
    path = _location(path)
    if source is not None and not isinstance(source, (str, os.PathLike)) and detect(source) != fmt:
        raise source_error(
            _location(source),
            f"is {FORMATS[detect(source)]}; the checkpoint verified is {FORMATS[fmt]}",
            hint=WRONG_SOURCE_HINT,
        )
    known = ENGINE_CHECKS[fmt]
    if engine is not None and engine not in known:
        raise InvalidInputError(
            f"unknown engine {engine!r}" + (" for GGUF" if fmt == GGUF else ""),
            hint=f"choose one of: {', '.join(known)}",
        )
    deployed = None if engines is None else parse_engines(engines)
    checks = engine_checks(
        fmt, loader_check=loader_check, engine=engine, engines=deployed, enforce_serving=enforce_serving
    )
    if fmt == GGUF:
        from weightlock.formats.gguf.verify import verify_gguf

        report = verify_gguf(path, expected=expected, deep=deep, source=source, engines=checks)
        return requested(report, deep, engine, known, source).finish()
    from weightlock.formats.safetensors.verify import open_source_folder, verify_folder

    opened = None if source is None else open_source_folder(source, path, detect(source))
    report = requested(Report(str(path)), deep, engine, known, source)
    return verify_folder(path, report, expected=expected, deep=deep, source=opened, engines=checks).finish()


def _location(opened):
    """The path of a model weightlock opened (a folder's root, a GGUF's first file); a path as it is."""
    from weightlock.formats.gguf.file import GGUFModel
    from weightlock.formats.safetensors.folder import Checkpoint

    if isinstance(opened, Checkpoint):
        return opened.root
    if isinstance(opened, GGUFModel):
        return opened.path
    return opened


def apply_lock(
    checkpoint: str | os.PathLike | Checkpoint,
    lock: str | os.PathLike | Lock,
    *,
    out: str | os.PathLike,
    alpha: float | None = None,
    force: bool = False,
    link_mode: str = "auto",
    allow_architecture_mismatch: bool = False,
    progress: bool = False,
    loader_check: bool = True,
    eval_report: str | os.PathLike | None = None,
    gate: bool = True,
) -> ApplyResult | GGUFApplyResult:
    """Bake ``lock`` at strength ``alpha`` (default: the lock's) into a copy of ``checkpoint`` at ``out``.

    ``checkpoint``: a safetensors folder (or a Hub id in the local cache, or an open Checkpoint) or a GGUF file.
    The output's README.md is the source's model card with this edit added (``eval_report``: a
    ``weightlock eval`` report whose measurements the card quotes; folders only).

    The output is published only if :func:`verify_checkpoint` passes on it with the same checks
    ``weightlock verify`` runs (``loader_check``: the transformers class check, skipped where
    transformers is not installed), plus a byte comparison with the values just computed. An engine of the
    serving table that would serve the output without its lock does not stop it: the result's warnings name it.

    A gated lock (``forge --gate``) is baked with its gate into Llama, Mistral and Qwen2 folders; ``gate`` False
    bakes its heads as a constant lock (the only way into other families and GGUF files)."""
    # true until the output is published (the staging place is removed on the way out, publish's renames are
    # never split, and a --force run's previous output is moved back by the next run if ever left aside)
    set_interrupt_advice("no output was published (a rerun tidies what the interrupted run left)")
    given, given_bytes = read_lock(lock)
    lock, lock_bytes = _gate_choice(given, given_bytes, gate)
    dropped = (
        []
        if lock is given
        else [
            f"the gate of lock {hashlib.sha256(given_bytes).hexdigest()[:16]}... was left out (--no-gate): its heads "
            "are baked as a constant lock"
        ]
    )
    if detect(checkpoint) == GGUF:
        if lock.gate is not None:
            raise UnsupportedError(
                "a gated lock cannot be baked into a GGUF file yet (its MLP tensors would have to be rewritten "
                "and requantized)",
                hint="pass --no-gate to bake the lock's heads as a constant lock, or lock the safetensors model "
                "and convert it after",
            )
        from weightlock.core.edit import ProgressBar
        from weightlock.formats.gguf.apply import apply_lock_gguf

        if eval_report is not None:
            raise InvalidInputError(
                "--eval-report is for safetensors folders (it goes into the model card); a GGUF file has no card",
                hint="leave out --eval-report for a .gguf file",
            )
        result = apply_lock_gguf(
            checkpoint,  # type: ignore[arg-type]
            lock,
            lock_bytes,
            out=out,
            alpha=alpha,
            force=force,
            allow_architecture_mismatch=allow_architecture_mismatch,
            progress=ProgressBar if progress else None,
        )
        result.plan.warnings.extend(dropped)
        return _with_serving_warnings(result, result.outputs[0])
    from weightlock.formats.safetensors.apply import apply_folder
    from weightlock.formats.safetensors.folder import Checkpoint, open_checkpoint

    folder_result = apply_folder(
        checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint),
        lock,
        lock_bytes,
        out=out,
        alpha=alpha,
        force=force,
        link_mode=link_mode,
        allow_architecture_mismatch=allow_architecture_mismatch,
        progress=progress,
        loader_check=loader_check,
        eval_report=eval_report,
        verify=_APPLY_VERIFY,
    )
    folder_result.plan.warnings.extend(dropped)
    return _with_serving_warnings(folder_result, folder_result.out)


# apply's own verify of what it writes: verify's checks, except that an engine of the serving table that would
# drop the bias is a warning, not a refusal (the output is right; where it is served is the user's choice, and
# apply names those engines in its warnings)
_APPLY_VERIFY = partial(verify_checkpoint, enforce_serving=False)


def _gate_choice(lock: Lock, lock_bytes: bytes, gate: bool) -> tuple[Lock, bytes]:
    """The lock to bake: a gated lock as it is, or (``gate`` False) its constant form, recorded as such."""
    if lock.gate is None or gate:
        return lock, lock_bytes
    from weightlock.core.lock import lock_file_bytes

    constant = lock.without_gate()
    # the constant lock recorded names the gated lock it came from (its file's sha256), so the edit can be traced
    digest = hashlib.sha256(lock_bytes).hexdigest()
    constant.description = f"the heads of gated lock {digest}, baked without its gate (--no-gate)"
    data = lock_file_bytes(constant)
    constant.sha256 = hashlib.sha256(data).hexdigest()
    return constant, data


def _with_serving_warnings(result, published):
    """``result`` with apply's warning naming every engine of the serving table that would serve the published
    output without its lock, with no error (read back from the output: its headers and config)."""
    from weightlock.engines.serving import serving_warnings
    from weightlock.errors import WeightlockError

    try:
        result.plan.warnings.extend(serving_warnings(published))
    except WeightlockError as e:  # the output is published and verified; this only names engines
        result.plan.warnings.append(f"which engines serve the lock was not assessed: {e.message}")
    return result


def _refuse_in_place(location, what: str = "--in-place edits") -> None:
    if detect(location) != SAFETENSORS:
        raise InvalidInputError(
            f"{what} safetensors folders; a GGUF file is locked into a new file",
            hint="pass --out NAME-locked.gguf",
        )


def apply_in_place(
    location,
    lock: str | os.PathLike | Lock,
    *,
    alpha: float | None = None,
    allow_architecture_mismatch: bool = False,
    progress: bool = False,
    loader_check: bool = True,
    eval_report: str | os.PathLike | None = None,
) -> ApplyResult:
    """Lock the checkpoint folder ``location`` itself (its model card too), as a journal: a crash at any step
    is rolled back by the next run, and :func:`revert` restores the original files byte for byte. Published
    only if :func:`verify_checkpoint` passes, as for :func:`apply_lock`."""
    from weightlock.formats.safetensors import inplace

    _refuse_in_place(location)
    if read_lock(lock)[0].gate is not None:
        raise UnsupportedError(
            "a gated lock grows every MLP tensor, so it is baked into a new folder, never in place",
            hint="pass --out NEW_FOLDER (the source stays as the undo)",
        )
    result = inplace.apply_in_place(
        _location(location),
        lock,
        alpha=alpha,
        allow_architecture_mismatch=allow_architecture_mismatch,
        progress=progress,
        loader_check=loader_check,
        eval_report=eval_report,
        verify=_APPLY_VERIFY,
    )
    return _with_serving_warnings(result, _location(location))


def revert(location) -> dict:
    """Undo an in-place edit of the checkpoint folder ``location``: every original file back, byte for byte."""
    from weightlock.formats.safetensors import inplace

    _refuse_in_place(location, "revert undoes in-place edits of")
    return inplace.revert(_location(location))


def describe(location) -> dict:
    """``inspect`` data for a checkpoint (either format) or a lock file; the CLI's text comes from it."""
    fmt = detect(location)
    if fmt == GGUF:
        from weightlock.formats.gguf.describe import describe_gguf
        from weightlock.formats.gguf.file import open_gguf

        return describe_gguf(open_gguf(location))
    from weightlock.formats.safetensors.describe import describe_checkpoint
    from weightlock.formats.safetensors.folder import open_checkpoint

    return describe_checkpoint(open_checkpoint(location))
