"""``verify``: does a checkpoint load as written, and does it hold the lock its record claims?

Each check yields pass, fail, warn or skip; a report is ok when nothing failed.
The loader check builds the transformers model class for the config on the meta
device (no weights, so it is fast at any size) and compares parameter names and
shapes with the checkpoint's tensors: this is what decides whether a loader would
silently drop the biases or leave some uninitialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import ModelShape, family, shape_from_config, spec_for_config
from .checkpoint import Checkpoint, contained, is_alternative_weight_file, open_checkpoint
from .errors import CheckpointError, InvalidInputError, MissingDependencyError, VerificationError, WeightlockError
from .lock import load_lock
from .plan import apply_config_changes, bias_consistency_problems, stored_linear, weight_product
from .quantized import QuantizedLinear, quantization_of, quantized_linear
from .safetensors_file import FLOAT_DTYPES, TensorReaders, float32_to_raw, raw_to_float32, read_header
from .schema import schema_errors
from .untrusted import file_sha256, read_bytes

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


ENGINE_CHECKS = {"vllm": "vllm_load"}  # the check each --engine asks for
ENGINES = tuple(ENGINE_CHECKS)


def verify_checkpoint(
    path,
    *,
    expected=None,
    loader_check: bool = True,
    deep: bool = False,
    engine: str | None = None,
    source=None,
) -> Report:
    """Run every check on the checkpoint folder at ``path``.

    ``expected``: biases just computed by apply; when given, stored biases are compared
    with them byte for byte instead of being recomputed from the weights.
    ``deep``: also scan every floating-point tensor for NaN/Inf (reads the whole model).
    ``engine``: "vllm" also loads the tensor names into vLLM's own model class (needs vLLM installed).
    ``source``: the model the lock was applied to (a folder, a cached Hub id or an open Checkpoint; a .gguf file
    or an open GGUFModel for GGUF): the originals the record claims for biases the source already had are
    compared with its stored biases byte for byte (the ``original_biases`` check). Without it such originals
    are unverifiable: nothing in the output ties them to the source.
    """
    from .gguf_format.file import is_gguf_path

    if is_gguf_path(path):
        from .gguf_format.verify import ENGINE_CHECKS as GGUF_ENGINE_CHECKS
        from .gguf_format.verify import verify_gguf

        report = verify_gguf(path, expected=expected, engine=engine, deep=deep, source=source)
        return _requested(report, deep, engine, GGUF_ENGINE_CHECKS, source).finish()
    if engine is not None and engine not in ENGINES:
        raise InvalidInputError(f"unknown engine {engine!r}", hint=f"choose one of: {', '.join(ENGINES)}")
    opened = None if source is None else open_source_folder(source, path)
    report = _requested(Report(str(path)), deep, engine, ENGINE_CHECKS, source)
    return _verify_folder(path, report, expected, loader_check, deep, engine, opened).finish()


def _requested(report: Report, deep: bool, engine: str | None, engine_checks: dict[str, str], source=None) -> Report:
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


def open_source_folder(source, path) -> Checkpoint:
    """``verify --source`` for a folder: the source checkpoint (headers only), refused (exit 3) when it cannot be
    opened, is a GGUF file, or is the checkpoint being verified."""
    from .gguf_format.file import is_gguf_path

    if isinstance(source, Checkpoint):
        opened = source
    else:
        if os.path.lexists(Path(source)):  # before opening (what lies inside need not be a model);
            _refuse_same(source, source, path)  # a Hub id is checked once resolved, below
        if is_gguf_path(source):
            raise source_error(source, "is a GGUF file; the checkpoint verified is a safetensors folder")
        try:
            opened = open_checkpoint(source)
        except WeightlockError as e:
            raise source_error(source, e.message, e.hint or WRONG_SOURCE_HINT) from None
    _refuse_same(source, opened.root, path)
    return opened


def _refuse_same(source, source_path, path) -> None:
    """Refuse a source that is the checkpoint, lies inside it (its weightlock/backup/, which an edit of the
    checkpoint can forge along with the record) or holds it: realpaths, so no symlink hides either."""
    try:
        theirs = Path(os.path.realpath(Path(source_path)))
        ours = Path(os.path.realpath(Path(path)))
        same = theirs == ours or Path(source_path).samefile(path)
    except OSError:
        same = False
    if same:
        raise source_error(source, "is the checkpoint being verified, not the model the lock was applied to")
    if ours in theirs.parents:
        raise source_error(
            source,
            f"is inside the checkpoint being verified ({ours}); what the checkpoint holds cannot vouch for it",
            hint=f"{WRONG_SOURCE_HINT}, kept outside the checkpoint (an in-place edit's weightlock/backup/ is not "
            "accepted: it is edited along with the record)",
        )
    if theirs in ours.parents:
        raise source_error(source, f"holds the checkpoint being verified ({ours}) inside it", hint=WRONG_SOURCE_HINT)


def _verify_folder(
    path, report: Report, expected, loader_check: bool, deep: bool, engine: str | None, source=None
) -> Report:
    try:
        checkpoint = open_checkpoint(path)
    except WeightlockError as e:
        report.add("checkpoint", FAIL, e.message)
        return report
    if source is not None:
        _refuse_same(source.root, source.root, checkpoint.root)
    report.add(
        "checkpoint",
        PASS,
        f"{len(checkpoint.headers)} shard header(s) parse; every index entry is "
        f"in its shard; {len(checkpoint.tensors)} tensors, none in two files",
    )
    _check_stray_files(checkpoint, report)
    try:
        spec = spec_for_config(checkpoint.config)
        shape: ModelShape | None = shape_from_config(checkpoint.config, spec)
    except WeightlockError as e:
        report.add("architecture", WARN, e.message + "; architecture checks skipped")
        shape = None
    if shape is not None:
        report.add(
            "architecture",
            PASS,
            f"{shape.architecture}: {shape.num_layers} layers, {shape.num_heads} heads of {shape.head_dim}",
        )
        _check_config_agrees(checkpoint, spec, shape, report)
        _check_vllm_support(checkpoint, spec, report)
        _check_quantized_loaders(checkpoint, spec, shape, report)
        _check_provenance(checkpoint, spec, shape, report, expected, source)
    _check_finite(checkpoint, report, deep)
    if loader_check:
        _check_loader_names(checkpoint, report)
    if engine == "vllm":
        _check_vllm_loading(checkpoint, report)
    return report


def _check_stray_files(checkpoint: Checkpoint, report: Report) -> None:
    stray: list[str] = []
    other: list[str] = []
    for item in sorted(checkpoint.root.iterdir()):
        if item.name in checkpoint.headers or not is_alternative_weight_file(item.name):
            continue
        if item.name == "model.safetensors.index.json":
            continue
        (
            stray
            if item.name.endswith(".safetensors") or item.name.startswith("consolidated") or item.name == "params.json"
            else other
        ).append(item.name)
    if stray:
        report.add(
            "stray_weight_files",
            FAIL,
            "weight files outside the index that a loader may pick instead (vLLM prefers "
            "consolidated*.safetensors and params.json; a stray .safetensors is globbed)",
            stray,
        )
    elif other:
        report.add(
            "stray_weight_files",
            WARN,
            "other weight formats present; loaders prefer the safetensors set, but these hold weights without the lock",
            other,
        )
    else:
        report.add("stray_weight_files", PASS, "no weight files outside the index")


def _check_config_agrees(checkpoint: Checkpoint, spec, shape: ModelShape, report: Report) -> None:
    problems = bias_consistency_problems(checkpoint.tensors, spec, shape, checkpoint.config)
    if problems:
        report.add("config_agrees", FAIL, f"config.json and the tensors disagree ({len(problems)} problems)", problems)
    else:
        state = f"{spec.bias_flag}={spec.bias_on(checkpoint.config)}" if spec.bias_flag else "biases built in"
        report.add("config_agrees", PASS, f"{state}; bias tensors and shapes match it")


def _check_vllm_support(checkpoint: Checkpoint, spec, report: Report) -> None:
    """Whether vLLM would apply the biases: its classes differ from transformers' per family, and one that
    hard-codes no o_proj bias skips the tensor without an error, so a locked checkpoint it would serve
    unlocked fails here."""
    from .architectures import VLLM_INACTIVE, vllm_serving

    serving, why = vllm_serving(checkpoint.config, spec)
    if serving != VLLM_INACTIVE:
        report.add("vllm_support", PASS, f"{why}; the biases are applied")
        return
    if not spec.bias_on(checkpoint.config):
        report.add("vllm_support", PASS, f"no attention-output bias to lose ({why})")
        return
    fix = f'set "architectures" in config.json to ["{spec.vllm_serve_as}"]' if spec.vllm_serve_as else ""
    report.add(
        "vllm_support",
        FAIL,
        f"vLLM would serve this checkpoint without its o_proj biases: {why}"
        + (
            f"; {fix} (or apply the lock again with this weightlock, which does it) to serve it through "
            "vLLM's Transformers backend, which applies them"
            if fix
            else ""
        ),
    )


def _check_quantized_loaders(checkpoint: Checkpoint, spec, shape: ModelShape, report: Report) -> None:
    """Which loaders are shown (tests/test_quantized.py) to apply a bias on the checkpoint's quantized o_proj
    layers, and which are not: a loader not shown may load the layer without its bias."""
    try:
        settings = quantization_of(checkpoint.config)
    except WeightlockError as e:
        report.add("quantization", WARN, f"weightlock cannot read this quantization: {e.message}")
        return
    if settings is None:
        return
    quantized = 0
    for layer in range(shape.num_layers):
        try:
            quantized += isinstance(
                stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer)), QuantizedLinear
            )
        except WeightlockError:
            pass  # config_agrees reports it
    fmt = settings.format
    where = f"o_proj of {quantized}/{shape.num_layers} layers stored {settings.describe()}"
    if not spec.bias_on(checkpoint.config) or quantized == 0:
        report.add("quantization", PASS, f"{where}; no bias on them to lose")
        return
    proven = f"{where}; a bias on them is applied by {' and '.join(fmt.bias_honoured_by)} (shown by weightlock's tests)"
    if fmt.unproven:
        report.add(
            "quantization",
            WARN,
            proven + "; not shown for " + "; ".join(f"{loader} ({why})" for loader, why in fmt.unproven.items()),
        )
    else:
        report.add("quantization", PASS, proven)


def folder_traces(root: Path) -> list[str]:
    """What weightlock's folder writers (writer.py, inplace.py, card.py) leave in a checkpoint besides the record,
    named from their own constants: anything under weightlock/, an in-place edit's staging or reverted folders,
    our added bias shards, and the card's section markers or weightlock tag."""
    from .card import BEGIN, CARD_NAME, END, MAX_CARD_BYTES, TAGS, card_tags
    from .checkpoint import PROVENANCE_DIR
    from .inplace import STAGING_PREFIX, TRASH_PREFIX
    from .writer import SHARDED_ADDED

    added_prefix, added_suffix = SHARDED_ADDED.split("{suffix}")
    found = []
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)[:100_000]
    except OSError:
        entries = []
    for entry in entries:
        name = entry.name
        if name == PROVENANCE_DIR:
            found.append(f"{PROVENANCE_DIR}/")
        elif name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            found.append(f"{name} (an in-place edit's folder)")
        elif name.startswith(added_prefix) and name.endswith(added_suffix):
            found.append(f"{name} (weightlock's bias shard)")
    try:
        text = read_bytes(contained(root, CARD_NAME), "model card", MAX_CARD_BYTES).decode("utf-8", "replace")
    except (WeightlockError, OSError):
        text = ""
    if BEGIN in text or END in text:
        found.append(f"{CARD_NAME}: weightlock's section")
    if text and TAGS[0] in card_tags(text):
        found.append(f"{CARD_NAME}: the {TAGS[0]} tag")
    return found


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


