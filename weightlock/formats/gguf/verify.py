"""``verify`` and ``inspect`` for GGUF files.

The record in the metadata (``weightlock.edit``) and the lock bytes beside it
(``weightlock.core.lock``) are read like any other input: bounded, schema-checked, the lock
hash compared. Which biases hold the lock follows from the lock, not from the record's
lists; each is recomputed from the stored (dequantized) ``attn_output.weight`` and the
recorded original, and compared with what the file holds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from weightlock.core.lock import Lock, load_lock
from weightlock.core.records import chain_length
from weightlock.core.report import (
    DTYPE_EPS,
    FAIL,
    NO_ENGINES,
    NO_ORIGINALS,
    ORIGINALS_CHECK,
    PASS,
    SKIP,
    SOURCE_HINT,
    WARN,
    EngineChecks,
    Report,
    check_net_lock,
    failure_against_source,
    locked_summary,
    provenance_line,
    traces_without_record,
)
from weightlock.errors import CheckpointError, LockFormatError, WeightlockError
from weightlock.formats.gguf.architectures import (
    BIAS_EXISTING,
    OUTPUT_BIAS,
    OUTPUT_WEIGHT,
    architecture_row,
    gguf_architecture,
    layer_tensor_pattern,
)
from weightlock.formats.gguf.edit import BIAS_TYPES, F16, F32, GGUFComputedBias, gguf_shape, weight_product
from weightlock.formats.gguf.file import SPLIT_TENSORS_KEY, GGUFModel, can_dequantize, open_gguf, tensor_readers
from weightlock.formats.gguf.record import (
    LOCK_KEY,
    PARENT_LOCK_KEY,
    RECORD_KEY,
    embedded_bytes,
    is_our_key,
    read_record,
)
from weightlock.formats.gguf.rewrite import ARCHITECTURE_KEY, expected_permutations, permuted_chunks
from weightlock.io.untrusted import check_schema

BIAS_NAME = layer_tensor_pattern(OUTPUT_BIAS)
EPS = {F32: DTYPE_EPS["F32"], F16: DTYPE_EPS["F16"]}


def _embedded_lock(model: GGUFModel, key: str, record: dict) -> Lock:
    if model.metadata.get(key) is None:
        raise LockFormatError(
            f"{model.path.name} has a weightlock record but no {key} array of bytes",
            hint="the file was edited by something else; lock the original model again",
        )
    data = embedded_bytes(model, key)
    if hashlib.sha256(data).hexdigest() != record["lock"]["sha256"]:
        raise LockFormatError(
            f"{model.path.name}: the embedded lock {key} does not match the recorded lock hash",
            hint="the file was edited by something else; lock the original model again",
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lock.wlock"
        path.write_bytes(data)
        return load_lock(path)


def record_lock(model: GGUFModel, record: dict) -> Lock:
    """The lock the record names, from the file's own copy of its bytes (hash checked)."""
    return _embedded_lock(model, LOCK_KEY, record)


