"""The lock: selected attention heads, each with a unit direction and a scale.

File format v1 is a safetensors file (never a pickle) holding four tensors,

    layer      I64 [K]            layer index of each selected head
    head       I64 [K]            head index within its layer
    direction  F32 [K, head_dim]  unit direction (mean safe - mean unsafe activation)
    scale      F32 [K]            std of activations along the direction

and a JSON manifest under the metadata key ``weightlock``, validated against
``schemas/lock.schema.json`` on write and on read.

Format v2 adds a gate (:mod:`weightlock.core.gate`): four more tensors,

    gate_layer  I64 [G]            each gated layer (exactly the layers the heads sit in)
    gate_probe  F32 [G, hidden]    unit harmfulness probe read on the layer's MLP input
    gate_low    F32 [G]            probe score where the gate starts to open
    gate_high   F32 [G]            probe score where it is fully open

and a ``gate`` object in the manifest. A lock without a gate is still written as v1, byte for byte as before,
so every weightlock reads it; v1 files load as locks without a gate (nothing to migrate).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightlock import __version__
from weightlock.core.gate import RAMP, READS, Gate, gate_problems
from weightlock.errors import CheckpointError, IncompatibleLockError, LockFormatError
from weightlock.io.safetensors_file import TensorData, TensorReader, read_header, write_safetensors
from weightlock.io.schema import schema_errors
from weightlock.io.untrusted import file_sha256, open_regular, parse_json, read_bytes

FORMAT = "weightlock-lock"
FORMAT_VERSION = 2  # the newest this version reads and writes; a lock is written at the lowest that holds it
GATED_VERSION = 2
METADATA_KEY = "weightlock"
# Directions are stored unit-length; this is how far from 1 a norm may drift on read.
UNIT_NORM_TOLERANCE = 1e-3
TENSOR_LAYOUT = {"layer": "I64", "head": "I64", "direction": "F32", "scale": "F32"}
GATE_TENSOR_LAYOUT = {"gate_layer": "I64", "gate_probe": "F32", "gate_low": "F32", "gate_high": "F32"}


@dataclass(frozen=True)
class SourceModel:
    """The shape fingerprint of the model a lock was made from."""

    architecture: str
    model_type: str
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    hidden_size: int
    name: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_shape(cls, shape, name: str | None = None, revision: str | None = None) -> SourceModel:
        return cls(
            shape.architecture,
            shape.model_type,
            shape.num_layers,
            shape.num_heads,
            shape.head_dim,
            shape.hidden_size,
            name,
            revision,
        )


@dataclass
class Lock:
    layers: np.ndarray  # int64 [K]
    heads: np.ndarray  # int64 [K]
    directions: np.ndarray  # float32 [K, head_dim], unit rows
    scales: np.ndarray  # float32 [K]
    source_model: SourceModel
    creation: dict
    default_alpha: float
    description: str | None = None
    sha256: str | None = field(default=None, compare=False)  # of the file it was read from
    gate: Gate | None = field(default=None, compare=False)  # format v2: the push only where a probe fires

    @property
    def num_heads_selected(self) -> int:
        return int(self.layers.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.directions.shape[1])

    def manifest(self) -> dict:
        manifest = {
            "format": FORMAT,
            "format_version": GATED_VERSION if self.gate is not None else 1,
            "source_model": self.source_model.to_dict(),
            "creation": self.creation,
            "default_alpha": float(self.default_alpha),
            "num_heads_selected": self.num_heads_selected,
        }
        if self.description:
            manifest["description"] = self.description
        if self.gate is not None:
            manifest["gate"] = {
                "reads": READS,
                "ramp": RAMP,
                "num_gates": self.gate.num_gates,
                "details": self.gate.details,
            }
        return manifest

    def without_gate(self) -> Lock:
        """The same heads as a constant lock (what a format that cannot hold the gate bakes)."""
        return Lock(
            self.layers,
            self.heads,
            self.directions,
            self.scales,
            self.source_model,
            self.creation,
            self.default_alpha,
            self.description,
        )

    def heads_by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in zip(self.layers.tolist(), self.heads.tolist(), strict=True):
            out.setdefault(layer, []).append(head)
        return {layer: sorted(heads) for layer, heads in sorted(out.items())}

    def displacements(self, alpha: float, num_heads: int) -> dict[int, np.ndarray]:
        """Per touched layer, the float32 vector added to the o_proj input.

        The vector has num_heads * head_dim entries: ``alpha * scale * direction`` in
        each selected head's slice and zeros elsewhere.
        """
        return head_displacements(self.layers, self.heads, self.directions, self.scales, alpha, num_heads)

    def check_compatible(self, shape) -> None:
        """Refuse a model whose shape differs from the lock's source model."""
        src = self.source_model
        differences = [
            f"{what}: lock {ours}, model {theirs}"
            for what, ours, theirs in (
                ("layers", src.num_hidden_layers, shape.num_layers),
                ("attention heads", src.num_attention_heads, shape.num_heads),
                ("head_dim", src.head_dim, shape.head_dim),
                ("hidden size", src.hidden_size, shape.hidden_size),
            )
            if ours != theirs
        ]
        if differences:
            raise IncompatibleLockError(
                f"the lock was made for a model of another shape ({'; '.join(differences)})",
                hint=f"use a lock forged from this model's base (the lock is from {src.name or src.architecture})",
            )


