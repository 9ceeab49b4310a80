"""``apply`` for GGUF: lock + GGUF model -> a new GGUF with ``blk.N.attn_output.bias`` baked in.

The same edit as for safetensors (``weightlock.core.edit``: displacements, ``W_o @ d`` in float32),
with W_o dequantized block by block from whatever type the file stores. The output is the
source with the bias tensors added (or, where the architecture already has them, rewritten
in place) and a record of the edit in the metadata.

Why a hand-written writer and not ``gguf.GGUFWriter``: that writer serialises every tensor
it is given through Python; here the source's metadata and tensor-info bytes are carried
verbatim and its whole data section is copied by ``os.copy_file_range`` (in the kernel,
a reflink on filesystems that offer it), so the copy costs what ``cp`` costs and no
tensor passes through memory. The new tensors are appended after the last one, which
keeps every existing offset, and ggml's rule that each tensor follows the previous one.

Order of work, as for folders: refuse bad input, compute the biases, write every file into
a staging folder beside the output, fsync, verify the staged files, then rename them
into place. The source is only read.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightlock import __version__
from weightlock.core.edit import checked_displacements, output_projection_product, refuse_no_effect
from weightlock.core.families import ModelShape
from weightlock.core.lock import Lock
from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.formats.gguf.architectures import (
    BIAS_EXISTING,
    OUTPUT_BIAS,
    OUTPUT_WEIGHT,
    GGUFArchitecture,
    architecture_row,
    gguf_edit_architectures,
)
from weightlock.formats.gguf.file import (
    ARRAY,
    MAGIC,
    SCALAR_FORMATS,
    SPLIT_NAME,
    SPLIT_TENSORS_KEY,
    STRING,
    ArrayValue,
    GGUFFile,
    GGUFModel,
    GGUFTensor,
    GGUFTensorReader,
    can_dequantize,
    tensor_readers,
    value_type_name,
)
from weightlock.formats.gguf.record import (
    LOCK_KEY,
    PARENT_LOCK_KEY,
    RECORD_FORMAT,
    RECORD_KEY,
    embedded_bytes,
    is_our_key,
    read_record,
)
from weightlock.formats.gguf.rewrite import ARCHITECTURE_KEY, RewritePlan, permuted_chunks, plan_rewrite
from weightlock.io.staging import failpoint, fsync_dir
from weightlock.io.untrusted import open_regular

F32, F16 = 0, 1  # ggml type ids
BIAS_TYPES = {F32: "<f4", F16: "<f2"}
COPY_CHUNK = 1 << 30


@dataclass(frozen=True)
class GGUFPlannedBias:
    name: str
    layer: int
    weight: GGUFTensor  # the layer's attn_output.weight
    base: GGUFTensor | None  # the existing bias this one replaces and adds to (None: created)
    type_id: int


@dataclass
class GGUFEditPlan:
    model: GGUFModel
    architecture: GGUFArchitecture
    shape: ModelShape
    lock: Lock
    alpha: float
    displacements: dict[int, np.ndarray]
    biases: list[GGUFPlannedBias]
    previous_record: dict | None
    warnings: list[str] = field(default_factory=list)
    rewrite: RewritePlan | None = None  # the file is rewritten as ``architecture`` (e.g. qwen2 as llama)

    @property
    def added(self) -> list[str]:
        return [b.name for b in self.biases if b.base is None]

    @property
    def replaced(self) -> list[str]:
        return [b.name for b in self.biases if b.base is not None]

    @property
    def weight_bytes_to_read(self) -> int:
        return sum(b.weight.nbytes for b in self.biases)


def _metadata_int(model: GGUFModel, key: str) -> int:
    value = _optional_metadata_int(model, key)
    if value is None:
        raise CheckpointError(
            f"{model.path.name} lacks the metadata key {key}",
            hint="the file is incomplete; convert the model again with llama.cpp",
        )
    return value


INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})  # GGUF's integer value types (bool is 7)
MAX_COUNT = (1 << 31) - 1  # llama.cpp reads these counts as uint32 and uses them as int


def _bad_count(model: GGUFModel, key: str, shown: str) -> CheckpointError:
    return CheckpointError(
        f"{model.path.name}: the metadata key {key} is {shown}; expected a whole number from 1 to {MAX_COUNT}",
        hint=f"{key} is wrong or damaged (llama.cpp would refuse or misread the model); "
        "convert the model again with llama.cpp's converter",
    )


def _optional_metadata_int(model: GGUFModel, key: str) -> int | None:
    entry = model.metadata.get(key)
    if entry is None:
        return None
    value = entry.value
    if isinstance(value, ArrayValue):  # per-layer values (e.g. head_count_kv): one value for all layers only
        values = value.values
        if value.item_type not in INTEGER_TYPES or values is None or len(values) == 0:
            raise _bad_count(model, key, value_type_name(entry))
        if not np.all(values == values[0]):
            raise UnsupportedError(
                f"{model.path.name}: {key} differs between layers",
                hint="weightlock locks models whose layers all have the same attention shape",
            )
        value = int(values[0])
    elif entry.value_type not in INTEGER_TYPES:
        raise _bad_count(model, key, f"{value_type_name(entry)} {str(value)[:40]!r}")
    if not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        raise _bad_count(model, key, repr(value))
    return value


def gguf_shape(model: GGUFModel, architecture: GGUFArchitecture) -> ModelShape:
    """The lock-relevant shape from the metadata (llama.cpp's own keys for the architecture)."""
    key = architecture.key
    layers = _metadata_int(model, key("block_count"))
    heads = _metadata_int(model, key("attention.head_count"))
    hidden = _metadata_int(model, key("embedding_length"))
    kv_heads = _optional_metadata_int(model, key("attention.head_count_kv")) or heads
    head_dim = (
        _optional_metadata_int(model, key("attention.value_length"))
        or _optional_metadata_int(model, key("attention.key_length"))
        or hidden // heads
    )
    return ModelShape(f"gguf:{architecture.name}", architecture.name, layers, heads, kv_heads, head_dim, hidden)


def plan_gguf_edit(
    model: GGUFModel, lock: Lock, alpha: float, *, allow_architecture_mismatch: bool = False
) -> GGUFEditPlan:
    stored, architecture = gguf_edit_architectures(model.text(ARCHITECTURE_KEY))
    shape = gguf_shape(model, stored)
    previous = read_record(model)
    rewrite = None
    if stored.rewrite is not None and previous is not None:
        raise CheckpointError(
            f"{model.path.name} is a {stored.name} file that carries a weightlock record: weightlock writes every "
            f"{stored.name} file it locks as {architecture.name}, so this one was changed by something else",
            hint="lock the original model again",
        )
    if stored.rewrite is not None:
        key_dim = _optional_metadata_int(model, stored.key("attention.key_length"))
        key_dim = key_dim or shape.hidden_size // shape.num_heads
        rope_dims = _optional_metadata_int(model, stored.key("rope.dimension_count"))
        rewrite = plan_rewrite(model, shape, stored, stored.rewrite, key_dim, rope_dims)
    warnings: list[str] = []
    mismatch = None
    fitting = stored.model_types + _rewritten_model_types(previous)
    if lock.source_model.model_type not in fitting:
        mismatch = (
            f"the lock was made from a {lock.source_model.model_type} model ({lock.source_model.architecture}), "
            f"the GGUF file is llama.cpp architecture {stored.name}"
        )
    displacements = checked_displacements(lock, alpha, shape, mismatch, allow_architecture_mismatch, warnings)

    tensors = model.tensors
    biases = []
    for layer in range(shape.num_layers):
        weight = tensors.get(OUTPUT_WEIGHT.format(layer=layer))
        if weight is None:
            raise CheckpointError(
                f"{model.path.name} has no {OUTPUT_WEIGHT.format(layer=layer)}",
                hint="the file is incomplete or not of the architecture its metadata names",
            )
        if weight.matrix_shape != (shape.hidden_size, shape.attention_width):
            raise CheckpointError(
                f"{weight.name} has dims {list(weight.dims)}, the metadata implies "
                f"{[shape.attention_width, shape.hidden_size]}",
                hint="the metadata and the tensors disagree; convert the model again",
            )
        base = tensors.get(OUTPUT_BIAS.format(layer=layer))
        if base is not None and (base.dims != (shape.hidden_size,) or base.type_id not in BIAS_TYPES):
            raise UnsupportedError(
                f"{base.name} is {base.type_name} {list(base.dims)}; weightlock adds to F32 or F16 biases "
                f"of width {shape.hidden_size}",
                hint="convert the model again with llama.cpp",
            )
        if base is None and architecture.bias == BIAS_EXISTING:
            raise CheckpointError(
                f"{model.path.name} lacks {OUTPUT_BIAS.format(layer=layer)}, which llama.cpp's "
                f"{architecture.name} requires",
                hint="the file is incomplete; convert the model again",
            )
        if layer not in displacements:
            continue
        if not can_dequantize(weight.type_id):
            raise UnsupportedError(
                f"{weight.name} is stored as {weight.type_name}, which the gguf package cannot dequantize",
                hint="lock a file quantized with another type (Q8_0, Q4_K, Q5_K, Q6_K, ... all work), "
                "or lock the safetensors checkpoint and convert it",
            )
        biases.append(
            GGUFPlannedBias(OUTPUT_BIAS.format(layer=layer), layer, weight, base, base.type_id if base else F32)
        )
    return GGUFEditPlan(
        model, architecture, shape, lock, float(alpha), displacements, biases, previous, warnings, rewrite
    )


def _rewritten_model_types(record: dict | None) -> tuple[str, ...]:
    """The model types of the architecture a locked file was rewritten from (its root record says which): a
    Qwen2 lock fits a qwen2 file rewritten as llama."""
    while isinstance(record, dict):
        rewrite = record.get("rewrite")
        if isinstance(rewrite, dict):
            row = architecture_row(rewrite.get("from"))
            return row.model_types if row is not None else ()
        record = record.get("parent")
    return ()


@dataclass
class GGUFComputedBias:
    planned: GGUFPlannedBias
    values: np.ndarray  # float32 before rounding
    raw: bytes  # in the planned type
    original: bytes | None = None  # the replaced bias's stored bytes (recorded for undo); None: created


def weight_product(reader: GGUFTensorReader, weight: GGUFTensor, displacement: np.ndarray, head_dim: int):
    return output_projection_product(
        lambda ranges: reader.matrix_row_blocks(weight, ranges), weight.matrix_shape[0], displacement, head_dim
    )


def encode_bias(values: np.ndarray, type_id: int) -> bytes:
    return values.astype(BIAS_TYPES[type_id]).tobytes()


def compute_gguf_biases(plan: GGUFEditPlan, progress=None) -> list[GGUFComputedBias]:
    with tensor_readers(plan.model) as readers:
        out = []
        changed = not plan.biases
        for planned in plan.biases:
            values = np.zeros(plan.shape.hidden_size, dtype=np.float32)
            original = None
            if planned.base is not None:  # F32 or F16 (plan_gguf_edit refuses other types)
                original = readers[planned.base.file_index].read_raw(planned.base)
                values += np.frombuffer(original, dtype=BIAS_TYPES[planned.type_id])
            with np.errstate(over="ignore", invalid="ignore"):
                values += weight_product(
                    readers[planned.weight.file_index],
                    planned.weight,
                    plan.displacements[planned.layer],
                    plan.shape.head_dim,
                )
            if progress is not None:
                progress(planned.weight.nbytes)
            if not np.all(np.isfinite(values)):  # the input's NaN/Inf (or float32 overflow): bad input, exit 3
                raise CheckpointError(
                    f"{planned.name} would not be finite: {planned.weight.name} (or the existing bias) holds "
                    "NaN or Inf, or alpha is too large for it",
                    hint="check the file (weightlock verify --deep), or use a smaller alpha",
                )
            with np.errstate(over="ignore", invalid="ignore"):
                raw = encode_bias(values, planned.type_id)
            if not np.all(np.isfinite(np.frombuffer(raw, dtype=BIAS_TYPES[planned.type_id]))):
                # finite in float32 but not in the stored type (an F16 bias past 65504): unsupported, exit 4,
                # as for safetensors checkpoints (plan.compute_biases)
                raise UnsupportedError(
                    f"{planned.name} overflows {'F16' if planned.type_id == F16 else 'F32'} at alpha {plan.alpha}",
                    hint="use a smaller alpha",
                )
            stored_type = BIAS_TYPES[planned.type_id]
            before = np.frombuffer(original, stored_type) if original is not None else np.zeros(1, stored_type)
            changed = changed or bool(np.any(np.frombuffer(raw, stored_type) != before))  # values: -0.0 == 0.0
            out.append(GGUFComputedBias(planned, values, raw, original))
        refuse_no_effect(
            changed, plan.alpha, "/".join(sorted({"F16" if b.type_id == F16 else "F32" for b in plan.biases}))
        )
        return out


def parent_locks(model: GGUFModel) -> list[bytes]:
    """The lock bytes of each edit a (locked) source records, newest first: its own ``weightlock.core.lock``, then its
    parent locks, as far as the file carries them (a file locked before they were kept stops at its own)."""
    if model.metadata.get(LOCK_KEY) is None:
        return []
    locks = [embedded_bytes(model, LOCK_KEY)]
    while model.metadata.get(PARENT_LOCK_KEY.format(len(locks))) is not None:
        locks.append(embedded_bytes(model, PARENT_LOCK_KEY.format(len(locks))))
    return locks


def record_metadata(model: GGUFModel, record: dict, lock_bytes: bytes) -> list[bytes]:
    """The encoded metadata an edit adds: its record, its lock, and the locks of the edits before it."""
    return [
        _kv_string(RECORD_KEY, json.dumps(record, sort_keys=True)),
        _kv_bytes(LOCK_KEY, lock_bytes),
        *(_kv_bytes(PARENT_LOCK_KEY.format(i), data) for i, data in enumerate(parent_locks(model), start=1)),
    ]


def provisional_record(plan: GGUFEditPlan, lock_bytes: bytes) -> dict:
    """The record as it will be, before the biases are computed (its shape, for the depth check)."""
    placeholders = [GGUFComputedBias(b, np.zeros(0), b"", None if b.base is None else b"") for b in plan.biases]
    return edit_record(plan, placeholders, lock_bytes)


def edit_record(plan: GGUFEditPlan, computed: list[GGUFComputedBias], lock_bytes: bytes) -> dict:
    previous = plan.previous_record
    return {
        "format": RECORD_FORMAT,
        "format_version": 1,
        "tool": f"weightlock {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "name": plan.model.path.name,
            # header hashes identify each source file without reading its data
            "files": [
                {"name": f.path.name, "size": f.size, "header_sha256": f.header_sha256} for f in plan.model.files
            ],
        },
        "lock": {"sha256": hashlib.sha256(lock_bytes).hexdigest(), "manifest": plan.lock.manifest()},
        "alpha": plan.alpha,
        "architecture": plan.architecture.name,
        **({"rewrite": plan.rewrite.record()} if plan.rewrite is not None else {}),
        "locked_layers": {str(layer): heads for layer, heads in plan.lock.heads_by_layer().items()},
        "tensors": {
            "added": plan.added,
            # the original bytes of each bias the edit changed, so the edit can be recomputed and undone
            "replaced": {
                c.planned.name: {"type": c.planned.type_id, "data": base64.b64encode(c.original).decode("ascii")}
                for c in computed
                if c.original is not None
            },
        },
        "parent": previous,
    }