def _original(name: str, record: dict, width: int, type_id: int) -> np.ndarray | None:
    """A replaced bias's recorded original bytes as float32 (None when the edit created the bias)."""
    replaced = record["tensors"]["replaced"].get(name)
    if replaced is None:
        return None
    try:
        raw = base64.b64decode(replaced["data"], validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(
            f"the recorded original of {name} is not base64",
            hint="the record was edited; lock the original model again",
        ) from None
    if replaced["type"] != type_id or len(raw) != width * np.dtype(BIAS_TYPES[type_id]).itemsize:
        raise CheckpointError(
            f"the recorded original of {name} does not have the stored bias's type and width",
            hint="the record was edited; lock the original model again",
        )
    return np.frombuffer(raw, dtype=BIAS_TYPES[type_id]).astype(np.float32)


def _record_problems(record: dict, lock: Lock, shape, architecture, present: dict[str, int]) -> list[str]:
    """What in an edit record disagrees with its embedded lock and with the biases present when it was made
    (``present``: name -> ggml type). Empty: the record describes this lock's edit of this file."""
    lock.check_compatible(shape)
    if record["architecture"] != architecture.name:
        return [f"the record names architecture {record['architecture']!r}, the file is {architecture.name}"]
    if record["lock"]["manifest"] != json.loads(json.dumps(lock.manifest())):
        return ["the record's description of the lock (lock.manifest) is not the embedded lock's"]
    if not isinstance(record["alpha"], (int, float)) or not math.isfinite(record["alpha"]):
        return [f"the recorded alpha {record['alpha']!r} is not a finite number"]
    heads = lock.heads_by_layer()
    if record["locked_layers"] != {str(layer): h for layer, h in heads.items()}:
        return ["the record's locked layers are not the lock's"]
    added, replaced = set(record["tensors"]["added"]), set(record["tensors"]["replaced"])
    locked = {OUTPUT_BIAS.format(layer=layer) for layer in heads}
    if added | replaced != locked or added & replaced or len(added) != len(record["tensors"]["added"]):
        differ = sorted((added | replaced) ^ locked)
        return ["the record's added and replaced biases are not the lock's layers", *differ]
    if added and architecture.bias == BIAS_EXISTING:
        return [f"llama.cpp's {architecture.name} always has attn_output.bias, yet the record says the edit created"]
    absent = sorted(locked - set(present))
    if absent:
        return ["bias tensors the lock implies are missing", *absent]
    wrong = sorted(name for name, item in record["tensors"]["replaced"].items() if item["type"] != present[name])
    if wrong:
        return ["the recorded originals do not have the stored biases' types", *wrong]
    return []


def open_source_gguf(source, path) -> GGUFModel:
    """``verify --source`` for a GGUF file: the source model (headers only), refused (exit 3) when it cannot be
    opened, is not a GGUF file, or is the file being verified."""
    from weightlock.core.report import WRONG_SOURCE_HINT, source_error
    from weightlock.formats.gguf.file import is_gguf_path

    if isinstance(source, GGUFModel):
        opened = source
    else:
        if not is_gguf_path(source):
            raise source_error(source, "is not a .gguf file; the checkpoint verified is a GGUF file")
        try:
            opened = open_gguf(source)
        except WeightlockError as e:
            raise source_error(source, e.message, e.hint or WRONG_SOURCE_HINT) from None
    try:
        same = any(f.path.resolve() == Path(path).resolve() or f.path.samefile(path) for f in opened.files)
    except OSError:
        same = False
    if same:
        raise source_error(source, "is the file being verified, not the model the lock was applied to")
    return opened


def _refuse_same_files(source: GGUFModel, model: GGUFModel) -> None:
    """Refuse a source sharing a file with the model verified (any part of a split set, through any symlink):
    the folder the file lies in is no part of a GGUF model, so only the same files are refused."""
    from weightlock.core.report import source_error

    ours = {os.path.realpath(f.path) for f in model.files}
    shared = sorted(f.path.name for f in source.files if os.path.realpath(f.path) in ours)
    if shared:
        raise source_error(
            source.path,
            f"shares {', '.join(shared)} with the file being verified, not the model the lock was applied to",
        )


def verify_gguf(
    path,
    *,
    expected: list[GGUFComputedBias] | None = None,
    deep: bool = False,
    source=None,
    report: Report | None = None,
    engines: EngineChecks = NO_ENGINES,
) -> Report:
    """Every check on a GGUF model (``path``: the file, or the first of a split set). ``deep``: also dequantize
    every tensor and scan it for NaN/Inf (reads the whole model, one row block at a time). ``source``: the model
    the lock was applied to (a .gguf path or an open GGUFModel): the root edit's originals are compared with its
    stored biases byte for byte; without it, originals of biases the source had are unverifiable."""
    if source is not None:
        source = open_source_gguf(source, path)
    report = Report(str(path)) if report is None else report
    try:
        model = open_gguf(path)
    except WeightlockError as e:
        report.add("gguf", FAIL, e.message)
        return report
    if source is not None:
        _refuse_same_files(source, model)
    report.add(
        "gguf",
        PASS,
        f"{model.split_count} file(s), GGUF v{model.files[0].version}: header, {len(model.tensors)} tensor infos, "
        "offsets (consecutive and aligned) and split set consistent",
    )
    biases = {name: t for name, t in model.tensors.items() if name.endswith(".attn_output.bias")}
    try:
        architecture = gguf_architecture(model.text("general.architecture"))
        shape = gguf_shape(model, architecture)
    except WeightlockError as e:
        status = FAIL if biases else WARN
        report.add("architecture", status, e.message + ("" if biases else "; no attention-output biases to check"))
        return report
    report.add(
        "architecture",
        PASS,
        f"llama.cpp {architecture.name}: {shape.num_layers} layers, {shape.num_heads} heads of {shape.head_dim}; "
        + ("its graph adds blk.N.attn_output.bias when present" if architecture.bias else ""),
    )
    _check_bias_tensors(model, shape, architecture, biases, report)
    for serving_check in engines.serving:  # which engines apply the bias (data), passed in by weightlock.api
        serving_check(model, architecture, shape, report)
    _check_record(model, shape, architecture, biases, report, expected, source)
    if deep:
        _check_all_finite(model, report)
    for loading_check in engines.loading:  # an engine's own loader (llama.cpp), passed in by weightlock.api
        loading_check(model, report)
    return report


def _check_bias_tensors(model, shape, architecture, biases, report) -> None:
    problems = []
    layers_with_bias = set()
    with tensor_readers(model) as readers:
        for name, tensor in sorted(biases.items()):
            match = BIAS_NAME.fullmatch(name)
            if match is None or int(match.group(1)) >= shape.num_layers:
                problems.append(f"{name}: not a bias of a layer of this {shape.num_layers}-layer model")
                continue
            layers_with_bias.add(int(match.group(1)))
            if tensor.dims != (shape.hidden_size,) or tensor.type_id not in BIAS_TYPES:
                problems.append(
                    f"{name}: {tensor.type_name} {list(tensor.dims)}, expected F32/F16 [{shape.hidden_size}]"
                )
                continue
            if not np.all(np.isfinite(readers[tensor.file_index].read_vector(tensor))):
                problems.append(f"{name}: holds NaN or Inf")
    if architecture.bias == BIAS_EXISTING:
        missing = sorted(set(range(shape.num_layers)) - layers_with_bias)
        if missing:
            problems.append(f"llama.cpp's {architecture.name} requires attn_output.bias; layers {missing[:10]} lack it")
    if problems:
        report.add("bias tensors", FAIL, f"{len(problems)} attention-output bias problem(s)", problems)
    else:
        report.add(
            "bias tensors", PASS, f"{len(biases)} attn_output.bias tensor(s): F32/F16, [{shape.hidden_size}], finite"
        )


def gguf_traces(model: GGUFModel) -> list[str]:
    """The metadata keys weightlock's GGUF writer (edit.py) may leave: every key under their common prefix."""
    prefix = os.path.commonprefix([RECORD_KEY, LOCK_KEY, PARENT_LOCK_KEY])
    return sorted(key for key in model.metadata if key.startswith(prefix))


def _keys_of_chain(record: dict) -> set[str]:
    """The weightlock metadata keys a record chain implies: its record, its lock and each earlier edit's lock
    (parent_lock.1 .. parent_lock.<edits-1>); edit.py writes exactly these."""
    return {RECORD_KEY, LOCK_KEY} | {PARENT_LOCK_KEY.format(k) for k in range(1, chain_length(record))}


def _check_record(model, shape, architecture, biases, report, expected, source=None) -> None:
    """The record chain against the file: each edit's record is its embedded lock's, and every
    attn_output.bias in the file is the root's (what the source had, where llama.cpp's architecture
    has one) plus each recorded edit's W_o @ d, recomputed edit by edit from the stored weights.
    ``expected`` (apply's own values, computed from the source it read) adds a byte comparison
    for the newest edit; an earlier claim the file cannot prove is then a warning, not a failure."""
    try:
        record = read_record(model)
    except WeightlockError as e:
        report.add("provenance", FAIL, e.message)
        return
    if record is None:
        traces = gguf_traces(model)
        if traces:
            shown = "metadata " + ", ".join(traces[:10])
            traces_without_record(report, shown, RECORD_KEY, sorted(biases), "attn_output")
        else:
            report.add("provenance", SKIP, f"no {RECORD_KEY} metadata: not locked by weightlock")
        return
    unnamed = sorted(set(gguf_traces(model)) - _keys_of_chain(record))
    if unnamed:
        report.add(
            "provenance",
            FAIL,
            f"the file carries weightlock metadata no record of its {chain_length(record)}-edit chain names",
            unnamed[:20],
        )
        return
    present = {name: t.type_id for name, t in biases.items() if t.type_id in BIAS_TYPES}
    try:
        lock = record_lock(model, record)
        problems = _record_problems(record, lock, shape, architecture, present)
    except WeightlockError as e:
        report.add("provenance", FAIL, f"the recorded lock cannot be used: {e.message}")
        return
    if problems:
        report.add("provenance", FAIL, problems[0], problems[1:])
        return
    report.locked = locked_summary(record, lock)
    report.add("provenance", PASS, f"{provenance_line(record)} (embedded lock and its description match)")
    check_net_lock(record, report)
    expected_raw = {c.planned.name: c.raw for c in expected} if expected is not None else None
    with tensor_readers(model) as readers:
        values = {}
        for name in present:
            if BIAS_NAME.fullmatch(name) and biases[name].dims == (shape.hidden_size,):
                values[name] = (readers[biases[name].file_index].read_raw(biases[name]), biases[name].type_id)
        mismatches = _edit_mismatches(model, shape, record, lock, values, readers, expected_raw)
        if mismatches:
            report.add("lock biases", FAIL, f"{len(mismatches)} bias(es) are not what the record implies", mismatches)
        else:
            how = "byte-identical to the computed values" if expected is not None else "recomputed from the weights"
            report.add("lock biases", PASS, f"{len(record['locked_layers'])} locked bias(es) {how}")
        _check_chain(
            model, shape, architecture, record, values, readers, report, trusted=expected is not None, source=source
        )


def _before(record: dict, values: dict) -> tuple[dict, list[str]]:
    """The biases as they were before the edit ``record`` describes: those it added gone, those it replaced
    their recorded originals (problems: originals that are not base64 of the stored width)."""
    before = {name: v for name, v in values.items() if name not in record["tensors"]["added"]}
    problems = []
    for name, item in record["tensors"]["replaced"].items():
        try:
            raw = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"the recorded original of {name} is not base64")
            continue
        stored = values.get(name)
        if stored is None or len(raw) != len(stored[0]):
            problems.append(f"the recorded original of {name} does not have the stored bias's width")
            continue
        before[name] = (raw, item["type"])
    return before, problems


