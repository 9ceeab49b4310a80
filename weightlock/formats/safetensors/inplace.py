"""In-place apply and ``revert``, for users who cannot afford a second copy of a checkpoint.

An in-place edit changes only what loaders read to find the weights: it adds the
bias shard, replaces the index and config.json (and, when redeclaring, pins the
tokenizer class), and for a single-file checkpoint renames model.safetensors,
because transformers would load that file and ignore the index. No shard's bytes
are touched, except where the checkpoint already has o_proj biases (gpt-oss,
GPT-NeoX, StarCoder2, Phi) or fused weights the output class stores split (Phi-3):
a shard holding one is *swapped*: rewritten (without the replaced biases, with the
fused weights split) into a new file, and the original shard moved (renamed, never
copied) into ``weightlock/backup/`` for ``revert``; the disk then holds both for as
long as the edit stands. It is a journal: every state the disk can be left in is one
that ``revert`` takes back to the original, bytes checked against recorded hashes.

  1. refuse unless every name the edit will create is free: a file weightlock did
     not create is never replaced or removed;
  2. everything new, an exact backup of every file that will be replaced, and the
     record (``in-place.json``: each file's original and new sha256, the renamed
     shard's size and header hash) are written into a hidden staging folder inside
     the checkpoint and fsynced;
  3. the staging folder is renamed to ``weightlock/``: from here on the record
     exists, so ``revert`` can undo any later step;
  4. the bias shard moves into place; model.safetensors is renamed if needed; each
     swapped shard moves into the backup and its rewrite takes its place; the new
     index, config and tokenizer config replace the old ones; each one atomic.

Any failure or Ctrl-C after step 2 begins is undone at once by ``revert`` (and reported so); the edit's
commit point (weightlock.io.commit) is the edited folder passing verify, after which a Ctrl-C changes nothing.
Only one in-place apply or revert works on a folder at a time (:func:`editing_lock`). ``revert``
(also after a crash at any point, its own included) puts back each file whose current
bytes are the recorded new ones or absent, removes only files whose bytes are the ones
it recorded writing, refuses anything else (a file changed since the edit is never
overwritten), and finally renames the record aside before deleting it, so a revert
killed at any step is finished by running it again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from weightlock.core.edit import ProgressBar
from weightlock.core.lock import Lock, read_lock
from weightlock.core.report import Report, output_failure, source_note
from weightlock.errors import CheckpointError, OutputError
from weightlock.formats.safetensors.apply import ApplyResult, provenance_record
from weightlock.formats.safetensors.card import CARD_NAME, locked_card, read_eval_report, source_card_text
from weightlock.formats.safetensors.folder import (
    CONFIG_NAME,
    INDEX_NAME,
    PROVENANCE_DIR,
    PROVENANCE_NAME,
    SINGLE_NAME,
    TOKENIZER_CONFIG_NAME,
    allowed_roots,
    contained,
    is_alternative_weight_file,
    open_checkpoint,
    resolve_location,
)
from weightlock.formats.safetensors.plan import compute_biases, plan_edit
from weightlock.formats.safetensors.write import (
    LOCK_COPY_NAME,
    ORIGINALS_NAME,
    SINGLE_RENAMED,
    WrittenFiles,
    added_shard_name,
    bias_tensors,
    output_index,
)
from weightlock.io.commit import critical, mark_committed, set_interrupt_advice
from weightlock.io.safetensors_file import read_header, write_safetensors
from weightlock.io.staging import failpoint, fsync_dir, fsync_tree, removed_on_failure
from weightlock.io.untrusted import file_sha256, read_bytes, read_json

RECORD_NAME = "in-place.json"  # what revert needs, inside weightlock/
RECORD_FORMAT = "weightlock-in-place"
BACKUP_DIR = "backup"  # exact bytes of every replaced file, inside weightlock/
NEW_DIR = "new"  # files waiting to be renamed into place, inside weightlock/
STAGING_PREFIX = ".weightlock-in-place-"
TRASH_PREFIX = ".weightlock-reverted-"  # a record renamed aside by a revert, deleted next
# Everything a staging folder or a record folder of ours can hold; revert deletes a leftover folder only
# when it holds nothing else, so a folder that merely borrows our prefix is never removed.
OUR_RECORD_ENTRIES = {NEW_DIR, BACKUP_DIR, LOCK_COPY_NAME, PROVENANCE_NAME, RECORD_NAME, ORIGINALS_NAME}
REVERT_HINT = "run `weightlock revert {root}` to restore the original files"


@contextmanager
def editing_lock(root: Path) -> Iterator[None]:
    """Only one in-place apply or revert works on a folder at a time: an exclusive flock on the folder itself
    (nothing is created in it; the kernel releases it when the process ends, however it ends). A second one
    is refused at once, before it reads anything, so it can neither trip over the first one's half-done
    edit nor undo it. On a filesystem without flock the edit goes ahead unguarded, as before."""
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(
            f"cannot open {root}: {e.strerror or e}", hint="pass the checkpoint folder to edit in place"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"another weightlock is editing {root} in place (an apply --in-place or a revert is running)",
                    hint="wait for it to finish, then run again; nothing was changed by this run",
                ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    failpoint("in-place-staging-wrote")


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def apply_in_place(
    location,
    lock: str | os.PathLike | Lock,
    *,
    alpha: float | None = None,
    allow_architecture_mismatch: bool = False,
    progress: bool = False,
    loader_check: bool = True,
    eval_report: str | os.PathLike | None = None,
    verify: Callable[..., Report],
) -> ApplyResult:
    """Lock the checkpoint folder ``location`` itself (its model card too). Undo with :func:`revert`. ``verify``
    is :func:`weightlock.api.verify_checkpoint` (passed in: formats do not import the engines it runs)."""
    started = time.perf_counter()
    root, repo_id, _ = resolve_location(location)
    if repo_id is not None:
        raise OutputError(
            "in-place edits work on a checkpoint folder, not on the Hub cache", hint="apply to a new --out instead"
        )
    with editing_lock(root):
        set_interrupt_advice(f"{root} was not changed")
        return _apply_in_place(
            root,
            lock,
            started,
            alpha=alpha,
            allow_architecture_mismatch=allow_architecture_mismatch,
            progress=progress,
            loader_check=loader_check,
            eval_report=eval_report,
            verify=verify,
        )


def _apply_in_place(
    root: Path,
    lock: str | os.PathLike | Lock,
    started: float,
    *,
    alpha: float | None,
    allow_architecture_mismatch: bool,
    progress: bool,
    loader_check: bool,
    eval_report: str | os.PathLike | None,
    verify: Callable[..., Report],
) -> ApplyResult:
    _refuse_unclean(root)
    checkpoint = open_checkpoint(root)
    unindexed = sorted(
        p.name for p in root.iterdir() if p.name.endswith(".safetensors") and p.name not in checkpoint.headers
    )
    if unindexed:
        raise OutputError(
            f"{root} holds {', '.join(unindexed[:3])}, which the checkpoint's index does not name; "
            "a loader that globs *.safetensors would load it beside the edited set",
            hint="move it out of the folder, or apply to a new --out (which leaves it out)",
        )
    lock_obj, lock_bytes = read_lock(lock)  # as apply --out: the lock and its file's exact bytes
    plan = plan_edit(
        checkpoint,
        lock_obj,
        lock_obj.default_alpha if alpha is None else alpha,
        allow_architecture_mismatch=allow_architecture_mismatch,
    )
    written = WrittenFiles(added_shard=added_shard_name(checkpoint))
    replaced = set(plan.replaced)
    # shards holding biases the edit replaces (the new values go to the added shard) or fused weights it
    # splits: swapped for their rewrite
    # (to None: every tensor of the shard went into stacked tensors stored elsewhere; it is only moved away)
    swapped: dict[str, str | None] = {
        shard: (SINGLE_RENAMED if checkpoint.layout == "single" else shard)
        if plan.output_entries(checkpoint.headers[shard].tensors.values())
        else None
        for shard in checkpoint.weight_files
        if plan.changes_shard(checkpoint.headers[shard].tensors.values())
    }
    renamed = {SINGLE_NAME: SINGLE_RENAMED} if checkpoint.layout == "single" and SINGLE_NAME not in swapped else {}
    card_source = source_card_text(root)
    created = ([INDEX_NAME] if checkpoint.index is None else []) + ([CARD_NAME] if card_source is None else [])
    _refuse_taken_names(
        root,
        [
            written.added_shard,
            *renamed.values(),
            *(to for old, to in swapped.items() if to not in (old, None)),
            *created,
        ],
    )
    provenance = provenance_record(checkpoint, plan, lock_bytes)  # before the work: refuses too deep a record
    computed = compute_biases(plan, progress=ProgressBar(plan) if progress else None)

    staging = root / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    provenance["mode"] = "in-place"
    card_text = locked_card(
        card_source, provenance, lock_obj, None if eval_report is None else read_eval_report(eval_report)
    )
    replaced_files = (
        [CONFIG_NAME]
        + ([INDEX_NAME] if checkpoint.index is not None else [])
        + sorted(plan.file_edits)
        + ([CARD_NAME] if card_source is not None else [])
    )
    try:
        with removed_on_failure(staging, root):
            staging.mkdir()
            failpoint("in-place-staging-created")
            new = staging / NEW_DIR
            tensors = bias_tensors(computed)
            new.mkdir()
            written.bytes_written += write_safetensors(new / written.added_shard, tensors, {"format": "pt"})
            failpoint("in-place-staging-wrote")
            for shard, to in swapped.items():
                if to is None:
                    continue
                header = checkpoint.headers[shard]
                entries = plan.output_entries(header.tensors.values())
                written.bytes_written += write_safetensors(new / to, entries, header.metadata or None)
                written.rewritten.append(to)
                failpoint("in-place-staging-wrote")
            if replaced:  # the replaced biases' original bytes, for verify (as apply --out keeps them)
                written.bytes_written += write_safetensors(
                    staging / ORIGINALS_NAME,
                    [checkpoint.tensors[name] for name in plan.replaced],
                    {"format": "weightlock-originals"},
                )
                failpoint("in-place-staging-wrote")
            shard_names: dict[str, str] = {}
            for shard in checkpoint.weight_files:
                name = swapped[shard] if shard in swapped else renamed.get(shard, shard)
                if name is not None:  # an emptied shard has no output name
                    shard_names[shard] = name
            new_files = {
                INDEX_NAME: output_index(checkpoint, shard_names, plan, written.added_shard, tensors),
                CONFIG_NAME: plan.new_config,
                **plan.file_edits,
                CARD_NAME: card_text,
            }
            for name, content in new_files.items():
                _write_bytes(new / name, content.encode("utf-8") if isinstance(content, str) else _json_bytes(content))
            for name in replaced_files:
                _write_bytes(staging / BACKUP_DIR / name, read_bytes(contained(root, name), name, 1 << 30))
            _write_bytes(staging / LOCK_COPY_NAME, lock_bytes)
            provenance["files"] = {
                "shards": shard_names,
                "rewritten": written.rewritten,
                "added_shard": written.added_shard,
                "carried": [],
                "left_out": [],
                "lock": f"{PROVENANCE_DIR}/{LOCK_COPY_NAME}",
                "originals": f"{PROVENANCE_DIR}/{ORIGINALS_NAME}" if replaced else None,
                "card": CARD_NAME,
            }
            _write_bytes(staging / PROVENANCE_NAME, _json_bytes(provenance))
            record = {
                "format": RECORD_FORMAT,
                "format_version": 2,
                "added": {written.added_shard: file_sha256(new / written.added_shard)},
                "renamed": {
                    old: {
                        "to": to,
                        "size": checkpoint.headers[old].file_size,
                        "header_sha256": checkpoint.headers[old].header_sha256(),
                    }
                    for old, to in renamed.items()
                },
                "replaced": {
                    name: {
                        "original_sha256": file_sha256(staging / BACKUP_DIR / name),
                        "new_sha256": file_sha256(new / name),
                        # a symlink (as the Hub cache stores every file) is put back as that symlink
                        **({"symlink": os.readlink(root / name)} if os.path.islink(root / name) else {}),
                    }
                    for name in replaced_files
                },
                "created": {name: file_sha256(new / name) for name in created},
                # a swapped shard: the original (identified by size and header, as a renamed one) goes to the
                # backup, the rewrite (identified by its full hash) takes the name "to"
                "swapped": {
                    old: {
                        "to": to,
                        "size": checkpoint.headers[old].file_size,
                        "header_sha256": checkpoint.headers[old].header_sha256(),
                        "new_sha256": None if to is None else file_sha256(new / to),
                    }
                    for old, to in swapped.items()
                },
            }
            _write_bytes(staging / RECORD_NAME, _json_bytes(record))
            fsync_tree(staging)
            failpoint("in-place-staged")
            os.rename(staging, root / PROVENANCE_DIR)
        fsync_dir(root)
        failpoint("in-place-recorded")

        record_dir = root / PROVENANCE_DIR
        os.rename(record_dir / NEW_DIR / written.added_shard, root / written.added_shard)
        failpoint("in-place-shard-added")
        for old, new_name in renamed.items():
            os.rename(root / old, root / new_name)
            failpoint("in-place-renamed")
        for old, to in swapped.items():
            (record_dir / BACKUP_DIR).mkdir(exist_ok=True)
            os.rename(root / old, record_dir / BACKUP_DIR / old)
            failpoint("in-place-shard-moved-to-backup")
            if to is not None:
                os.rename(record_dir / NEW_DIR / to, root / to)
                failpoint("in-place-shard-swapped")
        for name in new_files:
            os.replace(record_dir / NEW_DIR / name, root / name)
            failpoint(f"in-place-replaced-{name}")
        fsync_dir(root)
        report = verify(root, expected=computed, loader_check=loader_check)
        if not report.ok:
            raise _EditFailedVerification(report)
        mark_committed(f"the in-place edit of {root} was completed and verified")
    except _EditFailedVerification as failed:
        _roll_back(root)
        raise output_failure(failed.report, root, loader_check, "the edit was reverted", verify) from None
    except BaseException:
        # Whatever stopped us (an error, a Ctrl-C), put the folder back as it was; if that fails, the record
        # on disk lets `weightlock revert` finish it.
        if (root / PROVENANCE_DIR / RECORD_NAME).is_file() or _leftovers(root):
            _roll_back(root)
        raise
    plan.warnings.extend(source_note(report))  # as apply --out: the originals only a copy of the source confirms
    return ApplyResult(root, plan, written, provenance, time.perf_counter() - started, report)


def _roll_back(root: Path) -> None:
    """Undo an unfinished in-place edit at once, as one critical section (a second Ctrl-C waits for it)."""
    set_interrupt_advice(f"run `weightlock revert {root}` to finish restoring its original files")
    with critical():
        _revert(root, commit=False)
        set_interrupt_advice(f"the in-place edit was undone; {root} holds its original files again")


class _EditFailedVerification(Exception):
    def __init__(self, report):
        self.report = report


def _refuse_unclean(root: Path) -> None:
    if os.path.lexists(root / PROVENANCE_DIR):
        raise OutputError(
            f"{root} already carries a weightlock edit ({PROVENANCE_DIR}/ exists)",
            hint=f"undo it first with `weightlock revert {root}`, or apply to a new --out",
        )
    if _leftovers(root):
        raise OutputError(
            f"{root} holds what an interrupted in-place apply or revert left behind",
            hint=f"run `weightlock revert {root}` to tidy it, then apply again",
        )
    stray = sorted(
        p.name
        for p in root.iterdir()
        if is_alternative_weight_file(p.name)
        and p.name not in (SINGLE_NAME, INDEX_NAME)
        and not p.name.startswith("model-")
    )
    if stray:
        raise OutputError(
            f"{root} holds weight files in other formats ({', '.join(stray[:3])}) that a loader may "
            "prefer to the edited safetensors set, so the lock would not be active",
            hint="move them out of the folder, or apply to a new --out (which leaves them out)",
        )


def _refuse_taken_names(root: Path, names: list[str]) -> None:
    """An in-place edit creates these names; refuse if any is taken by something it did not create."""
    taken = [name for name in names if os.path.lexists(root / name)]
    if taken:
        raise OutputError(
            f"{root} already holds {', '.join(taken)}, which the in-place edit would have to "
            "create; weightlock never replaces a file it did not write",
            hint="move that file out of the folder (it is not part of the checkpoint's index), or apply to a new --out",
        )


def _leftovers(root: Path) -> list[Path]:
    """Staging folders of applies that never recorded their edit, and records renamed aside by a revert."""
    return sorted(
        root / name for name in os.listdir(root) if name.startswith(STAGING_PREFIX) or name.startswith(TRASH_PREFIX)
    )


def _remove_our_folder(folder: Path, done: list[str]) -> None:
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(
            f"{folder} is named like a weightlock folder but is not one",
            hint="move it out of the checkpoint folder, then run revert again",
        )
    foreign = sorted(set(os.listdir(folder)) - OUR_RECORD_ENTRIES)
    if foreign:
        raise CheckpointError(
            f"{folder.name} is named like weightlock's own folder but holds {foreign[0]!r}, "
            "which weightlock never writes there; it was not removed",
            hint="move it out of the checkpoint folder, then run revert again",
        )
    shutil.rmtree(folder)
    failpoint("revert-leftover-removed")
    done.append(f"removed {folder.name}, left by an interrupted apply or revert")


def _replace_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.weightlock-revert")
    if os.path.lexists(tmp):
        os.remove(tmp)
    shutil.copyfile(source, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _is_link_to(path: Path, link: str) -> bool:
    return os.path.islink(path) and os.readlink(path) == link


def _link_target_holds(root: Path, name: str, link, sha256: str) -> bool:
    """Whether a symlink ``name`` -> ``link`` (from the record: untrusted) would lead to a file inside the
    checkpoint (or its Hub blob store) holding exactly the original bytes; only then is it put back."""
    if not isinstance(link, str) or not link or "\0" in link:
        raise CheckpointError(
            f"the record gives {name} a symlink target that is not a path",
            hint=f"the record was damaged or crafted; restore {name} from {PROVENANCE_DIR}/{BACKUP_DIR}/ by hand",
        )
    target = Path(os.path.realpath(os.path.join(root, os.path.dirname(name), link)))
    if not any(target == r or r in target.parents for r in allowed_roots(root)) or not target.is_file():
        return False
    return _sha_or_none(target) == sha256


def _replace_with_link(link: str, target: Path) -> None:
    """Put the symlink back atomically (made beside it, then renamed over whatever the edit left)."""
    tmp = target.with_name(f".{target.name}.weightlock-revert")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(link, tmp)
    os.replace(tmp, target)


def _sha_or_none(path: Path) -> str | None:
    return file_sha256(path, path.name) if os.path.lexists(path) else None


def _is_original_shard(path: Path, record: dict) -> bool:
    header = read_header(path)
    return header.file_size == record["size"] and header.header_sha256() == record["header_sha256"]


def _as_if_at(moved: Path, place: Path) -> Path:
    """A file moved from ``place`` to ``moved``: a relative symlink (a Hub cache snapshot's shard) points from
    where it was, so it is read as if it were still there."""
    if os.path.islink(moved) and not os.path.isabs(link := os.readlink(moved)):
        return place.parent / link
    return moved


def _swap_back_steps(root: Path, old: str, swap: dict) -> list[tuple[str, Callable[[], None]]]:
    """Put a swapped shard's original back: it is either still in place (the edit stopped before moving
    it) or in the backup, and the name it left holds nothing, the original, or exactly the rewrite."""
    backup = contained(root, f"{PROVENANCE_DIR}/{BACKUP_DIR}/{old}")
    current = contained(root, old)
    rewrite = current if swap["to"] is None else contained(root, swap["to"])
    if not os.path.lexists(backup):
        if os.path.lexists(current) and _is_original_shard(current, swap):
            if swap["to"] not in (old, None) and os.path.lexists(rewrite):
                raise CheckpointError(
                    f"{swap['to']} is in the folder although the edit never moved it there",
                    hint=f"move {swap['to']} aside if it is yours, then run revert again",
                )
            return []  # never moved
        raise CheckpointError(
            f"{old} is neither in place nor in {PROVENANCE_DIR}/{BACKUP_DIR}/, so revert cannot restore it",
            hint=f"restore {old} from another copy of the checkpoint; the record was kept",
        )
    if not _is_original_shard(_as_if_at(backup, current), swap):
        raise CheckpointError(
            f"the backup of {old} is not the shard the edit moved there (size or header differ)",
            hint=f"restore {old} from another copy of the checkpoint; the record was kept",
        )
    for path in {current, rewrite}:
        sha = _sha_or_none(path)
        if sha is not None and sha != swap["new_sha256"]:  # (None: nothing was put under the name)
            raise CheckpointError(
                f"{path.name} is not the shard the in-place edit wrote; revert will not overwrite it",
                hint=f"move {path.name} aside if it is yours, then run revert again",
            )
    steps: list[tuple[str, Callable[[], None]]] = []
    if swap["to"] not in (old, None) and os.path.lexists(rewrite):
        steps.append((f"removed {swap['to']}", partial(os.remove, rewrite)))
    # a rename over the rewrite (when it has the same name) replaces it atomically
    steps.append((f"put the original {old} back", partial(os.rename, backup, current)))
    return steps


def revert(location) -> dict:
    """Undo an in-place apply (finished or interrupted) and restore the original bytes exactly.

    Only what the record proves weightlock wrote is removed or replaced; anything else is refused.
    """
    root = Path(location).resolve()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder", hint="pass the checkpoint folder that was edited in place")
    with editing_lock(root):
        set_interrupt_advice(f"run `weightlock revert {root}` again to finish restoring its original files")
        return _revert(root, commit=True)


def _revert(root: Path, *, commit: bool) -> dict:
    """:func:`revert` under the editing lock; ``commit``: mark the commit point (a revert of its own, not the
    rollback of an interrupted apply)."""
    done: list[str] = []
    record_dir = root / PROVENANCE_DIR
    record_path = record_dir / RECORD_NAME
    if not os.path.lexists(record_path):
        for leftover in _leftovers(root):
            _remove_our_folder(leftover, done)
        if done:
            fsync_dir(root)
            if commit:
                mark_committed(f"{root} was tidied")
            return {"path": str(root), "reverted": False, "actions": done}
        if os.path.lexists(record_dir / BACKUP_DIR):
            raise CheckpointError(
                f"{root} was edited in place but its record {RECORD_NAME} is missing, so revert "
                "cannot prove what it wrote",
                hint=f"the original files are in {PROVENANCE_DIR}/{BACKUP_DIR}/; copy them back "
                "by hand, then remove the added bias shard and the weightlock/ folder",
            )
        if os.path.lexists(record_dir):
            raise CheckpointError(
                f"{root} was written by `weightlock apply --out`, not edited in place; there is nothing to revert here",
                hint="its source folder is unchanged; use that"
                + ("" if _gated(record_dir) else ", or apply with a negative alpha to take the lock off"),
            )
        raise CheckpointError(f"{root} carries no in-place weightlock edit", hint="nothing to revert")
    contained(root, f"{PROVENANCE_DIR}/{RECORD_NAME}")
    record = read_json(
        record_path,
        "record",
        "in-place",
        hint=f"the record was damaged or crafted, so revert cannot prove what it wrote; compare "
        f"the files with {PROVENANCE_DIR}/{BACKUP_DIR}/ and restore them by hand",
    )

    # First check every file against the record, then act: a record that names one file revert may not touch
    # is refused before anything changes.
    steps: list[tuple[str, Callable[[], None]]] = []
    for name, hashes in record["replaced"].items():
        current = _sha_or_none(root / name)
        link = hashes.get("symlink")
        if current == hashes["original_sha256"] and (link is None or _is_link_to(root / name, link)):
            continue
        if current not in (None, hashes["new_sha256"], hashes["original_sha256"] if link is not None else None):
            raise CheckpointError(
                f"{name} was changed after the in-place edit (its bytes are neither the "
                "original nor what weightlock wrote); revert will not overwrite it",
                hint=f"move your {name} aside (or restore it from {PROVENANCE_DIR}/{BACKUP_DIR}/"
                f"{name}), then run revert again",
            )
        backup = contained(root, f"{PROVENANCE_DIR}/{BACKUP_DIR}/{name}")
        if _sha_or_none(backup) != hashes["original_sha256"]:
            raise CheckpointError(
                f"the backup of {name} is missing or does not match its recorded hash",
                hint=f"restore {name} from another copy of the checkpoint; the record was kept",
            )
        if link is not None and _link_target_holds(root, name, link, hashes["original_sha256"]):
            steps.append((f"restored the symlink {name}", partial(_replace_with_link, link, root / name)))
        elif link is not None:
            steps.append(
                (
                    f"restored {name} as a regular file (it was a symlink to {link}, which no longer holds its "
                    "original bytes)",
                    partial(_replace_atomically, backup, root / name),
                )
            )
        else:
            steps.append((f"restored {name}", partial(_replace_atomically, backup, root / name)))
    for name, sha in [*record["created"].items(), *record["added"].items()]:
        current = _sha_or_none(root / name)
        if current is None:
            continue
        if current != sha:
            raise CheckpointError(
                f"{name} is not the file the in-place edit wrote; revert will not remove it",
                hint=f"move {name} aside if it is yours, then run revert again",
            )
        steps.append((f"removed {name}", partial(os.remove, root / name)))
    for old, rename in record["renamed"].items():
        old_there, new_there = os.path.lexists(root / old), os.path.lexists(root / rename["to"])
        if old_there and not new_there:
            continue
        if old_there or not new_there:
            raise CheckpointError(
                f"{'both' if old_there else 'neither'} {old} and {rename['to']} "
                f"{'are' if old_there else 'is'} in the folder; revert cannot tell which "
                "holds the original weights",
                hint=f"keep the one with the original weights as {old}, then run revert again",
            )
        moved = root / rename["to"]
        header = read_header(moved)
        if header.file_size != rename["size"] or header.header_sha256() != rename["header_sha256"]:
            raise CheckpointError(
                f"{rename['to']} is not the {old} the edit renamed (size or header differ)",
                hint=f"put the original {old} back by hand, then run revert again",
            )
        steps.append((f"renamed {rename['to']} back to {old}", partial(os.rename, moved, root / old)))
    for old, swap in record.get("swapped", {}).items():
        steps.extend(_swap_back_steps(root, old, swap))
    for description, step in steps:
        step()
        failpoint("revert-step")
        done.append(description)
    fsync_dir(root)
    if commit:  # the original files are back; removing the record below is not stopped by a Ctrl-C
        mark_committed(f"the original files of {root} were restored")
    # The record goes last, and in two steps (an atomic rename aside, then the delete), so a revert killed
    # here leaves either the whole record or a leftover that the next revert removes.
    trash = root / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
    os.rename(record_dir, trash)
    fsync_dir(root)
    failpoint("revert-record-moved")
    shutil.rmtree(trash)
    fsync_dir(root)
    done.append("removed the weightlock/ record")
    return {"path": str(root), "reverted": True, "actions": done}


__all__ = ["apply_in_place", "revert", "RECORD_NAME", "TOKENIZER_CONFIG_NAME"]


def _gated(record_dir: Path) -> bool:
    """Whether an --out output's record (read only for the hint, as untrusted JSON) says a gated lock was baked."""
    from weightlock.errors import WeightlockError
    from weightlock.io.untrusted import read_json

    try:
        record = read_json(record_dir / "provenance.json", "provenance record")
    except WeightlockError:
        return False
    return isinstance(record, dict) and record.get("gate") is not None
