"""``verify`` and ``inspect`` for GGUF files.

The record in the metadata (``weightlock.edit``) and the lock bytes beside it
(``weightlock.lock``) are read like any other input: bounded, schema-checked, the lock
hash compared. Which biases hold the lock follows from the lock, not from the record's
lists; each is recomputed from the stored (dequantized) ``attn_output.weight`` and the
recorded original, and compared with what the file holds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import math
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InvalidInputError, LockFormatError, WeightlockError
from ..lock import Lock, load_lock
from ..untrusted import check_schema, parse_json
from ..verify import DTYPE_EPS, FAIL, PASS, SKIP, WARN, Report, failure_against_source, locked_summary
from .architectures import BIAS_EXISTING, GGUF_ARCHITECTURES, OUTPUT_BIAS, OUTPUT_WEIGHT, gguf_architecture
from .edit import BIAS_TYPES, F16, F32, LOCK_KEY, RECORD_KEY, GGUFComputedBias, gguf_shape, weight_product
from .file import STRING, ArrayValue, GGUFModel, can_dequantize, open_gguf, tensor_readers

BIAS_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,8})\.attn_output\.bias", re.ASCII)
MAX_RECORD_BYTES = 64 << 20
MAX_LOCK_BYTES = 1 << 30
ENGINES = ("llama-cpp",)
EPS = {F32: DTYPE_EPS["F32"], F16: DTYPE_EPS["F16"]}


def read_record(model: GGUFModel) -> dict | None:
    """The edit record of a locked file (None: not locked by weightlock), schema-checked."""
    entry = model.metadata.get(RECORD_KEY)
    if entry is None:
        return None
    if entry.value_type != STRING or not isinstance(entry.value, str) or len(entry.value) > MAX_RECORD_BYTES:
        raise CheckpointError(
            f"{model.path.name}: the metadata key {RECORD_KEY} is not a weightlock record",
            hint="the file was edited by something else; lock the original model again",
        )
    record = parse_json(entry.value, f"{model.path.name}: {RECORD_KEY}")
    check_schema(record, "gguf-edit", f"{model.path.name}: {RECORD_KEY}")
    return record


def record_lock(model: GGUFModel, record: dict) -> Lock:
    """The lock the record names, from the file's own copy of its bytes (hash checked)."""
    entry = model.metadata.get(LOCK_KEY)
    if entry is None or not isinstance(entry.value, ArrayValue) or entry.value.item_type != 0:
        raise LockFormatError(f"{model.path.name} has a weightlock record but no {LOCK_KEY} array of bytes")
    f = model.files[0]
    # the array's bytes: after key, type (u32), item type (u32) and count (u64)
    key_bytes = 8 + len(LOCK_KEY.encode())
    start, end = entry.start + key_bytes + 4 + 4 + 8, entry.end
    if end - start > MAX_LOCK_BYTES:
        raise LockFormatError(f"{model.path.name}: {LOCK_KEY} is larger than any lock")
    with open(f.path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    if hashlib.sha256(data).hexdigest() != record["lock"]["sha256"]:
        raise LockFormatError(f"{model.path.name}: the embedded lock does not match the recorded lock hash")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lock.wlock"
        path.write_bytes(data)
        lock = load_lock(path)
    return lock


def _original(name: str, record: dict, width: int, type_id: int) -> np.ndarray | None:
    """A replaced bias's recorded original bytes as float32 (None when the edit created the bias)."""
    replaced = record["tensors"]["replaced"].get(name)
    if replaced is None:
        return None
    try:
        raw = base64.b64decode(replaced["data"], validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"the recorded original of {name} is not base64") from None
    if replaced["type"] != type_id or len(raw) != width * np.dtype(BIAS_TYPES[type_id]).itemsize:
        raise CheckpointError(f"the recorded original of {name} does not have the stored bias's type and width")
    return np.frombuffer(raw, dtype=BIAS_TYPES[type_id]).astype(np.float32)


def verify_gguf(
    path, *, expected: list[GGUFComputedBias] | None = None, engine: str | None = None, deep: bool = False
) -> Report:
    """Every check on a GGUF model (``path``: the file, or the first of a split set). ``deep``: also dequantize
    every tensor and scan it for NaN/Inf (reads the whole model, one row block at a time)."""
    if engine is not None and engine not in ENGINES:
        raise InvalidInputError(f"unknown engine {engine!r} for GGUF", hint=f"choose one of: {', '.join(ENGINES)}")
    report = Report(str(path))
    try:
        model = open_gguf(path)
    except WeightlockError as e:
        report.add("gguf", FAIL, e.message)
        return report
    report.add(
        "gguf",
        PASS,
        f"{model.split_count} file(s), GGUF v{model.files[0].version}: header, {len(model.tensors)} tensor infos, "
        "offsets (consecutive and aligned) and split set consistent",
    )
    biases = {name: t for name, t in model.tensors.items() if name.endswith(".attn_output.bias")}
    try:
        architecture = gguf_architecture(model.value("general.architecture"))
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
    _check_record(model, shape, architecture, biases, report, expected)
    if deep:
        _check_all_finite(model, report)
    if engine == "llama-cpp":
        _check_llama_cpp_loads(model, report)
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


def _check_record(model, shape, architecture, biases, report, expected) -> None:
    try:
        record = read_record(model)
    except WeightlockError as e:
        report.add("provenance", FAIL, e.message)
        return
    if record is None:
        report.add("provenance", SKIP, f"no {RECORD_KEY} metadata: not locked by weightlock")
        return
    try:
        lock = record_lock(model, record)
        lock.check_compatible(shape)
    except WeightlockError as e:
        report.add("provenance", FAIL, f"the recorded lock cannot be used: {e.message}")
        return
    if record["architecture"] != architecture.name:
        report.add(
            "provenance",
            FAIL,
            f"the record names architecture {record['architecture']!r}, the file is {architecture.name}",
        )
        return
    heads = lock.heads_by_layer()
    if record["locked_layers"] != {str(layer): h for layer, h in heads.items()}:
        report.add("provenance", FAIL, "the record's locked layers are not the lock's")
        return
    locked = {OUTPUT_BIAS.format(layer=layer) for layer in heads}
    listed = set(record["tensors"]["added"]) | set(record["tensors"]["replaced"])
    if listed != locked or set(record["tensors"]["added"]) & set(record["tensors"]["replaced"]):
        report.add(
            "provenance",
            FAIL,
            "the record's added and replaced biases are not the lock's layers",
            sorted(listed ^ locked),
        )
        return
    absent = sorted(locked - set(biases))
    if absent:
        report.add("provenance", FAIL, "bias tensors the lock implies are missing", absent)
        return
    report.locked = locked_summary(record, lock)
    report.add(
        "provenance", PASS, f"lock {record['lock']['sha256'][:12]} at alpha {record['alpha']} (embedded lock matches)"
    )
    expected_raw = {c.planned.name: c.raw for c in expected} if expected is not None else None
    displacements = lock.displacements(float(record["alpha"]), shape.num_heads)
    mismatches = []
    tensors = model.tensors
    with tensor_readers(model) as readers:
        for name in sorted(locked, key=lambda n: int(n.split(".")[1])):
            layer = int(name.split(".")[1])
            stored = tensors[name]
            try:
                stored_raw = readers[stored.file_index].read_raw(stored)
                if expected_raw is not None and stored_raw != expected_raw.get(name):
                    mismatches.append(f"{name}: stored bytes differ from the computed bias")
                    continue
                values = np.zeros(shape.hidden_size, dtype=np.float32)
                original = _original(name, record, shape.hidden_size, stored.type_id)
                if original is not None:
                    values += original
                weight = tensors.get(OUTPUT_WEIGHT.format(layer=layer))
                if weight is None or weight.matrix_shape != (shape.hidden_size, shape.attention_width):
                    mismatches.append(f"{name}: no attn_output.weight of the right shape to recompute it from")
                    continue
                with np.errstate(over="ignore", invalid="ignore"):
                    values += weight_product(readers[weight.file_index], weight, displacements[layer], shape.head_dim)
                    rounded = values.astype(BIAS_TYPES[stored.type_id]).astype(np.float32)
                actual = np.frombuffer(stored_raw, dtype=BIAS_TYPES[stored.type_id]).astype(np.float32)
                if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(rounded))):
                    mismatches.append(f"{name}: holds or implies NaN/Inf")
                    continue
                eps = EPS[stored.type_id]
                tolerance = eps * (np.abs(rounded) + 1e-3 * float(np.abs(rounded).max(initial=0)))
                if float(np.max(np.abs(actual - rounded) - tolerance, initial=-1.0)) > 0:
                    worst = float(np.max(np.abs(actual - rounded)))
                    mismatches.append(f"{name}: differs from the recorded edit by up to {worst:.3g}")
            except WeightlockError as e:
                mismatches.append(f"{name}: {e.message}")
    if mismatches:
        report.add("lock biases", FAIL, f"{len(mismatches)} bias(es) are not what the record implies", mismatches)
    else:
        how = "byte-identical to the computed values" if expected is not None else "recomputed from the stored weights"
        report.add("lock biases", PASS, f"{len(locked)} locked bias(es) {how}")