def head_displacements(layers, heads, directions, scales, alpha: float, num_heads: int) -> dict[int, np.ndarray]:
    """Per touched layer, ``alpha * scale * direction`` in each head's slice of a float32 o_proj-input vector
    (zeros elsewhere). A lock's displacements, and forge's for the candidate heads it measures."""
    out: dict[int, np.ndarray] = {}
    for layer, head, direction, scale in zip(
        np.asarray(layers).tolist(), np.asarray(heads).tolist(), directions, scales, strict=True
    ):
        hd = len(direction)
        vector = out.setdefault(layer, np.zeros(num_heads * hd, dtype=np.float32))
        vector[head * hd : (head + 1) * hd] += np.float32(alpha) * np.float32(scale) * np.asarray(direction, np.float32)
    return out


def build_lock(
    layers,
    heads,
    directions,
    scales,
    source_model: SourceModel,
    *,
    default_alpha: float,
    creation: dict | None = None,
    description: str | None = None,
) -> Lock:
    """Build a validated lock from arrays.

    Directions need not be unit length: each is normalised and its norm folded into
    its scale, so ``scale * direction`` is unchanged.
    """
    layers = np.asarray(layers, dtype=np.int64).reshape(-1)
    heads = np.asarray(heads, dtype=np.int64).reshape(-1)
    directions = np.asarray(directions, dtype=np.float32)
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if directions.ndim != 2:
        raise LockFormatError(
            f"directions must be 2-D [heads, head_dim], got shape {directions.shape}",
            hint="pass one direction per selected head",
        )
    if not np.all(np.isfinite(directions)) or not np.all(np.isfinite(scales)):
        raise LockFormatError(
            "directions and scales must be finite (found NaN or Inf)",
            hint="check the activations the directions were computed from",
        )
    norms = np.linalg.norm(directions.astype(np.float64), axis=1)
    if np.any(norms == 0):
        raise LockFormatError(
            "a direction is all zeros; it has no direction to normalise", hint="drop that head from the lock"
        )
    directions = (directions / norms[:, None]).astype(np.float32)
    scales = (scales.astype(np.float64) * norms).astype(np.float32)
    lock = Lock(
        layers,
        heads,
        directions,
        scales,
        source_model,
        creation or {"method": "api", "tool": f"weightlock {__version__}"},
        float(default_alpha),
        description,
    )
    _validate(lock, "the lock")
    return lock


