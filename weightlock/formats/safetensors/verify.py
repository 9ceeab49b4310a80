"""``verify`` for a safetensors folder: does it read as written, and does it hold the lock its record claims?

The folder's own checks (files, config, record chain, biases recomputed from the lock and the stored weights,
finite values); the engines' checks (transformers' class on the meta device, vLLM) are passed in by
:mod:`weightlock.api`, which is also where a path's format is decided.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from weightlock.core.edit import apply_config_changes
from weightlock.core.families import ModelShape, family, shape_from_config, spec_for_config
from weightlock.core.lock import load_lock
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
    WRONG_SOURCE_HINT,
    EngineChecks,
    Report,
    check_net_lock,
    locked_summary,
    provenance_line,
    source_error,
    traces_without_record,
)
from weightlock.errors import (
    WeightlockError,
)
from weightlock.formats.safetensors.folder import Checkpoint, contained, is_alternative_weight_file, open_checkpoint
from weightlock.formats.safetensors.plan import bias_consistency_problems, stored_linear, weight_product
from weightlock.io.safetensors_file import FLOAT_DTYPES, TensorReaders, float32_to_raw, raw_to_float32, read_header
from weightlock.io.schema import schema_errors
from weightlock.io.untrusted import file_sha256, read_bytes


def open_source_folder(source, path, source_format: str) -> Checkpoint:
    """``verify --source`` for a folder: the source checkpoint (headers only), refused (exit 3) when it cannot be
    opened, is of another format (``source_format``, from :func:`weightlock.formats.detect`), or is the
    checkpoint being verified."""
    from weightlock.formats import FORMATS, SAFETENSORS

    if isinstance(source, Checkpoint):
        opened = source
    else:
        if os.path.lexists(Path(source)):  # before opening (what lies inside need not be a model);
            _refuse_same(source, source, path)  # a Hub id is checked once resolved, below
        if source_format != SAFETENSORS:
            raise source_error(
                source, f"is {FORMATS[source_format]}; the checkpoint verified is {FORMATS[SAFETENSORS]}"
            )
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


def verify_folder(
    path, report: Report, *, expected=None, deep: bool = False, source=None, engines: EngineChecks = NO_ENGINES
) -> Report:
    """The folder's own checks on the checkpoint at ``path``, added to ``report``; ``engines``' checks run where
    the architecture is known (serving) and at the end (loading). ``source``: an open source Checkpoint
    (:func:`open_source_folder`)."""
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
        # a lock in a model of an architecture weightlock does not know (a record, or attention-output biases)
        # cannot be checked, nor can whether any engine serves it: a failure, as for GGUF files
        from weightlock.formats.safetensors.folder import PROVENANCE_DIR

        biases = sorted(n for n in checkpoint.tensors if n.endswith(("o_proj.bias", "attention.dense.bias")))
        locked = (checkpoint.root / PROVENANCE_DIR).exists() or biases
        report.add(
            "architecture",
            FAIL if locked else WARN,
            e.message
            + (
                "; it holds weightlock's record or attention-output biases, whose lock and serving cannot be checked"
                if locked
                else "; architecture checks skipped"
            ),
        )
        shape = None
    if shape is not None:
        report.add(
            "architecture",
            PASS,
            f"{shape.architecture}: {shape.num_layers} layers, {shape.num_heads} heads of {shape.head_dim}",
        )
        _check_config_agrees(checkpoint, spec, shape, report)
        for serving_check in engines.serving:
            serving_check(checkpoint, spec, shape, report)
        _check_provenance(checkpoint, spec, shape, report, expected, source)
    _check_finite(checkpoint, report, deep)
    for loading_check in engines.loading:
        loading_check(checkpoint, report)
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


def folder_traces(root: Path) -> list[str]:
    """What weightlock's folder writers (write.py, inplace.py, card.py) leave in a checkpoint besides the record,
    named from their own constants: anything under weightlock/, an in-place edit's staging or reverted folders,
    our added bias shards, and the card's section markers or weightlock tag."""
    from weightlock.formats.safetensors.card import BEGIN, CARD_NAME, END, MAX_CARD_BYTES, TAGS, card_tags
    from weightlock.formats.safetensors.folder import PROVENANCE_DIR
    from weightlock.formats.safetensors.inplace import STAGING_PREFIX, TRASH_PREFIX
    from weightlock.formats.safetensors.write import SHARDED_ADDED

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
    gated = record.get("gate") is not None
    if gated != (lock.gate is not None):
        problems = problems or ["the record and its lock disagree on whether the edit is gated"]
    if _gated_parent(record):
        problems = problems or ["an earlier edit in the record chain is gated: weightlock never edits a gated output"]
    # a gated edit's push is in the MLPs' gate neurons, checked below; its o_proj biases hold none
    locked = set() if gated else {spec.output_bias(layer) for layer in lock.heads_by_layer()}
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
    if gated:
        from weightlock.formats.safetensors.gated import gate_neuron_problems

        gate_problems, how = gate_neuron_problems(checkpoint, spec, shape, lock, record, source)
        if gate_problems:
            report.add("gate_neurons", FAIL, gate_problems[0], gate_problems[1:])
        else:
            report.add("gate_neurons", PASS, how)
    if record["parent"] is not None:
        _check_edit_chain(checkpoint, spec, shape, record, report, trusted=expected is not None)
    if not any(c.name == "edit_chain" and c.status == FAIL for c in report.checks):  # the chain's records hold
        _check_original_biases(checkpoint, spec, shape, record, report, source, trusted=expected is not None)