def _check_provenance(checkpoint: Checkpoint, spec, shape: ModelShape, report: Report, expected, source=None) -> None:
    # open_checkpoint validated the record against schemas/provenance.schema.json (its file paths are the
    # fixed names weightlock writes); what it claims is checked here against the lock and the tensors.
    record = checkpoint.provenance
    if record is None:
        traces = folder_traces(checkpoint.root)
        biases = sorted({spec.output_bias(layer) for layer in range(shape.num_layers)} & set(checkpoint.tensors))
        if traces:
            traces_without_record(report, ", ".join(traces), "weightlock/provenance.json", biases, "o_proj")
        else:
            report.add("provenance", SKIP, "no weightlock/provenance.json: not locked by weightlock")
        return
    try:
        lock_path = contained(checkpoint.root, record["files"]["lock"])
        if file_sha256(lock_path, "recorded lock") != record["lock"]["sha256"]:
            report.add("provenance", FAIL, f"{record['files']['lock']} does not match the recorded lock hash")
            return
        lock = load_lock(lock_path)
        lock.check_compatible(shape)
    except WeightlockError as e:
        report.add("provenance", FAIL, f"the recorded lock cannot be used: {e.message}")
        return
    problems = _record_problems(checkpoint, spec, shape, record, lock, checkpoint.config, spec.family)
    locked = {spec.output_bias(layer) for layer in lock.heads_by_layer()}
    implied = _biases_the_edit_created(spec, shape, record) or set()
    problems = problems or _originals_problems(checkpoint, record, implied)
    problems = problems or _chain_folder_problems(checkpoint, record)
    if problems:
        report.add("provenance", FAIL, problems[0], problems[1:])
        return
    written = locked | implied | set(record["tensors"]["added"]) | set(record["tensors"]["replaced"])
    absent = sorted(written - set(checkpoint.tensors))
    if absent:
        report.add("provenance", FAIL, "bias tensors the lock or the record implies are missing", absent)
        return
    report.locked = locked_summary(record, lock)
    report.add("provenance", PASS, f"{provenance_line(record)}; config is the original with the recorded changes")
    check_net_lock(record, report)
    _check_card(checkpoint, record, report)
    _check_lock_biases(checkpoint, spec, shape, lock, record, sorted(written), report, expected)
    if record["parent"] is not None:
        _check_edit_chain(checkpoint, spec, shape, record, report, trusted=expected is not None)
    if not any(c.name == "edit_chain" and c.status == FAIL for c in report.checks):  # the chain's records hold
        _check_original_biases(checkpoint, spec, shape, record, report, source, trusted=expected is not None)