def _check_chain(model, shape, architecture, record, values, readers, report, *, trusted: bool, source=None) -> None:
    """Each earlier edit recomputed from its own embedded lock, then the root: what no edit explains must be
    biases llama.cpp's architecture always has (the source's); anything else cannot be verified."""
    unproven = WARN if trusted else FAIL  # apply read the source itself; verify has only the file
    depth, current = 1, record
    while True:
        values, problems = _before(current, values)
        if problems:
            report.add("edit chain", FAIL, f"edit {depth} of the record chain is inconsistent", problems)
            return
        parent = current["parent"]
        if parent is not None and current.get("rewrite") is not None:
            report.add(
                "edit chain",
                FAIL,
                f"edit {depth} of the record chain claims a rewrite, but only a file's first edit rewrites it",
            )
            return
        if parent is None:
            if model.metadata.get(PARENT_LOCK_KEY.format(depth)) is not None:
                report.add("edit chain", FAIL, f"the file carries the lock of an edit {depth + 1} no record names")
                return
            break
        where = f"{model.path.name}: the parent record of edit {depth}"
        depth += 1
        try:
            check_schema(parent, "gguf-edit", where)
        except WeightlockError as e:
            report.add("edit chain", FAIL, e.message)
            return
        key = PARENT_LOCK_KEY.format(depth - 1)
        if model.metadata.get(key) is None:
            report.add(
                "edit chain",
                unproven,
                f"unverifiable: the record chain has {depth - 1}+ edits but the file does not carry the lock of "
                f"edit {depth} ({key}), so the biases it claims before the newest edit cannot be recomputed",
                ["relock the original model with this weightlock, which embeds every lock of the chain"],
            )
            return
        try:
            lock = _embedded_lock(model, key, parent)
            problems = _record_problems(parent, lock, shape, architecture, {n: v[1] for n, v in values.items()})
            if not problems:
                problems = _edit_mismatches(model, shape, parent, lock, values, readers, None)
        except WeightlockError as e:
            problems = [e.message]
        if problems:
            report.add("edit chain", FAIL, f"edit {depth} of the record chain does not hold", problems)
            return
        current = parent
    root = sorted(values, key=lambda n: int(n.split(".")[1]))
    source_architecture = _check_rewrite(model, shape, architecture, current.get("rewrite"), report, source)
    if source is not None:
        report.add("edit chain", PASS, f"{depth} edit(s) recomputed from their embedded locks")
        _compare_with_source(source, source_architecture, values, report)
    elif architecture.bias == BIAS_EXISTING:
        report.add("edit chain", PASS, f"{depth} edit(s) recomputed from their embedded locks")
        report.add(
            ORIGINALS_CHECK,
            WARN if trusted else FAIL,
            f"unverifiable: the {len(root)} attn_output.bias originals before the first edit are claimed to be the "
            f"source's (llama.cpp's {architecture.name} always has them); only the source can confirm their values",
            [f"hint: {SOURCE_HINT}"],
        )
    elif root:
        report.add(
            "edit chain",
            unproven,
            f"unverifiable: {len(root)} attn_output.bias tensor(s) are not explained by the {depth} recorded "
            f"edit(s); llama.cpp's {architecture.name} files have them only when the source had them, which the "
            "file cannot prove",
            [*root[:10], f"hint: {SOURCE_HINT}, or lock the original model again"],
        )
    else:
        report.add("edit chain", PASS, f"every attn_output.bias is explained by the {depth} recorded edit(s)")