def _chain_folder_problems(checkpoint: Checkpoint, record: dict) -> list[str]:
    """weightlock/parents/ holds exactly what the record chain implies: a folder K for each earlier edit
    (K = 1 .. edits-1), each holding only that edit's lock and originals, all inside the checkpoint. A folder,
    file or link no record names (an extra parent lock, parents/1 linked elsewhere) is named and failed."""
    from weightlock.core.records import chain_length
    from weightlock.formats.safetensors.folder import PROVENANCE_DIR
    from weightlock.formats.safetensors.write import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR

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
    from weightlock.formats.safetensors.write import ORIGINALS_NAME, PARENTS_DIR

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
    # the biases the first edit wrote (a layer the lock does not touch keeps its bias, unrecorded)
    wrote = set(root["tensors"]["added"]) | set(root["tensors"]["locked"]) | set(root["tensors"]["replaced"])
    problems += [
        f"{name}: the source has it, yet the record says the edit created it"
        for name in sorted((own & wrote & set(source.tensors)) - set(claimed))
    ]
    if problems:
        report.add(ORIGINALS_CHECK, FAIL, f"{len(problems)} recorded original(s) are not the source's biases", problems)
    elif not claimed:
        report.add(ORIGINALS_CHECK, PASS, f"{NO_ORIGINALS}, and the source has none of the biases the edit created")
    else:
        report.add(
            ORIGINALS_CHECK, PASS, f"originals equal the source's biases ({len(claimed)} compared byte for byte)"
        )


def _gated_parent(record: dict) -> bool:
    """Whether any earlier edit the record chain names is a gated one (its walk bounded as recorded_classes')."""
    parent = record.get("parent")
    for _ in range(64):
        if not isinstance(parent, dict):
            return False
        if parent.get("gate") is not None:
            return True
        parent = parent.get("parent")
    return False


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
    # a record that leaves a locked bias out must not exempt it from the check. (A gated lock's push is in
    # the MLPs' neurons, whether it is gated is the recorded lock's: no o_proj bias holds it.)
    locked = set() if lock.gate is not None else {spec.output_bias(layer) for layer in heads}
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
    from weightlock.formats.safetensors.write import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR

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
    from weightlock.formats.safetensors.card import CARD_NAME, MAX_CARD_BYTES, card_lock_sha256, card_tags

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
        displacements = {} if record.get("gate") else lock.displacements(record["alpha"], shape.num_heads)
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