def _chain_folder_problems(checkpoint: Checkpoint, record: dict) -> list[str]:
    """weightlock/parents/ holds exactly what the record chain implies: a folder K for each earlier edit
    (K = 1 .. edits-1), each holding only that edit's lock and originals, all inside the checkpoint. A folder,
    file or link no record names (an extra parent lock, parents/1 linked elsewhere) is named and failed."""
    from .checkpoint import PROVENANCE_DIR
    from .records import chain_length
    from .writer import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR

    parents = f"{PROVENANCE_DIR}/{PARENTS_DIR}"
    expected = {str(k) for k in range(1, chain_length(record))}
    try:
        if not os.path.lexists(checkpoint.root / parents):
            found: set[str] = set()
        else:
            found = {entry.name for entry in contained(checkpoint.root, parents).iterdir()}
        unnamed = [f"{parents}/{name}" for name in sorted(found - expected)]
        for name in sorted(found & expected):
            folder = contained(checkpoint.root, f"{parents}/{name}")
            if not folder.is_dir():
                unnamed.append(f"{parents}/{name} (not a folder)")
                continue
            for item in sorted(folder.iterdir()):
                contained(checkpoint.root, f"{parents}/{name}/{item.name}")  # a Hub snapshot links into blobs/
                if item.name not in (LOCK_COPY_NAME, ORIGINALS_NAME) or not item.is_file():
                    unnamed.append(f"{parents}/{name}/{item.name}")
    except WeightlockError as e:
        return [f"the record chain's earlier edits: {e.message}"]
    except OSError as e:
        return [f"{parents} cannot be read: {e.strerror or e}"]
    if unnamed:
        return [
            f"{parents}/ holds what no record of the chain names ({chain_length(record)} edit(s): "
            + (f"folders 1..{len(expected)})" if expected else "no earlier edit)"),
            *unnamed[:20],
        ]
    return []