def _check_rewrite(model, shape, architecture, rewrite: dict | None, report: Report, source) -> str:
    """A first edit that rewrote the file as another architecture (``rewrite``, from its record): the claim
    against the rule and the file (no key of the old prefix left; the renamed keys exactly the file's keys of
    the new prefix; exactly the Q/K tensors the rule permutes, with the file's head counts), and with the
    source, every permuted tensor and every key against the source's bytes. Returns the architecture the
    source must have."""
    if rewrite is None:
        return architecture.name
    row = architecture_row(rewrite["from"])
    rule = row.rewrite if row is not None else None
    what = f"rewritten from {rewrite['from']} as {rewrite['to']}"
    if rule is None or rule.target != rewrite["to"] or rule.target != architecture.name:
        report.add("rewrite", FAIL, f"the record says the file was {what}; weightlock makes no such rewrite")
        return str(rewrite["from"])
    old, new = f"{rule.source}.", f"{rule.target}."
    problems = [f"{key}: a key of the old architecture" for key in sorted(model.metadata) if key.startswith(old)]
    claimed = rewrite["renamed_keys"]
    problems += [f"{key}: recorded as renamed, but not a {old}* key" for key in claimed if not key.startswith(old)]
    implied = {old + key[len(new) :] for file in model.files for key in file.metadata if key.startswith(new)}
    if len(set(claimed)) != len(claimed) or set(claimed) != implied:
        problems.append(
            f"the recorded renamed keys ({len(claimed)}) are not the file's {len(implied)} {new}* keys "
            f"under their {old} names"
        )
    expected = expected_permutations(model, shape, rule)
    recorded = rewrite["permuted"]
    if set(recorded) != set(expected) or any(
        type(recorded[n]) is not int or recorded[n] != g for n, g in expected.items()
    ):
        problems.append("the recorded permuted tensors are not the Q/K tensors of this file the rewrite permutes")
    if not problems and source is not None:
        problems = _rewrite_against_source(model, source, rule, expected, implied)
    if problems:
        report.add("rewrite", FAIL, f"the file was {what}, but {len(problems)} thing(s) disagree", problems[:20])
    elif source is not None:
        report.add(
            "rewrite",
            PASS,
            f"{what}: {len(expected)} Q/K tensors are the source's rows permuted for the {rule.target} graph's "
            f"RoPE, byte for byte; its metadata is the source's, {len(implied)} keys renamed",
        )
    else:
        report.add(
            "rewrite",
            PASS,
            f"the record says the file was {what}: its {len(expected)} Q/K tensors and {len(implied)} {new}* keys "
            "are what that rewrite leaves; that they are the source's rows and values only --source proves",
        )
    return rule.source


