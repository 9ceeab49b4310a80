"""Writing a locked checkpoint into a staging folder, and publishing it atomically.

The writer never touches the source. Shards whose tensors are all kept are reused
byte for byte (hardlinked when the filesystem allows, else copied); a shard that
holds a tensor being replaced is rewritten, streaming, without it; all new tensors
go into one added shard. A single ``model.safetensors`` becomes a two-shard layout,
because transformers loads that file first and would ignore our index.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from weightlock.errors import OutputError
from weightlock.formats.safetensors.card import CARD_NAME
from weightlock.formats.safetensors.folder import (
    CONFIG_NAME,
    INDEX_NAME,
    PROVENANCE_DIR,
    PROVENANCE_NAME,
    SINGLE_NAME,
    Checkpoint,
    contained,
    is_alternative_weight_file,
)
from weightlock.formats.safetensors.plan import ComputedBias, EditPlan
from weightlock.io.safetensors_file import TensorData, write_safetensors
from weightlock.io.staging import failpoint, fsync_tree
from weightlock.io.untrusted import require_regular

LINK_MODES = ("auto", "hardlink", "copy")
LOCK_COPY_NAME = "lock.wlock"
# Replaced tensors' original bytes, kept so an edit can be undone exactly. Not
# ".safetensors", so that no loader globbing the folder mistakes it for weights.
ORIGINALS_NAME = "originals.wlt"
# weightlock/parents/K/: the lock (and originals) of the K-th edit before this one, so verify can recompute
# every edit of a relocked checkpoint's record chain
PARENTS_DIR = "parents"
SINGLE_RENAMED = "model-00001-of-00002.safetensors"
SINGLE_ADDED = "model-00002-of-00002.safetensors"
SHARDED_ADDED = "model-weightlock-bias{suffix}.safetensors"


@dataclass
class WrittenFiles:
    shards: dict[str, str] = field(default_factory=dict)  # source shard -> output name
    rewritten: list[str] = field(default_factory=list)  # output shards rewritten without replaced tensors
    added_shard: str = ""
    carried: list[str] = field(default_factory=list)  # other files carried over
    left_out: list[str] = field(default_factory=list)  # alternative weight files not carried
    linked: int = 0
    copied: int = 0
    bytes_written: int = 0


def link_or_copy(source: Path, destination: Path, mode: str, written: WrittenFiles) -> None:
    """Reuse ``source`` byte for byte: a hardlink when allowed (and asked for), else a copy."""
    # A source that is not a regular file (a broken Hub-cache link, a FIFO, a device) is the input's fault, and
    # is refused before anything is written; copying /dev/zero would fill the disk.
    require_regular(source, "checkpoint file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(source)  # Hub caches hold symlinks into a blob store
    if mode in ("auto", "hardlink"):
        try:
            os.link(real, destination)
            written.linked += 1
            return
        except OSError as e:
            if mode == "hardlink":
                raise OutputError(
                    f"cannot hardlink {source.name} into {destination.parent} ({e.strerror})",
                    hint="use --link-mode copy, or write the output on the source's filesystem",
                ) from None
    shutil.copyfile(real, destination)
    with open(destination, "rb+") as f:
        os.fsync(f.fileno())
    written.copied += 1
    written.bytes_written += destination.stat().st_size


def added_shard_name(checkpoint: Checkpoint) -> str:
    if checkpoint.layout == "single":
        return SINGLE_ADDED
    n = 1
    while (name := SHARDED_ADDED.format(suffix="" if n == 1 else f"-{n}")) in checkpoint.headers:
        n += 1
    return name


def bias_tensors(computed: list[ComputedBias]) -> list[TensorData]:
    return [TensorData(c.planned.name, c.planned.dtype, (c.planned.width,), c.raw) for c in computed]


def output_index(
    checkpoint: Checkpoint,
    shard_names: dict[str, str],
    plan: EditPlan,
    added_shard: str,
    new_tensors: list[TensorData],
) -> dict:
    """The output's safetensors index: kept tensors (split ones as their parts) under their (possibly
    renamed) shards, new ones in the added shard, and the ``metadata`` key transformers requires."""
    kept = {entry.name: entry for entry in plan.output_entries(checkpoint.tensors.values())}
    weight_map = {name: shard_names[entry.path.name] for name, entry in kept.items()}
    weight_map.update({t.name: added_shard for t in new_tensors})
    metadata = dict((checkpoint.index or {}).get("metadata") or {})
    metadata["total_size"] = sum(e.nbytes for e in kept.values()) + sum(len(t.data) for t in new_tensors)
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _write_json(path: Path, value, written: WrittenFiles) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n", written)


def _write_text(path: Path, text: str, written: WrittenFiles) -> None:
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    written.bytes_written += len(data)


def write_locked_checkpoint(
    checkpoint: Checkpoint,
    plan: EditPlan,
    computed: list[ComputedBias],
    lock_bytes: bytes,
    staging: Path,
    link_mode: str,
    provenance: dict,
    card_text: str,
) -> WrittenFiles:
    """Fill ``staging`` (which must not exist) with the locked checkpoint."""
    if link_mode not in LINK_MODES:
        raise OutputError(f"unknown link mode {link_mode!r}", hint=f"choose one of {', '.join(LINK_MODES)}")
    staging.mkdir()
    written = WrittenFiles(added_shard=added_shard_name(checkpoint))

    failpoint("staging-created")
    for shard in checkpoint.weight_files:
        out_name = SINGLE_RENAMED if shard == SINGLE_NAME and checkpoint.layout == "single" else shard
        entries = checkpoint.headers[shard].tensors.values()
        if not plan.changes_shard(entries):
            link_or_copy(checkpoint.root / shard, staging / out_name, link_mode, written)
        else:  # streaming: replaced tensors left out, fused ones split, stacked ones gathered
            kept = plan.output_entries(entries)
            if not kept:  # all its tensors went into stacked tensors stored in other shards
                continue
            written.bytes_written += write_safetensors(
                staging / out_name, kept, checkpoint.headers[shard].metadata or None
            )
            written.rewritten.append(out_name)
        written.shards[shard] = out_name

    failpoint("shards-written")
    new_tensors = bias_tensors(computed) + plan.extra_tensors
    if plan.gate_record is not None:  # the stored MLP weights' hashes, taken from the bytes just copied
        provenance["gate"] = dict(
            plan.gate_record,
            original_sha256={name: grown.digest.hexdigest() for name, grown in sorted(plan.grown.items())},
        )
    written.bytes_written += write_safetensors(staging / written.added_shard, new_tensors, {"format": "pt"})
    _write_json(
        staging / INDEX_NAME,
        output_index(checkpoint, written.shards, plan, written.added_shard, new_tensors),
        written,
    )
    _write_json(staging / CONFIG_NAME, plan.new_config, written)

    _write_text(staging / CARD_NAME, card_text, written)
    for relative in checkpoint.extra_files():
        if relative == CARD_NAME:  # replaced by the card written above, which keeps its content
            continue
        if is_alternative_weight_file(relative):
            written.left_out.append(relative)
            continue
        if relative in plan.file_edits:
            _write_json(staging / relative, plan.file_edits[relative], written)
            written.carried.append(relative)
            continue
        link_or_copy(contained(checkpoint.root, relative), staging / relative, link_mode, written)
        written.carried.append(relative)

    record_dir = staging / PROVENANCE_DIR
    record_dir.mkdir()
    with open(record_dir / LOCK_COPY_NAME, "xb") as f:
        f.write(lock_bytes)
        os.fsync(f.fileno())
    written.bytes_written += len(lock_bytes)
    originals = [checkpoint.tensors[name] for name in plan.replaced]
    if originals:
        written.bytes_written += write_safetensors(
            record_dir / ORIGINALS_NAME, originals, {"format": "weightlock-originals"}
        )
    written.bytes_written += carry_parent_records(checkpoint, record_dir)
    provenance["files"] = {
        "shards": written.shards,
        "rewritten": written.rewritten,
        "added_shard": written.added_shard,
        "carried": written.carried,
        "left_out": written.left_out,
        "lock": f"{PROVENANCE_DIR}/{LOCK_COPY_NAME}",
        "originals": f"{PROVENANCE_DIR}/{ORIGINALS_NAME}" if originals else None,
        "card": CARD_NAME,
    }
    _write_json(record_dir / PROVENANCE_NAME, provenance, written)
    fsync_tree(staging)
    failpoint("staging-complete")
    return written


def carry_parent_records(checkpoint: Checkpoint, record_dir: Path) -> int:
    """Copy a locked source's lock and originals (and those of the edits before it, one level deeper) into
    ``record_dir``/parents/, so every edit the new record's parent chain names can be recomputed. Returns the
    bytes written (0 for an unlocked source)."""
    if checkpoint.provenance is None:
        return 0
    source_dir = checkpoint.root / PROVENANCE_DIR
    copies = [(source_dir, record_dir / PARENTS_DIR / "1")]
    depth = 1
    while (source_dir / PARENTS_DIR / str(depth)).is_dir():
        copies.append((source_dir / PARENTS_DIR / str(depth), record_dir / PARENTS_DIR / str(depth + 1)))
        depth += 1
    total = 0
    for origin, destination in copies:
        for name in (LOCK_COPY_NAME, ORIGINALS_NAME):
            if not (origin / name).is_file():
                continue
            require_regular(origin / name, "earlier edit's record file")
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin / name, destination / name)
            with open(destination / name, "rb") as copied:
                os.fsync(copied.fileno())
            total += (destination / name).stat().st_size
    return total