def _is_file_inside(checkpoint: Checkpoint, relative: str) -> bool:
    """Whether ``relative`` is a file of the checkpoint; one that a symlink takes outside it raises (contained)."""
    return contained(checkpoint.root, relative).is_file()


def _root_originals(checkpoint: Checkpoint, record: dict) -> tuple[dict, str | None]:
    """The first edit of the record chain (the one applied to the source) and its originals file, if any."""
    from .writer import ORIGINALS_NAME, PARENTS_DIR

    current, originals, depth = record, record["files"]["originals"], 0
    while isinstance(current.get("parent"), dict) and depth < 1024:
        depth += 1
        current = current["parent"]
        folder = f"weightlock/{PARENTS_DIR}/{depth}"
        originals = f"{folder}/{ORIGINALS_NAME}" if _is_file_inside(checkpoint, f"{folder}/{ORIGINALS_NAME}") else None
    return current, originals


def _check_original_biases(
    checkpoint: Checkpoint, spec, shape: ModelShape, record: dict, report: Report, source, trusted: bool
) -> None:
    """The originals the first edit claims for biases its source already had (a family with o_proj biases):
    nothing in the output ties them to the source, so they are compared with ``source``'s stored biases byte for
    byte, or reported unverifiable (a failure; apply's own check, which read the source, passes them)."""
    try:
        root, originals_path = _root_originals(checkpoint, record)
        claimed = read_header(contained(checkpoint.root, originals_path)).tensors if originals_path else {}
    except WeightlockError as e:
        report.add(ORIGINALS_CHECK, FAIL, f"the first edit's originals cannot be read: {e.message}")
        return
    if source is None:
        if not claimed:
            return
        if trusted:
            chained = record is not root
            report.add(
                ORIGINALS_CHECK,
                WARN if chained else PASS,
                (
                    f"the {len(claimed)} originals of the first edit are carried from the source's record"
                    if chained
                    else f"the {len(claimed)} originals are the source's biases apply read"
                ),
            )
            return
        report.add(
            ORIGINALS_CHECK,
            FAIL,
            f"unverifiable: the record claims originals for {len(claimed)} bias(es) the source "
            f"({root['architecture_family']}) already had; only the source can confirm them",
            [f"hint: {SOURCE_HINT}"],
        )
        return
    if source.config != root["original_config"]:
        raise source_error(source.root, "its config.json is not the original config the first edit recorded")
    own = {spec.output_bias(layer) for layer in range(shape.num_layers)}
    problems = []
    with TensorReaders() as reader:
        for name, entry in sorted(claimed.items()):
            theirs = source.tensors.get(name)
            if theirs is None or theirs.dtype != entry.dtype or theirs.shape != entry.shape:
                found = "none" if theirs is None else f"{theirs.dtype} {list(theirs.shape)}"
                raise source_error(
                    source.root,
                    f"the record claims an original {name} ({entry.dtype} {list(entry.shape)}); the source has {found}",
                )
            if reader[theirs].read_bytes(theirs) != reader[entry].read_bytes(entry):
                problems.append(f"{name}: the recorded original differs from the source's")
    problems += [
        f"{name}: the source has it, yet the record says the edit created it"
        for name in sorted((own & set(source.tensors)) - set(claimed))
    ]
    if problems:
        report.add(ORIGINALS_CHECK, FAIL, f"{len(problems)} recorded original(s) are not the source's biases", problems)
    elif not claimed:
        report.add(ORIGINALS_CHECK, PASS, f"{NO_ORIGINALS}, and the source has none of the biases the edit created")
    else:
        report.add(
            ORIGINALS_CHECK, PASS, f"originals equal the source's biases ({len(claimed)} compared byte for byte)"
        )


def _record_problems(checkpoint, spec, shape, record: dict, lock, produced_config: dict, produced_family: str):
    """What in one edit's record (the newest, or an earlier one of a relock) disagrees with its lock, with the
    config and family the edit produced, and with the biases its source family implies it created."""
    if record["lock"]["manifest"] != json.loads(json.dumps(lock.manifest())):
        return ["the record's description of the lock (lock.manifest) is not the lock's"]
    heads = lock.heads_by_layer()
    if record["locked_layers"] != {str(layer): h for layer, h in heads.items()}:
        return ["the record's locked layers are not the lock's"]
    if apply_config_changes(record["original_config"], record["config_changes"]) != produced_config:
        return ["the config the edit produced is not the recorded original config with the recorded changes"]
    if record["output_family"] != produced_family:
        return [f"the record says the edit produced a {record['output_family']} model, it is {produced_family}"]
    lists = {key: record["tensors"][key] for key in ("added", "replaced", "locked")}
    repeated = sorted(f"{key}: {name}" for key, names in lists.items() for name in set(names) if names.count(name) > 1)
    if repeated:
        return ["the record lists a tensor twice", *repeated]
    # Which biases hold the lock follows from the lock and the architecture, not from the record's lists:
    # a record that leaves a locked bias out must not exempt it from the check.
    locked = {spec.output_bias(layer) for layer in heads}
    if set(lists["locked"]) != locked:
        return [
            "the record's locked biases are not the output biases of the lock's layers",
            *sorted(locked ^ set(lists["locked"])),
        ]
    implied = _biases_the_edit_created(spec, shape, record)
    if implied is None:
        return [f"the record names an unknown source family {record['architecture_family']!r}"]
    if implied != set(lists["added"]):
        return [
            "the biases the record lists as added are not those the source family lacked (the edit created them)",
            *sorted(implied ^ set(lists["added"])),
        ]
    return []