# --- writing ---------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", STRING) + _string(value)


def _kv_bytes(key: str, value: bytes) -> bytes:
    return _string(key) + struct.pack("<IIQ", ARRAY, 0, len(value)) + value  # array of uint8


def _kv_scalar(key: str, value_type: int, value: int) -> bytes:
    return _string(key) + struct.pack("<I" + SCALAR_FORMATS[value_type], value_type, value)


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def copy_range(source_fd: int, dest_fd: int, source_offset: int, dest_offset: int, count: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range: a reflink where the filesystem offers one),
    falling back to reads and writes where it refuses (another filesystem, an old kernel)."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        chunk = min(COPY_CHUNK, count - done)
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(source_fd, dest_fd, chunk, source_offset + done, dest_offset + done)
            except OSError:
                use_kernel = False
                continue
        else:
            data = os.pread(source_fd, min(chunk, 64 << 20), source_offset + done)
            n = os.pwrite(dest_fd, data, dest_offset + done) if data else 0
        if n == 0:
            raise CheckpointError(
                "the source ended while it was being copied (truncated or changed?)",
                hint="do not change the source while weightlock reads it; run again",
            )
        done += n


@dataclass
class FileChanges:
    """What an edit changes in one file of the source besides appending its metadata and tensors:
    ``renamed`` metadata keys (old -> new; the value's bytes carried), ``replaced`` keys (key -> the new
    encoded key/value), and tensors whose bytes are rewritten in place (same size), each given as its bytes or
    as a function of the source file's descriptor that yields them in order (read as they are written)."""

    renamed: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, bytes] = field(default_factory=dict)
    rewritten: dict[str, bytes | Callable[[int], Iterable[bytes]]] = field(default_factory=dict)