def _value_bytes(fd: int, entry) -> bytes:
    start = entry.start + 8 + len(entry.key.encode("utf-8"))
    return os.pread(fd, entry.end - start, start)


def _rewrite_against_source(
    model: GGUFModel, source: GGUFModel, rule, permuted: dict[str, int], renamed: set[str]
) -> list[str]:
    """Every permuted tensor is the source's with its rows permuted (``permuted``: name -> head groups, from
    the file's own shape), and each file's metadata is its source file's, key for key and byte for byte, but
    for the ``renamed`` keys (under the new prefix), the architecture (the target) and weightlock's own."""
    from weightlock.core.report import source_error
    from weightlock.io.untrusted import open_regular

    if source.text(ARCHITECTURE_KEY) != rule.source or source.split_count != model.split_count:
        raise source_error(source.path, f"is not the {rule.source} model of {model.split_count} file(s) rewritten")
    problems = []
    with tensor_readers(source) as theirs, tensor_readers(model) as ours:
        for name, groups in permuted.items():
            stored, original = model.tensors[name], source.tensors.get(name)
            if original is None or (original.dims, original.type_id) != (stored.dims, stored.type_id):
                problems.append(f"{name}: the source has no tensor of this type and shape")
                continue
            # head by head (the permutation never leaves a head): small reads, nothing the size of the tensor
            source_reader, stored_reader = theirs[original.file_index], ours[stored.file_index]
            position = 0
            for chunk in permuted_chunks(functools.partial(source_reader.read_span, original), original, groups):
                if stored_reader.read_span(stored, position, len(chunk)) != chunk:
                    problems.append(f"{name}: not the source's rows permuted")
                    break
                position += len(chunk)
    skipped = (ARCHITECTURE_KEY, SPLIT_TENSORS_KEY)
    for index, (file, theirs_file) in enumerate(zip(model.files, source.files, strict=True)):
        fds = open_regular(file.path, "GGUF file"), open_regular(theirs_file.path, "GGUF file")
        try:
            as_renamed = {
                (rule.target + key[len(rule.source) :] if key in renamed else key): entry
                for key, entry in theirs_file.metadata.items()
                if not is_our_key(key) and key not in skipped
            }
            kept = {key: entry for key, entry in file.metadata.items() if not is_our_key(key) and key not in skipped}
            problems += [
                f"{key} (file {index + 1}): the source has no such key"
                for key in sorted(kept.keys() - as_renamed.keys())
            ]
            problems += [f"{key} (file {index + 1}): missing" for key in sorted(as_renamed.keys() - kept.keys())]
            for key in sorted(kept.keys() & as_renamed.keys()):
                mine, theirs_entry = kept[key], as_renamed[key]
                if mine.value_type != theirs_entry.value_type or _value_bytes(fds[0], mine) != _value_bytes(
                    fds[1], theirs_entry
                ):
                    problems.append(f"{key} (file {index + 1}): not the source's value")
        finally:
            for fd in fds:
                os.close(fd)
    if model.text(ARCHITECTURE_KEY) != rule.target:
        problems.append(f"{ARCHITECTURE_KEY} is not {rule.target}")
    return problems