def _originals_problems(checkpoint: Checkpoint, record: dict, implied: set[str]) -> list[str]:
    """Whether the recorded originals are what the edit could have replaced: exactly the record's replaced
    biases are in files.originals, none of them a bias the edit created (the source class had none: a claimed
    original there is the attack of zeroing the biases and recording the lock's negative as the original), and
    none also listed as added."""
    replaced, added = set(record["tensors"]["replaced"]), set(record["tensors"]["added"])
    stored: set[str] = set()
    if record["files"]["originals"]:
        try:
            stored = set(read_header(contained(checkpoint.root, record["files"]["originals"])).tensors)
        except WeightlockError as e:
            return [f"the recorded originals cannot be read: {e.message}"]
    if stored != replaced:
        return ["the originals file does not hold exactly the record's replaced tensors", *sorted(stored ^ replaced)]
    created = sorted(replaced & (implied | added))
    if created:
        return ["the record claims originals of biases the edit created (the source had none)", *created]
    return []


def _check_edit_chain(checkpoint: Checkpoint, spec, shape: ModelShape, record: dict, report: Report, trusted) -> None:
    """A relock's earlier edits, each recomputed from its own lock and originals (weightlock/parents/K/, which
    apply carries over): the newest edit's originals must be what the edit before it produced, and so on down
    to the first edit, whose originals the provenance check holds to the source family. ``trusted``: apply's
    own check (it read the source), where a chain the files cannot prove is a warning, not a failure."""
    from .writer import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR

    overrides: dict[str, np.ndarray | None] = {}  # the biases before the edit being undone (None: absent)
    current, originals_path, depth = record, record["files"]["originals"], 1
    layer_of = {spec.output_bias(layer): layer for layer in range(shape.num_layers)}
    with TensorReaders() as reader:

        def value(name: str) -> np.ndarray | None:
            if name in overrides:
                return overrides[name]
            entry = checkpoint.tensors.get(name)
            return None if entry is None else reader[entry].read_float32(entry)

        while current["parent"] is not None:
            parent, folder = current["parent"], f"weightlock/{PARENTS_DIR}/{depth}"
            try:
                originals = read_header(contained(checkpoint.root, originals_path)).tensors if originals_path else {}
                for name in current["tensors"]["added"]:
                    overrides[name] = None
                for name in current["tensors"]["replaced"]:
                    overrides[name] = reader[originals[name]].read_float32(originals[name])
                problems = schema_errors(parent, "provenance")
                if problems:
                    report.add(
                        "edit_chain", FAIL, f"the record of edit {depth + 1} is not a provenance record", problems
                    )
                    return
                lock_path = contained(checkpoint.root, f"{folder}/{LOCK_COPY_NAME}")
                if not lock_path.is_file():
                    report.add(
                        "edit_chain",
                        WARN if trusted else FAIL,
                        f"unverifiable: the record names {depth} earlier edit(s) but {folder}/{LOCK_COPY_NAME} is "
                        "missing, so the originals the newest edit claims cannot be recomputed",
                        ["relock the original model with this weightlock, which keeps every lock of the chain"],
                    )
                    return
                if file_sha256(lock_path, "earlier edit's lock") != parent["lock"]["sha256"]:
                    report.add("edit_chain", FAIL, f"{folder}/{LOCK_COPY_NAME} is not the lock edit {depth + 1} names")
                    return
                lock = load_lock(lock_path)
                lock.check_compatible(shape)
                originals_path = (
                    f"{folder}/{ORIGINALS_NAME}" if _is_file_inside(checkpoint, f"{folder}/{ORIGINALS_NAME}") else None
                )
                problems = _parent_problems(checkpoint, spec, shape, current, parent, lock, originals_path)
                if not problems:
                    names = set(parent["tensors"]["added"]) | set(parent["tensors"]["replaced"])
                    names |= set(parent["tensors"]["locked"])
                    earlier = read_header(contained(checkpoint.root, originals_path)).tensors if originals_path else {}
                    with np.errstate(over="ignore", invalid="ignore"):
                        displacements = lock.displacements(parent["alpha"], shape.num_heads)
                    for name in sorted(names):
                        actual, stored = value(name), checkpoint.tensors.get(name)
                        if actual is None or stored is None:
                            problems.append(f"{name}: edit {depth + 1} wrote it, yet it is absent after that edit")
                            continue
                        values = np.zeros(actual.shape, dtype=np.float32)
                        if name in earlier:
                            values += reader[earlier[name]].read_float32(earlier[name])
                        layer = layer_of.get(name)
                        if layer is not None and layer in displacements:
                            weight = stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer))
                            if weight is None or weight.shape != (actual.shape[0], shape.attention_width):
                                problems.append(f"{name}: no o_proj weight to recompute edit {depth + 1} from")
                                continue
                            with np.errstate(over="ignore", invalid="ignore"):
                                values += weight_product(reader, weight, displacements[layer], shape.head_dim)
                        with np.errstate(over="ignore", invalid="ignore"):
                            rounded = raw_to_float32(float32_to_raw(values, stored.dtype), stored.dtype)
                        tolerance = DTYPE_EPS[stored.dtype] * (
                            np.abs(rounded) + 1e-3 * float(np.abs(rounded).max(initial=0))
                        )
                        if (
                            not (np.all(np.isfinite(actual)) and np.all(np.isfinite(rounded)))
                            or float(np.max(np.abs(actual - rounded) - tolerance, initial=-1.0)) > 0
                        ):
                            problems.append(f"{name}: is not what edit {depth + 1} of the record chain implies")
            except (WeightlockError, KeyError) as e:
                problems = [getattr(e, "message", None) or f"missing original {e}"]
            if problems:
                report.add("edit_chain", FAIL, f"edit {depth + 1} of the record chain does not hold", problems)
                return
            current, depth = parent, depth + 1
    report.add("edit_chain", PASS, f"{depth - 1} earlier edit(s) recomputed from their own locks and originals")