def _validate(lock: Lock, where: str) -> None:
    def bad(what: str) -> LockFormatError:
        return LockFormatError(
            f"{where} is invalid: {what}", hint="re-create it with `weightlock forge` or `weightlock import-legacy`"
        )

    k = lock.layers.shape[0]
    if k == 0:
        raise bad("it selects no heads")
    if not (lock.heads.shape == (k,) and lock.scales.shape == (k,) and lock.directions.shape[0] == k):
        raise bad(
            f"layer, head, direction and scale disagree on the number of heads "
            f"({k}, {lock.heads.shape[0]}, {lock.directions.shape[0]}, {lock.scales.shape[0]})"
        )
    src = lock.source_model
    if lock.directions.shape[1] != src.head_dim:
        raise bad(f"directions are {lock.directions.shape[1]} long but the source model's head_dim is {src.head_dim}")
    if not (np.all(np.isfinite(lock.directions)) and np.all(np.isfinite(lock.scales))):
        raise bad("directions and scales must be finite (found NaN or Inf)")
    if not np.isfinite(lock.default_alpha):
        raise bad("default_alpha must be finite")
    if np.any(lock.scales <= 0):
        raise bad("every scale must be positive")
    norms = np.linalg.norm(lock.directions.astype(np.float64), axis=1)
    if np.any(np.abs(norms - 1) > UNIT_NORM_TOLERANCE):
        raise bad(f"directions must be unit length (norms range {norms.min():.4g}..{norms.max():.4g})")
    if lock.layers.min() < 0 or lock.layers.max() >= src.num_hidden_layers:
        raise bad(f"layer indices must lie in 0..{src.num_hidden_layers - 1}")
    if lock.heads.min() < 0 or lock.heads.max() >= src.num_attention_heads:
        raise bad(f"head indices must lie in 0..{src.num_attention_heads - 1}")
    pairs = set(zip(lock.layers.tolist(), lock.heads.tolist(), strict=True))
    if len(pairs) != k:
        raise bad("a (layer, head) pair is listed twice")
    if lock.gate is not None:
        problems = gate_problems(lock.gate, lock.layers, src.hidden_size)
        if problems:
            raise bad(problems[0])
    problems = schema_errors(lock.manifest(), "lock")
    if problems:
        raise bad("manifest does not match schemas/lock.schema.json: " + "; ".join(problems))