def _compare_with_source(source: GGUFModel, source_architecture: str, values: dict, report: Report) -> None:
    """``--source``: the biases before the first edit (``values``: name -> (raw, type)) are the source's stored
    attn_output.bias tensors, byte for byte, and the source has no other."""
    from weightlock.core.report import source_error

    if source.text(ARCHITECTURE_KEY) != source_architecture:
        raise source_error(source.path, f"is a {source.text(ARCHITECTURE_KEY)} model, not {source_architecture}")
    theirs = {name: t for name, t in source.tensors.items() if name.endswith(".attn_output.bias")}
    problems = []
    with tensor_readers(source) as readers:
        for name, (raw, type_id) in sorted(values.items()):
            tensor = theirs.get(name)
            if tensor is None or tensor.type_id != type_id or tensor.nbytes != len(raw):
                found = "none" if tensor is None else f"{tensor.type_name} {list(tensor.dims)}"
                raise source_error(source.path, f"the record claims an original {name}; the source has {found}")
            if readers[tensor.file_index].read_raw(tensor) != raw:
                problems.append(f"{name}: the recorded original differs from the source's")
    problems += [
        f"{name}: the source has it, yet the record says an edit created it" for name in theirs if name not in values
    ]
    if problems:
        report.add(ORIGINALS_CHECK, FAIL, f"{len(problems)} recorded original(s) are not the source's biases", problems)
    elif not values:
        report.add(ORIGINALS_CHECK, PASS, f"{NO_ORIGINALS}, and the source has no attn_output.bias")
    else:
        report.add(
            ORIGINALS_CHECK,
            PASS,
            f"originals equal the source's biases ({len(values)} compared byte for byte, none other in the source)",
        )