def _parent_problems(checkpoint, spec, shape, child: dict, parent: dict, lock, originals_path) -> list[str]:
    """What in an earlier edit's record disagrees with its lock, its originals and the edit after it."""
    problems = _record_problems(
        checkpoint, spec, shape, parent, lock, child["original_config"], child["architecture_family"]
    )
    if problems:
        return problems
    implied = _biases_the_edit_created(spec, shape, parent) or set()
    return _originals_problems(checkpoint, {**parent, "files": {"originals": originals_path}}, implied)


def _check_card(checkpoint: Checkpoint, record: dict, report: Report) -> None:
    """The model card is what the Hub shows: it must name the lock the record names."""
    from .card import CARD_NAME, MAX_CARD_BYTES, card_lock_sha256, card_tags

    try:
        text = read_bytes(contained(checkpoint.root, CARD_NAME), "model card", MAX_CARD_BYTES).decode("utf-8")
    except (WeightlockError, UnicodeDecodeError) as e:
        report.add("model_card", FAIL, f"the model card cannot be read: {getattr(e, 'message', e)}")
        return
    named = card_lock_sha256(text)
    if named != record["lock"]["sha256"]:
        report.add(
            "model_card", FAIL, f"{CARD_NAME} names lock {named or 'none'}, the record {record['lock']['sha256']}"
        )
    elif "weightlock" not in card_tags(text):
        report.add("model_card", FAIL, f"{CARD_NAME} lacks the weightlock tag")
    else:
        report.add(
            "model_card", PASS, f"{CARD_NAME} names lock {record['lock']['sha256'][:12]} and carries the weightlock tag"
        )


def _biases_the_edit_created(target, shape: ModelShape, record: dict) -> set[str] | None:
    """Every bias the output class has that the source class did not (by the source family and its original
    config, which the provenance check has tied to config.json): the edit created these, as zeros or as a
    lock's product, so each is checked whatever the record's lists say. None for an unknown family."""
    try:
        source = family(record["architecture_family"])
    except StopIteration:
        return None
    if source.bias_on(record["original_config"]):
        return set()
    names = set()
    for layer in range(shape.num_layers):
        always = {source.module(m, layer) for m in source.always_biased}
        for module in [target.output_module(layer)] + [target.module(c.module, layer) for c in target.bias_companions]:
            if module not in always:
                names.add(f"{module}.bias")
    return names


def _check_lock_biases(
    checkpoint: Checkpoint, spec, shape: ModelShape, lock, record: dict, names: list[str], report: Report, expected
) -> None:
    """Stored biases equal what the lock implies: original (or zero) + W_o @ d, recomputed from the stored
    o_proj weights. ``expected`` (apply's own values) adds a byte-for-byte comparison; it never replaces
    the recomputation, so apply's check before publishing is this same check."""
    with np.errstate(over="ignore", invalid="ignore"):
        displacements = lock.displacements(record["alpha"], shape.num_heads)
    originals = {}
    if record["files"]["originals"]:
        originals = read_header(contained(checkpoint.root, record["files"]["originals"])).tensors
    expected_raw = {c.planned.name: c.raw for c in expected} if expected is not None else None
    with TensorReaders() as reader:
        mismatches = _bias_mismatches(checkpoint, spec, shape, names, originals, displacements, expected_raw, reader)
    how = "recomputed from the stored o_proj weights and the recorded lock" + (
        ", and byte for byte against the values apply computed" if expected is not None else ""
    )
    if mismatches:
        report.add("lock_biases", FAIL, f"{len(mismatches)} bias tensors are not what the lock implies", mismatches)
    else:
        report.add("lock_biases", PASS, f"{len(names)} bias tensors equal the recorded edit ({how})")


def _bias_mismatches(checkpoint, spec, shape, names, originals, displacements, expected_raw, reader) -> list[str]:
    """Why each of ``names`` differs from original (or zero) + W_o @ d, rounded to its dtype (empty: none)."""
    layer_of = {spec.output_bias(layer): layer for layer in range(shape.num_layers)}
    mismatches = []
    try:
        for name in names:
            stored = checkpoint.tensors[name]
            if len(stored.shape) != 1 or stored.dtype not in FLOAT_DTYPES:
                mismatches.append(f"{name}: a bias must be a float vector, found {stored.dtype} {list(stored.shape)}")
                continue
            if expected_raw is not None and reader[stored].read_bytes(stored) != expected_raw.get(name):
                mismatches.append(f"{name}: stored bytes differ from the computed bias")
                continue
            values = np.zeros(stored.numel, dtype=np.float32)
            if name in originals:
                original = originals[name]
                if original.shape != stored.shape or original.dtype not in FLOAT_DTYPES:
                    mismatches.append(
                        f"{name}: the recorded original has shape {list(original.shape)} "
                        f"{original.dtype}, the stored bias {list(stored.shape)}"
                    )
                    continue
                values += reader[original].read_float32(original)
            layer = layer_of.get(name)
            if layer is not None and layer in displacements:
                weight = stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer))
                if weight is None or weight.shape != (stored.shape[0], shape.attention_width):
                    mismatches.append(
                        f"{name}: no o_proj weight of shape {[stored.shape[0], shape.attention_width]}"
                        " to recompute it from"
                    )
                    continue
                with np.errstate(over="ignore", invalid="ignore"):
                    values += weight_product(reader, weight, displacements[layer], shape.head_dim)
            with np.errstate(over="ignore", invalid="ignore"):
                rounded = raw_to_float32(float32_to_raw(values, stored.dtype), stored.dtype)
            actual = reader[stored].read_float32(stored)
            if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(rounded))):
                mismatches.append(f"{name}: holds or implies NaN/Inf")
                continue
            tolerance = DTYPE_EPS[stored.dtype] * (np.abs(rounded) + 1e-3 * float(np.abs(rounded).max(initial=0)))
            worst = float(np.max(np.abs(actual - rounded) - tolerance, initial=-1.0))
            if worst > 0:
                mismatches.append(
                    f"{name}: differs from the recorded edit by up to {float(np.max(np.abs(actual - rounded))):.3g}"
                )
    except WeightlockError as e:
        mismatches.append(e.message)
    return mismatches