def _check_all_finite(model: GGUFModel, report: Report) -> None:
    bad, skipped, scanned = [], [], 0
    with tensor_readers(model) as readers:
        for tensor in model.tensors.values():
            if not can_dequantize(tensor.type_id):
                skipped.append(f"{tensor.name} ({tensor.type_name})")
                continue
            # any tensor as rows of its first (contiguous) dimension: one row block in memory at a time
            rows = math.prod(tensor.dims[1:])
            flat = dataclasses.replace(tensor, dims=(tensor.dims[0], rows))
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


def _check_llama_cpp_loads(model: GGUFModel, report: Report) -> None:
    from .llama_cpp import LlamaCppUnavailable, load_check

    try:
        message = load_check(model.path)
    except LlamaCppUnavailable as e:
        report.add("llama.cpp", SKIP, str(e))
        return
    except WeightlockError as e:
        report.add("llama.cpp", FAIL, e.message)
        return
    report.add("llama.cpp", PASS, message)


def output_failure_gguf(report: Report, source: GGUFModel, done: str) -> WeightlockError:
    """As for folders: the input's fault (exit 3) when the source fails the same checks, else a bug (6)."""
    return failure_against_source(report, verify_gguf(source.path), source.path, done)


def describe_gguf(model: GGUFModel) -> dict:
    """What ``inspect`` shows for a GGUF model."""
    name = model.value("general.architecture")
    row = next((r for r in GGUF_ARCHITECTURES if r.name == name), None)
    info: dict = {
        "path": str(model.path),
        "format": "gguf",
        "files": [f.path.name for f in model.files],
        "bytes": model.total_size,
        "gguf_version": model.files[0].version,
        "architecture": name,
        "model_name": model.value("general.name"),
        "tensors": len(model.tensors),
        "llama_cpp_output_bias": None if row is None else (row.bias or f"refused: {row.refuse}"),
    }
    try:
        architecture = gguf_architecture(name)
        shape = gguf_shape(model, architecture)
        info["shape"] = {
            "layers": shape.num_layers,
            "heads": shape.num_heads,
            "kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "hidden_size": shape.hidden_size,
        }
        types: dict[str, int] = {}
        for layer in range(shape.num_layers):
            weight = model.tensors.get(OUTPUT_WEIGHT.format(layer=layer))
            if weight is not None:
                types[weight.type_name] = types.get(weight.type_name, 0) + 1
        info["attn_output_types"] = types
    except WeightlockError as e:
        info["shape"] = None
        info["problem"] = e.message
    info["attn_output_biases"] = sum(1 for n in model.tensors if n.endswith(".attn_output.bias"))
    record = read_record(model)
    info["locked"] = None
    if record is not None:
        depth, parent = 1, record["parent"]
        while isinstance(parent, dict) and depth < 64:
            depth, parent = depth + 1, parent.get("parent")
        info["locked"] = {
            "alpha": record["alpha"],
            "lock_sha256": record["lock"]["sha256"],
            "source_model": record["lock"]["manifest"].get("source_model"),
            "locked_layers": record["locked_layers"],
            "tensors_added": len(record["tensors"]["added"]),
            "tensors_replaced": len(record["tensors"]["replaced"]),
            "created_at": record["created_at"],
            "tool": record["tool"],
            "source": record["source"]["name"],
            "edits": depth,
        }
    return info