def _edit_mismatches(model, shape, record, lock, values, readers, expected_raw) -> list[str]:
    """Why each bias the edit ``record`` locked differs from its recorded original (or zero) + W_o @ d."""
    displacements = lock.displacements(float(record["alpha"]), shape.num_heads)
    mismatches = []
    tensors = model.tensors
    locked = record["tensors"]["added"] + list(record["tensors"]["replaced"])
    for name in sorted(locked, key=lambda n: int(n.split(".")[1])):
        layer = int(name.split(".")[1])
        if name not in values:
            mismatches.append(f"{name}: not an F32/F16 bias of width {shape.hidden_size}")
            continue
        stored_raw, type_id = values[name]
        try:
            if expected_raw is not None and stored_raw != expected_raw.get(name):
                mismatches.append(f"{name}: stored bytes differ from the computed bias")
                continue
            values_f = np.zeros(shape.hidden_size, dtype=np.float32)
            original = _original(name, record, shape.hidden_size, type_id)
            if original is not None:
                values_f += original
            weight = tensors.get(OUTPUT_WEIGHT.format(layer=layer))
            if weight is None or weight.matrix_shape != (shape.hidden_size, shape.attention_width):
                mismatches.append(f"{name}: no attn_output.weight of the right shape to recompute it from")
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                values_f += weight_product(readers[weight.file_index], weight, displacements[layer], shape.head_dim)
                rounded = values_f.astype(BIAS_TYPES[type_id]).astype(np.float32)
            actual = np.frombuffer(stored_raw, dtype=BIAS_TYPES[type_id]).astype(np.float32)
            if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(rounded))):
                mismatches.append(f"{name}: holds or implies NaN/Inf")
                continue
            eps = EPS[type_id]
            tolerance = eps * (np.abs(rounded) + 1e-3 * float(np.abs(rounded).max(initial=0)))
            if float(np.max(np.abs(actual - rounded) - tolerance, initial=-1.0)) > 0:
                worst = float(np.max(np.abs(actual - rounded)))
                mismatches.append(f"{name}: differs from the recorded edit by up to {worst:.3g}")
        except WeightlockError as e:
            mismatches.append(f"{name}: {e.message}")
    return mismatches


def _check_all_finite(model: GGUFModel, report: Report) -> None:
    bad, skipped, scanned = [], [], 0
    with tensor_readers(model) as readers:
        for tensor in model.tensors.values():
            if not can_dequantize(tensor.type_id):
                skipped.append(f"{tensor.name} ({tensor.type_name})")
                continue
            # any tensor as rows of its first (contiguous) dimension: one row block in memory at a time
            rows = math.prod(tensor.dims[1:])
            flat = dataclasses.replace(tensor, dims=(tensor.dims[0] if tensor.dims else 1, rows))  # 0 dims: a scalar
            with np.errstate(invalid="ignore", over="ignore"):
                blocks = readers[tensor.file_index].matrix_row_blocks(flat)
                if not all(np.all(np.isfinite(block)) for _, block in blocks):
                    bad.append(tensor.name)
            scanned += 1
    if bad:
        report.add("finite", FAIL, f"NaN or Inf in {len(bad)} tensors", bad)
    else:
        note = f"; {len(skipped)} integer tensor(s) not scanned" if skipped else ""
        report.add("finite", PASS, f"every tensor ({scanned}) dequantizes to finite values{note}")


def output_failure_gguf(report: Report, source: GGUFModel, done: str) -> WeightlockError:
    """As for folders: the input's fault (exit 3) when the source fails the same checks, else a bug (6)."""
    return failure_against_source(report, verify_gguf(source.path), source.path, done)