def write_gguf_file(
    source: GGUFFile,
    destination: Path,
    extra_metadata: list[bytes],
    new_tensors: list[tuple[str, tuple[int, ...], int, bytes]],
    changes: FileChanges,
    tensor_total: int | None,
) -> int:
    """One output file: the source's metadata and tensors carried over (with ``changes``), ``extra_metadata``
    (encoded key/values) appended, ``new_tensors`` (name, dims, type, bytes) appended after the last tensor.
    Returns the bytes written."""
    # the same checks as the parser's open (a Hub cache's snapshot links into its blob store are followed)
    fd_in = open_regular(source.path, "GGUF file")
    try:
        carried: list[bytes | tuple[int, int]] = []  # re-encoded, or a byte span of the source to copy
        for entry in source.metadata.values():
            if is_our_key(entry.key):
                continue  # a previous edit's record and locks: the new record's parent, and parent locks
            if entry.key == SPLIT_TENSORS_KEY and tensor_total is not None:
                carried.append(_kv_scalar(entry.key, entry.value_type, tensor_total))
            elif entry.key in changes.replaced:
                carried.append(changes.replaced[entry.key])
            elif entry.key in changes.renamed:
                value_start = entry.start + 8 + len(entry.key.encode("utf-8"))
                value_bytes = os.pread(fd_in, entry.end - value_start, value_start)
                carried.append(_string(changes.renamed[entry.key]) + value_bytes)
            else:
                carried.append((entry.start, entry.end))
        infos = []
        offset = source.data_size
        layout = []
        for name, dims, type_id, data in new_tensors:
            infos.append(_tensor_info(name, dims, type_id, offset))
            layout.append((offset, data))
            offset = _align(offset + len(data), source.alignment)
        with open(destination, "xb") as out:
            out.write(MAGIC)
            out.write(
                struct.pack(
                    "<IQQ", source.version, len(source.tensors) + len(new_tensors), len(carried) + len(extra_metadata)
                )
            )
            for value in carried:
                if isinstance(value, bytes):
                    out.write(value)
                else:
                    out.write(os.pread(fd_in, value[1] - value[0], value[0]))
            for encoded in extra_metadata:
                out.write(encoded)
            # the source's tensor infos, verbatim (their offsets do not change), then the new ones
            out.write(os.pread(fd_in, source.tensor_infos_end - source.kv_end, source.kv_end))
            for info in infos:
                out.write(info)
            header_end = out.tell()
            data_start = _align(header_end, source.alignment) if (source.tensors or infos) else header_end
            out.write(b"\0" * (data_start - header_end))
            out.flush()
            present = min(source.data_size, source.size - source.data_start)
            # the data section copied in the kernel around the rewritten tensors, which are written in their place
            by_name = {t.name: t for t in source.tensors}
            position = 0
            for tensor in sorted((by_name[name] for name in changes.rewritten), key=lambda t: t.offset):
                gap = min(tensor.offset, present) - position
                if gap > 0:
                    copy_range(fd_in, out.fileno(), source.data_start + position, data_start + position, gap)
                content = changes.rewritten[tensor.name]
                out.seek(data_start + tensor.offset)
                size = 0
                for chunk in content(fd_in) if callable(content) else [content]:
                    out.write(chunk)
                    size += len(chunk)
                if size != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: rewritten bytes differ in size")
                out.flush()
                position = max(position, tensor.offset + tensor.nbytes)
            if present > position:
                copy_range(fd_in, out.fileno(), source.data_start + position, data_start + position, present - position)
            failpoint("gguf-data-copied")
            out.seek(data_start + present)
            out.write(b"\0" * (source.data_size - present))
            for tensor_offset, data in layout:
                out.seek(data_start + tensor_offset)
                out.write(data)
                out.write(b"\0" * (_align(len(data), source.alignment) - len(data)))
            out.flush()
            os.fsync(out.fileno())
            return out.seek(0, os.SEEK_END)
    finally:
        os.close(fd_in)