def _check_finite(checkpoint: Checkpoint, report: Report, deep: bool) -> None:
    if deep:
        names = [n for n, e in checkpoint.tensors.items() if e.dtype in FLOAT_DTYPES]
    else:
        # the record is schema-valid (open_checkpoint checked it) or absent
        written = (checkpoint.provenance or {}).get("tensors") or {}
        names = [n for n in written.get("added", []) + written.get("replaced", []) if n in checkpoint.tensors]
    bad = []
    with TensorReaders() as readers:
        for name in names:
            entry = checkpoint.tensors[name]
            if len(entry.shape) >= 2:  # in row blocks, as 2-D: memory stays at one block at any size
                rows = math.prod(entry.shape[:-1])
                flat = dataclasses.replace(entry, shape=(rows, entry.shape[-1]))
                finite = all(np.all(np.isfinite(block)) for _, block in readers[entry].row_blocks(flat))
            else:
                finite = bool(np.all(np.isfinite(readers[entry].read_float32(entry))))
            if not finite:
                bad.append(name)
    scope = "every floating-point tensor" if deep else "the tensors weightlock wrote"
    if bad:
        report.add("finite", FAIL, f"NaN or Inf in {len(bad)} tensors", bad)
    elif names:
        report.add("finite", PASS, f"{scope} ({len(names)}) hold only finite values")
    else:
        report.add("finite", SKIP, "no tensors written by weightlock to scan (use --deep to scan all)")


def _check_loader_names(checkpoint: Checkpoint, report: Report) -> None:
    try:
        import torch
        import transformers
    except ImportError:
        report.add(
            "transformers_names", SKIP, "transformers is not installed; install weightlock[forge] to check loader names"
        )
        return
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(str(checkpoint.root))
        unloadable = None
        try:
            quantizer, config = _quantizer_as_loaded(config)
        except ImportError as e:
            # a format weightlock reads that transformers cannot load here (AWQ and GPTQ need gptqmodel,
            # compressed-tensors its library): the names are checked with the layers unquantized
            unloadable = _known_quantization(checkpoint)
            if unloadable is None:
                raise
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            del config.quantization_config
            quantizer = None
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
            if quantizer is not None:  # from_pretrained swaps in quantized modules before loading, so do we
                with contextlib.redirect_stderr(io.StringIO()):  # compressed-tensors draws progress bars
                    quantizer.preprocess_model(
                        model=model, dtype=torch.bfloat16, device_map=None, checkpoint_files=None, use_kernels=False
                    )
    except Exception as e:  # an unknown or custom architecture, or a broken config
        report.add(
            "transformers_names", FAIL, f"transformers cannot build a model for this config: {type(e).__name__}: {e}"
        )
        return
    finally:
        transformers.logging.set_verbosity(previous)
    params = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored, converted = _names_as_loaded(model, params, checkpoint, quantizer)
    if unloadable is not None:
        stored = _quantized_as_unquantized(stored, checkpoint, unloadable)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = _patterns(getattr(model, "_keys_to_ignore_on_load_missing", None))
    ignore_unexpected = _patterns(getattr(model, "_keys_to_ignore_on_load_unexpected", None))

    extra = set(stored) - set(params)
    unexpected = sorted(n for n in extra if not ignore_unexpected(n))
    ignored = sorted(n for n in extra if ignore_unexpected(n))
    missing = []
    for name in sorted(set(params) - set(stored)):
        partner = tied.get(name) or next((t for t, s in tied.items() if s == name), None)
        if (partner is not None and partner in stored) or ignore_missing(name):
            continue
        missing.append(name)
    wrong_shape = sorted(
        f"{n}: checkpoint {list(stored[n])}, model {list(params[n])}"
        for n in set(stored) & set(params)
        if stored[n] != params[n] and n not in converted
    )
    details = (
        [f"unexpected (transformers would drop it): {n}" for n in unexpected]
        + [f"missing (transformers would initialise it at random): {n}" for n in missing]
        + [f"shape mismatch {s}" for s in wrong_shape]
    )
    cls = type(model).__name__
    if details:
        report.add(
            "transformers_names",
            FAIL,
            f"{cls} would not load this checkpoint as stored "
            f"({len(unexpected)} unexpected, {len(missing)} missing, "
            f"{len(wrong_shape)} wrong shape)",
            details,
        )
    elif ignored:
        report.add(
            "transformers_names",
            WARN,
            f"{cls} loads every tensor it has, but drops {len(ignored)} stored tensors its class lists as ignorable",
            ignored,
        )
    else:
        quantized = ""
        if unloadable is not None:
            quantized = f", its {unloadable.format.name} layers as their unquantized shapes (here: {why})"
        report.add(
            "transformers_names",
            PASS,
            f"the tensor names and shapes are exactly those {cls} (transformers {transformers.__version__}) "
            f"loads{quantized}",
        )


