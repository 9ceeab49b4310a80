"""In-place apply and ``revert``, for users who cannot afford a second copy of a checkpoint.

An in-place edit changes only what loaders read to find the weights: it adds the
bias shard, replaces the index and config.json (and, when redeclaring, pins the
tokenizer class), and for a single-file checkpoint renames model.safetensors,
because transformers would load that file and ignore the index. No shard's bytes
are touched. Every change is an atomic rename, done in this order:

  1. everything new, and an exact backup of every file that will be replaced, is
     written into a hidden staging folder inside the checkpoint and fsynced;
  2. the staging folder is renamed to ``weightlock/``: from here on the record
     exists, so ``revert`` can undo any later step;
  3. the bias shard moves into place; model.safetensors is renamed if needed;
     the new index, config and tokenizer config replace the old ones.

``revert`` undoes whatever of step 3 happened (each undo is itself an atomic,
idempotent rename), checks the restored files against the recorded hashes, and
removes the record, so it is safe after a crash at any point, including a crash
during revert itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from .apply import ApplyResult, ProgressBar, lock_file_bytes, provenance_record
from .checkpoint import (CONFIG_NAME, INDEX_NAME, PROVENANCE_DIR, PROVENANCE_NAME, SINGLE_NAME,
                         is_alternative_weight_file, open_checkpoint, resolve_location)
from .errors import CheckpointError, OutputError, VerificationError
from .lock import Lock, file_sha256, load_lock
from .plan import compute_biases, plan_edit
from .safetensors_file import write_safetensors
from .verify import verify_checkpoint
from .writer import (LOCK_COPY_NAME, SINGLE_RENAMED, WrittenFiles, added_shard_name, bias_tensors, failpoint,
                     fsync_dir, fsync_tree, output_index, removed_on_failure)

RECORD_NAME = "in-place.json"          # what revert needs, inside weightlock/
BACKUP_DIR = "backup"                  # exact bytes of every replaced file, inside weightlock/
NEW_DIR = "new"                        # files waiting to be renamed into place, inside weightlock/
STAGING_PREFIX = ".weightlock-in-place-"


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def apply_in_place(location, lock: str | os.PathLike | Lock, *, alpha: float | None = None,
                   allow_architecture_mismatch: bool = False, progress: bool = False) -> ApplyResult:
    """Lock the checkpoint folder ``location`` itself. Undo with :func:`revert`."""
    started = time.perf_counter()
    root, repo_id, _ = resolve_location(location)
    if repo_id is not None:
        raise OutputError("in-place edits work on a checkpoint folder, not on the Hub cache",
                          hint="apply to a new --out instead")
    _refuse_unclean(root)
    checkpoint = open_checkpoint(root)
    lock_obj = lock if isinstance(lock, Lock) else load_lock(lock)
    lock_bytes = lock_file_bytes(lock_obj) if isinstance(lock, Lock) else Path(lock).read_bytes()
    plan = plan_edit(checkpoint, lock_obj, lock_obj.default_alpha if alpha is None else alpha,
                     allow_architecture_mismatch=allow_architecture_mismatch)
    if plan.replaced:
        raise OutputError(
            f"{checkpoint.root} already has o_proj biases in its shards ({plan.replaced[0]}, ...), which an "
            "in-place edit would have to rewrite", hint="apply to a new --out instead")
    computed = compute_biases(plan, progress=ProgressBar(plan) if progress else None)

    staging = root / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    written = WrittenFiles(added_shard=added_shard_name(checkpoint))
    renamed = {SINGLE_NAME: SINGLE_RENAMED} if checkpoint.layout == "single" else {}
    provenance = provenance_record(checkpoint, plan, lock_bytes)
    replaced_files = [CONFIG_NAME] + ([INDEX_NAME] if checkpoint.layout == "sharded" else []) \
        + sorted(plan.file_edits)
    with removed_on_failure(staging, root):
        staging.mkdir()
        new = staging / NEW_DIR
        tensors = bias_tensors(computed)
        new.mkdir()
        written.bytes_written += write_safetensors(new / written.added_shard, tensors, {"format": "pt"})
        shard_names = {s: renamed.get(s, s) for s in checkpoint.weight_files}
        new_files = {INDEX_NAME: output_index(checkpoint, shard_names, set(), written.added_shard, tensors),
                     CONFIG_NAME: plan.new_config, **plan.file_edits}
        for name, content in new_files.items():
            _write_bytes(new / name, (json.dumps(content, indent=2) + "\n").encode("utf-8"))
        for name in replaced_files:
            _write_bytes(staging / BACKUP_DIR / name, (root / name).read_bytes())
        _write_bytes(staging / LOCK_COPY_NAME, lock_bytes)
        provenance["files"] = {
            "shards": shard_names, "rewritten": [],
            "added_shard": written.added_shard, "carried": [], "left_out": [],
            "lock": f"{PROVENANCE_DIR}/{LOCK_COPY_NAME}", "originals": None,
        }
        provenance["mode"] = "in-place"
        _write_bytes(staging / PROVENANCE_NAME, (json.dumps(provenance, indent=2) + "\n").encode("utf-8"))
        record = {"renamed": renamed, "added": [written.added_shard], "replaced": replaced_files,
                  "original_sha256": {name: file_sha256(root / name) for name in replaced_files},
                  "new_sha256": {name: file_sha256(new / name) for name in new_files}}
        _write_bytes(staging / RECORD_NAME, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        fsync_tree(staging)
        failpoint("in-place-staged")
        os.rename(staging, root / PROVENANCE_DIR)
    fsync_dir(root)
    failpoint("in-place-recorded")

    record_dir = root / PROVENANCE_DIR
    try:
        os.rename(record_dir / NEW_DIR / written.added_shard, root / written.added_shard)
        failpoint("in-place-shard-added")
        for old, new_name in renamed.items():
            os.rename(root / old, root / new_name)
            failpoint("in-place-renamed")
        for name in new_files:
            os.replace(record_dir / NEW_DIR / name, root / name)
            failpoint(f"in-place-replaced-{name}")
        fsync_dir(root)
        report = verify_checkpoint(root, expected=computed, loader_check=False)
        if not report.ok:
            raise VerificationError("the edited checkpoint failed verification and the edit was reverted: "
                                    + "; ".join(report.failures()),
                                    hint="this is a bug in weightlock or a fault in the disk; please report it")
    except BaseException:
        revert(root)
        raise
    return ApplyResult(root, plan, written, provenance, time.perf_counter() - started)


def _refuse_unclean(root: Path) -> None:
    if (root / PROVENANCE_DIR).exists():
        raise OutputError(f"{root} already carries a weightlock edit ({PROVENANCE_DIR}/ exists)",
                          hint=f"undo it first with `weightlock revert {root}`, or apply to a new --out")
    if any(root.glob(f"{STAGING_PREFIX}*")):
        raise OutputError(f"{root} holds the staging folder of an interrupted in-place apply",
                          hint=f"run `weightlock revert {root}` to tidy it, then apply again")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and is_alternative_weight_file(p.name)
                   and p.name not in (SINGLE_NAME, INDEX_NAME) and not p.name.startswith("model-"))
    if stray:
        raise OutputError(f"{root} holds weight files in other formats ({', '.join(stray[:3])}) that a loader may "
                          "prefer to the edited safetensors set, so the lock would not be active",
                          hint="move them out of the folder, or apply to a new --out (which leaves them out)")


def revert(location) -> dict:
    """Undo an in-place apply (finished or interrupted) and restore the original bytes exactly."""
    root = Path(location).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder")
    done = []
    for staging in sorted(root.glob(f"{STAGING_PREFIX}*")):
        shutil.rmtree(staging)
        done.append(f"removed {staging.name}, staged by an apply that never recorded its edit")
    record_dir = root / PROVENANCE_DIR
    record_path = record_dir / RECORD_NAME
    if not record_path.is_file():
        if record_dir.is_dir():
            raise CheckpointError(f"{root} was locked into a new folder, not in place; there is nothing to revert",
                                  hint="delete this folder; its source is unchanged")
        if done:
            return {"path": str(root), "reverted": False, "actions": done}
        raise CheckpointError(f"{root} carries no in-place weightlock edit", hint="nothing to revert")
    try:
        record = json.loads(record_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the in-place record {record_path} is unreadable ({e})",
                              hint="restore the files from weightlock/backup by hand") from None
    for name in record["replaced"]:
        backup = record_dir / BACKUP_DIR / name
        if backup.is_file() and (not (root / name).is_file()
                                 or file_sha256(root / name) != record["original_sha256"][name]):
            tmp = root / f".{name}.weightlock-revert"
            tmp.unlink(missing_ok=True)
            shutil.copyfile(backup, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, root / name)
            done.append(f"restored {name}")
    if INDEX_NAME not in record["replaced"] and (root / INDEX_NAME).is_file():
        os.remove(root / INDEX_NAME)
        done.append(f"removed {INDEX_NAME}")
    for old, new_name in record["renamed"].items():
        if (root / new_name).exists() and not (root / old).exists():
            os.rename(root / new_name, root / old)
            done.append(f"renamed {new_name} back to {old}")
    for added in record["added"]:
        if (root / added).exists():
            os.remove(root / added)
            done.append(f"removed {added}")
    mismatched = [name for name in record["replaced"]
                  if not (root / name).is_file() or file_sha256(root / name) != record["original_sha256"][name]]
    if mismatched:
        raise CheckpointError(f"after revert, {', '.join(mismatched)} do not match the recorded originals",
                              hint="weightlock/backup holds the original bytes; the record was kept")
    fsync_dir(root)
    shutil.rmtree(record_dir)
    fsync_dir(root)
    done.append("removed the weightlock/ record")
    return {"path": str(root), "reverted": True, "actions": done}