def save_lock(lock: Lock, path: str | os.PathLike, *, force: bool = True, commit: str | None = None) -> str:
    """Write a lock file atomically (staged beside it, then renamed; ``force=False``: never over an existing
    file); returns its sha256. The CLI checks the place first with ``outputs.check_output_file``; ``commit``:
    see ``outputs.write_file_atomically``."""
    from weightlock.io.outputs import write_file_atomically

    _validate(lock, "the lock")
    path = Path(path)
    order = np.lexsort((lock.heads, lock.layers))  # stable, canonical order: same lock, same bytes
    tensors = [
        TensorData("layer", "I64", (lock.num_heads_selected,), lock.layers[order].tobytes()),
        TensorData("head", "I64", (lock.num_heads_selected,), lock.heads[order].tobytes()),
        TensorData("direction", "F32", lock.directions.shape, np.ascontiguousarray(lock.directions[order]).tobytes()),
        TensorData("scale", "F32", (lock.num_heads_selected,), lock.scales[order].tobytes()),
    ]
    if lock.gate is not None:
        gate = lock.gate
        tensors += [
            TensorData("gate_layer", "I64", (gate.num_gates,), np.asarray(gate.layers, np.int64).tobytes()),
            TensorData("gate_probe", "F32", gate.probes.shape, np.ascontiguousarray(gate.probes, np.float32).tobytes()),
            TensorData("gate_low", "F32", (gate.num_gates,), np.asarray(gate.low, np.float32).tobytes()),
            TensorData("gate_high", "F32", (gate.num_gates,), np.asarray(gate.high, np.float32).tobytes()),
        ]
    metadata = {
        "format": "weightlock-lock",
        METADATA_KEY: json.dumps(lock.manifest(), sort_keys=True, separators=(",", ":")),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from weightlock.io.staging import write_failure

        raise write_failure(e, path) from None
    write_file_atomically(path, lambda staged: write_safetensors(staged, tensors, metadata), force=force, commit=commit)
    lock.sha256 = file_sha256(path)
    return lock.sha256


def load_lock(path: str | os.PathLike) -> Lock:
    """Read and fully validate a lock file."""
    path = Path(path)
    if not os.path.lexists(path):
        raise LockFormatError(
            f"lock file {path} does not exist", hint="pass the path of a .wlock file made by weightlock"
        )
    with os.fdopen(open_regular(path, "lock file", LockFormatError), "rb") as f:
        magic = f.read(4)
    try:
        header = read_header(path)
    except CheckpointError as e:
        # only a file that is not safetensors is named a pickle: a safetensors header length can begin with these
        # bytes too (a length of 128 mod 256 starts with 0x80)
        if magic[:4] == b"PK\x03\x04" or (magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise LockFormatError(
                f"{path.name} is a pickle or torch archive, not a weightlock lock",
                hint=f"convert a SafetyLock file with `weightlock import-legacy {path} "
                f"--out {path.with_suffix('.wlock').name}`",
            ) from None
        raise LockFormatError(
            f"{path.name} is not a weightlock lock: {e.message}", hint="pass a .wlock file made by weightlock"
        ) from None
    raw_manifest = header.metadata.get(METADATA_KEY)
    if raw_manifest is None:
        raise LockFormatError(
            f"{path.name} is a safetensors file without a weightlock manifest",
            hint="pass a .wlock file made by weightlock, not a model shard",
        )
    manifest = parse_json(raw_manifest, f"{path.name}: the manifest", error=LockFormatError)
    problems = schema_errors(manifest, "lock")
    if problems:
        raise LockFormatError(
            f"{path.name}: the manifest does not match schemas/lock.schema.json: " + "; ".join(problems[:5]),
            hint="the file was not written by this version of weightlock, or was edited",
        )
    gated = manifest["format_version"] == GATED_VERSION and "gate" in manifest
    layout = TENSOR_LAYOUT | (GATE_TENSOR_LAYOUT if gated else {})
    if set(header.tensors) != set(layout):
        raise LockFormatError(
            f"{path.name} holds tensors {sorted(header.tensors)[:8]}, expected {sorted(layout)}",
            hint="pass a .wlock file made by weightlock",
        )
    for name, dtype in layout.items():
        if header.tensors[name].dtype != dtype:
            raise LockFormatError(
                f"{path.name}: tensor {name} is {header.tensors[name].dtype}, expected {dtype}",
                hint="pass a .wlock file made by weightlock",
            )
    k = manifest["num_heads_selected"]
    expected_shapes = {
        "layer": (k,),
        "head": (k,),
        "scale": (k,),
        "direction": (k, manifest["source_model"]["head_dim"]),
    }
    if gated:
        g = manifest["gate"]["num_gates"]
        hidden = manifest["source_model"]["hidden_size"]
        expected_shapes |= {"gate_layer": (g,), "gate_probe": (g, hidden), "gate_low": (g,), "gate_high": (g,)}
    for name, shape in expected_shapes.items():
        if header.tensors[name].shape != shape:
            raise LockFormatError(
                f"{path.name}: tensor {name} has shape {list(header.tensors[name].shape)}, "
                f"the manifest implies {list(shape)}",
                hint="pass a .wlock file made by weightlock",
            )
    with TensorReader(path) as mapped:
        arrays = {
            name: np.frombuffer(mapped.read_bytes(entry), dtype=np.int64 if entry.dtype == "I64" else np.float32)
            .reshape(entry.shape)
            .copy()
            for name, entry in header.tensors.items()
        }
    lock = Lock(
        arrays["layer"],
        arrays["head"],
        arrays["direction"],
        arrays["scale"],
        SourceModel(**manifest["source_model"]),
        manifest["creation"],
        float(manifest["default_alpha"]),
        manifest.get("description"),
    )
    if gated:
        lock.gate = Gate(
            arrays["gate_layer"],
            arrays["gate_probe"],
            arrays["gate_low"],
            arrays["gate_high"],
            manifest["gate"]["details"],
        )
    _validate(lock, path.name)
    lock.sha256 = file_sha256(path)
    return lock


def source_model_from_config(config: dict, name: str | None = None, revision: str | None = None) -> SourceModel:
    """The fingerprint of the model a config describes (any family using the usual key names)."""
    from weightlock.core.families import ARCHITECTURES, shape_from_config, spec_for_config
    from weightlock.errors import UnsupportedError

    try:
        spec = spec_for_config(config)
    except UnsupportedError:
        spec = ARCHITECTURES[0]  # the standard key names; the fingerprint needs nothing family-specific
    return SourceModel.from_shape(shape_from_config(config, spec), name, revision)


MAX_LOCK_BYTES = 1 << 30  # a lock of 1M heads of head_dim 256 is about 1 GB


def read_lock(lock: str | os.PathLike | Lock) -> tuple[Lock, bytes]:
    """The lock and the exact bytes of its file (recorded beside the edit)."""
    if isinstance(lock, Lock):
        return lock, lock_file_bytes(lock)
    lock_path = Path(lock)
    loaded = load_lock(lock_path)
    lock_bytes = read_bytes(lock_path, "lock file", MAX_LOCK_BYTES, LockFormatError)
    if hashlib.sha256(lock_bytes).hexdigest() != loaded.sha256:
        raise LockFormatError(
            f"{lock_path} changed while it was being read",
            hint="do not edit the lock file while weightlock uses it; run again",
        )
    return loaded, lock_bytes


def lock_file_bytes(lock: Lock) -> bytes:
    """The file form of an in-memory lock (written through save_lock, so it is validated)."""
    import tempfile

    from weightlock.core.lock import save_lock

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lock.wlock"
        save_lock(lock, path)
        return path.read_bytes()