def _check_vllm_loading(checkpoint: Checkpoint, report: Report) -> None:
    """``--engine vllm``: without vLLM, exit 7; where this machine's vLLM build cannot run the checkpoint's
    layers (int4 without AVX-512), the check is reported not run, with the reason, and the report is not ok."""
    from .vllm_check import AVX512_HINT, check_vllm_loading

    try:
        result = check_vllm_loading(checkpoint)
    except MissingDependencyError:
        raise
    except WeightlockError as e:
        report.add("vllm_load", FAIL, e.message)
        return
    where = f"vLLM {result.vllm_version} {result.model_class}"
    if result.ok and result.cannot_run_here:  # what was asked (does vLLM serve it?) cannot be shown here
        report.add(
            "vllm_load",
            NOT_RUN,
            f"cannot run on this machine: {'; '.join(result.cannot_run_here)}. The tensor names do load into "
            f"{where}, but vLLM cannot serve this checkpoint here; {AVX512_HINT}",
        )
        return
    if result.ok:
        report.add("vllm_load", PASS, f"{where} loads every tensor and every parameter is filled")
        return
    details = (
        [f"dropped (vLLM skips it silently): {n}" for n in result.dropped]
        + [f"rejected: {n}" for n in result.rejected]
        + [f"not filled: {n}" for n in result.unfilled]
    )
    report.add(
        "vllm_load",
        FAIL,
        f"{where} would not load this checkpoint as stored ({len(result.dropped)} "
        f"dropped, {len(result.rejected)} rejected, {len(result.unfilled)} unfilled)",
        details,
    )


def _known_quantization(checkpoint: Checkpoint):
    """The quantization settings of a checkpoint in a format weightlock reads; None otherwise."""
    try:
        return quantization_of(checkpoint.config)
    except WeightlockError:
        return None


def _quantized_as_unquantized(stored: dict, checkpoint: Checkpoint, settings) -> dict:
    """Stored names with each quantized layer's tensors replaced by the ``.weight`` of its logical shape."""
    fmt = settings.format
    out = dict(stored)
    for name in [n for n in stored if n.endswith(f".{fmt.marker}")]:
        module = name.removesuffix(f".{fmt.marker}")
        try:
            layer = quantized_linear(checkpoint.tensors, module, settings)
        except WeightlockError:
            continue  # left as stored: reported as unexpected
        for suffix in fmt.tensors + fmt.optional:
            out.pop(f"{module}.{suffix}", None)
        out[f"{module}.weight"] = layer.shape
    return out


def _quantizer_as_loaded(config):
    """The quantizer from_pretrained would use for a config that declares its quantization (it decides, e.g.,
    that MXFP4 experts are dequantized on a machine without Triton), and the config as it adjusts it; none
    for an unquantized config. Internal API of transformers 5; without it names are compared unquantized."""
    if getattr(config, "quantization_config", None) is None:
        return None, config
    try:
        from transformers.quantizers.auto import get_hf_quantizer
    except ImportError:
        return None, config
    quantizer, config, _ = get_hf_quantizer(config, None, None, True, {})
    return quantizer, config


def _names_as_loaded(model, params: dict, checkpoint: Checkpoint, quantizer=None) -> tuple[dict, set]:
    """Checkpoint names as transformers renames them on load (v5 saves e.g. GPT-NeoX's lm_head as
    embed_out and renames it back), and the names a converter reshapes or dequantizes (their shapes are
    not compared)."""
    stored = {name: entry.shape for name, entry in checkpoint.tensors.items()}
    try:  # internal API of transformers 5; without it names are compared as stored
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    except (ImportError, AttributeError, TypeError):
        return stored, set()
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed, converted = {}, set()
    for name, shape in stored.items():
        new_name, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        renamed[new_name] = shape
        if converter is not None:
            converted.add(new_name)
    return renamed, converted


def _patterns(patterns):
    if not patterns:
        return lambda name: False
    regex = re.compile("|".join(f"({p})" for p in patterns))
    return lambda name: regex.search(name) is not None


def locked_summary(record: dict, lock) -> dict:
    """The report's ``locked`` entry, from a record (folder or GGUF) whose lock was checked: ``alpha`` is the
    newest edit's, ``net_alpha`` what its lock nets to over the record chain (``net_alphas``: every lock's)."""
    from .records import chain_length, net_alphas

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
    from .records import chain_length, net_alphas

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
    from .records import chain_length, net_alphas

    line = f"lock {record['lock']['sha256'][:12]} at alpha {record['alpha']}"
    if chain_length(record) > 1:
        line += f" (the chain's edits net to alpha {net_alphas(record)[record['lock']['sha256']]:g})"
    return line


def output_failure(report: Report, source, loader_check: bool, done: str) -> WeightlockError:
    """The error for an output that failed verification. When the source fails the same checks the input is at
    fault (exit 3: apply refuses what verify would refuse); otherwise it is a bug or a disk fault (exit 6)."""
    return failure_against_source(report, verify_checkpoint(source, loader_check=loader_check), source, done)


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