def output_paths(source: GGUFModel, out: Path) -> list[Path]:
    """Where each output file goes: ``out`` for one file; for a split set of N, ``out`` if it is named
    NAME-00001-of-0000N.gguf, else that name built from ``out``'s stem."""
    count = source.split_count
    if count == 1:
        return [out]
    match = SPLIT_NAME.match(out.name)
    if match is not None and int(match.group("count")) == count and int(match.group("no")) == 1:
        prefix = match.group("prefix")
    else:
        prefix = out.name[: -len(".gguf")] if out.name.lower().endswith(".gguf") else out.name
    return [out.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _permuted_from(source: GGUFFile, tensor: GGUFTensor, groups: int) -> Callable[[int], Iterable[bytes]]:
    def chunks(fd: int) -> Iterable[bytes]:
        def read(offset: int, count: int) -> bytes:
            raw = os.pread(fd, count, source.data_start + tensor.offset + offset)
            if len(raw) != count:
                raise CheckpointError(
                    f"the source ended while {tensor.name} was being read (truncated or changed?)",
                    hint="do not change the source while weightlock reads it; run again",
                )
            return raw

        return permuted_chunks(read, tensor, groups)

    return chunks


def file_changes(plan: GGUFEditPlan, computed: list[GGUFComputedBias]) -> list[FileChanges]:
    """Per source file: the biases rewritten in place and, for a rewrite, the renamed keys, the new
    architecture and the permuted tensors."""
    changes = [FileChanges() for _ in plan.model.files]
    for item in computed:
        if item.planned.base is not None:
            changes[item.planned.base.file_index].rewritten[item.planned.name] = item.raw
    if plan.rewrite is not None:
        for index, file in enumerate(plan.model.files):
            changes[index].renamed = {k: v for k, v in plan.rewrite.renamed.items() if k in file.metadata}
            if ARCHITECTURE_KEY in file.metadata:
                changes[index].replaced[ARCHITECTURE_KEY] = _kv_string(ARCHITECTURE_KEY, plan.rewrite.rule.target)
        for permuted in plan.rewrite.permuted:
            tensor = permuted.tensor
            changes[tensor.file_index].rewritten[tensor.name] = _permuted_from(
                plan.model.files[tensor.file_index], tensor, permuted.groups
            )
    return changes


def write_locked_gguf(
    plan: GGUFEditPlan, computed: list[GGUFComputedBias], lock_bytes: bytes, record: dict, staging: Path, names
) -> int:
    new_tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []
    for item in computed:
        if item.planned.base is None:
            new_tensors.append((item.planned.name, (plan.shape.hidden_size,), item.planned.type_id, item.raw))
    changes = file_changes(plan, computed)
    total = len(plan.model.tensors) + len(new_tensors)
    written = 0
    for index, source in enumerate(plan.model.files):
        first = index == 0
        written += write_gguf_file(
            source,
            staging / names[index],
            record_metadata(plan.model, record, lock_bytes) if first else [],
            new_tensors if first else [],
            changes[index],
            total if plan.model.split_count > 1 else None,
        )
        failpoint("gguf-file-written")
    fsync_dir(staging)
    return written
