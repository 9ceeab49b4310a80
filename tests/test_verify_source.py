"""verify believes no claim it cannot check (issue 24, class 2: the second review's two holes).

1. A record deleted (or a GGUF's record key renamed) must not turn a tampered locked output into "verified":
   without a record, every trace weightlock's writers leave fails provenance. The traces are generated from the
   writers' own constants (formats/safetensors/{write,inplace,card}.py, formats/gguf/edit.py), each one alone.
2. Originals of biases the source family already carried (starcoder2 with use_bias, llama.cpp's phi2,
   starcoder2, gptneox) cannot be tied to the source by anything in the output: without ``--source`` they are
   unverifiable (a failure), with it they are compared byte for byte with the source's stored biases, so the
   reviewer's forgery (the source's biases restored, the originals rewritten to add up) fails either way.
   A --source that is not the model the lock was applied to is refused cleanly.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_llama, make_model, random_lock, rewrite_safetensors, run_cli
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import apply_in_place, open_checkpoint, save_lock
from weightlock.api import apply_lock, verify_checkpoint
from weightlock.core.report import ORIGINALS_CHECK
from weightlock.formats.gguf.architectures import BIAS_EXISTING, GGUF_ARCHITECTURES
from weightlock.formats.gguf.edit import FileChanges, _kv_bytes, _kv_string, write_gguf_file
from weightlock.formats.gguf.file import open_gguf
from weightlock.formats.gguf.record import LOCK_KEY, OUR_KEYS, PARENT_LOCK_KEY, RECORD_KEY, embedded_bytes
from weightlock.formats.safetensors.card import BEGIN, END, TAGS
from weightlock.formats.safetensors.folder import PROVENANCE_DIR, PROVENANCE_NAME
from weightlock.formats.safetensors.inplace import OUR_RECORD_ENTRIES, STAGING_PREFIX, TRASH_PREFIX
from weightlock.formats.safetensors.write import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR, SHARDED_ADDED
from weightlock.io.safetensors_file import TensorData, TensorReader, read_header

NOT_LOCKED_LINE = "verified: loads as written; not locked by weightlock (no record)"
# llama.cpp architectures that always carry attn_output.bias, from weightlock's own table: name -> a model type
EXISTING_BIAS_GGUF = {row.name: row.model_types[0] for row in GGUF_ARCHITECTURES if row.bias == BIAS_EXISTING}


def _statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def _message(report, name: str) -> str:
    return next(c.message for c in report.checks if c.name == name)


def _refused(code: int, err: str, what: str = "--source") -> None:
    """A clean refusal: exit 3 (bad input) or 5, one error line, a real hint, no traceback."""
    assert code in (3, 5), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len([line for line in lines if line.startswith(f"weightlock: error: {what}")]) == 1, err
    assert len([line for line in lines if line.startswith("  hint: ") and len(line) > 20]) == 1, err


def _solve(target: np.ndarray, product: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A forged original (target - product, in float32) and the bias it implies as verify sums it (float32):
    within a rounding unit of ``target``, the source's bias."""
    original = (target.astype(np.float64) - product.astype(np.float64)).astype(np.float32)
    implied = np.zeros(target.shape, dtype=np.float32)
    implied += original
    implied += product
    return original, implied


def _folder_products(folder: Path) -> dict[str, np.ndarray]:
    """Each locked bias's W_o @ d as verify recomputes it from the stored weights and the recorded lock."""
    from weightlock import open_checkpoint
    from weightlock.core.families import shape_from_config, spec_for_config
    from weightlock.core.lock import load_lock
    from weightlock.formats.safetensors.plan import stored_linear, weight_product
    from weightlock.io.safetensors_file import TensorReaders

    checkpoint = open_checkpoint(folder)
    spec = spec_for_config(checkpoint.config)
    shape = shape_from_config(checkpoint.config, spec)
    record = checkpoint.provenance
    displacements = load_lock(folder / record["files"]["lock"]).displacements(record["alpha"], shape.num_heads)
    products = {}
    with TensorReaders() as readers:
        for layer, d in displacements.items():
            weight = stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer))
            products[spec.output_bias(layer)] = weight_product(readers, weight, d, shape.head_dim)
    return products


def _gguf_products(path: Path) -> dict[str, np.ndarray]:
    from weightlock.formats.gguf.architectures import OUTPUT_BIAS, OUTPUT_WEIGHT, gguf_architecture
    from weightlock.formats.gguf.edit import gguf_shape, weight_product
    from weightlock.formats.gguf.file import tensor_readers
    from weightlock.formats.gguf.record import read_record
    from weightlock.formats.gguf.verify import record_lock

    model = open_gguf(path)
    shape = gguf_shape(model, gguf_architecture(model.text("general.architecture")))
    record = read_record(model)
    displacements = record_lock(model, record).displacements(float(record["alpha"]), shape.num_heads)
    products = {}
    with tensor_readers(model) as readers:
        for layer, d in displacements.items():
            weight = model.tensors[OUTPUT_WEIGHT.format(layer=layer)]
            products[OUTPUT_BIAS.format(layer=layer)] = weight_product(
                readers[weight.file_index], weight, d, shape.head_dim
            )
    return products


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with TensorReader(path) as reader:
        return {
            name: np.frombuffer(reader.read_bytes(entry), dtype=np.float32).copy()
            for name, entry in read_header(path).tensors.items()
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    fast = {"loader_check": False}
    llama = make_llama(root / "llama")
    sharded = make_llama(root / "sharded", shard_kb=40)
    sc = make_model(root / "sc", "starcoder2", use_bias=True)
    save_lock(random_lock(sc), root / "sc.wlock")
    out = {"llama": llama, "sharded": sharded, "sc": sc, "sc.wlock": root / "sc.wlock"}
    out["llama-out"] = apply_lock(llama, random_lock(llama), out=root / "llama-out", **fast).out
    out["sharded-out"] = apply_lock(sharded, random_lock(sharded), out=root / "sharded-out", **fast).out
    result = apply_lock(sc, root / "sc.wlock", out=root / "sc-out", link_mode="copy", **fast)
    out["sc-out"], out["sc-warnings"] = result.out, result.plan.warnings
    out["sc-relock"] = apply_lock(out["sc-out"], random_lock(sc, seed=7), out=root / "sc-relock", **fast).out
    gguf = write_gguf(root / "llama.gguf")
    out["llama.gguf"] = gguf
    out["llama-out.gguf"] = apply_lock(gguf, lock_for_gguf(gguf), out=root / "llama-out.gguf").out
    out["llama-relock.gguf"] = apply_lock(
        out["llama-out.gguf"], lock_for_gguf(gguf, seed=5), out=root / "llama-relock.gguf"
    ).out
    for arch, model_type in EXISTING_BIAS_GGUF.items():
        src = write_gguf(root / f"{arch}.gguf", arch=arch, bias=True)
        out[f"{arch}.gguf"] = src
        lock = lock_for_gguf(src, model_type=model_type)
        out[f"{arch}-out.gguf"] = apply_lock(src, lock, out=root / f"{arch}-out.gguf").out
    out["fifo"] = root / "fifo"
    os.mkfifo(out["fifo"])
    return out


# --- 1. no record, yet the traces of an edit ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama-out", "sharded-out"])
def test_a_locked_folder_with_its_record_deleted_and_biases_zeroed_fails_verify(world, tmp_path, capsys, which):
    """The review's case: the record deleted, every bias of the added shard zeroed."""
    folder = shutil.copytree(world[which], tmp_path / "stripped")
    record = json.loads((folder / PROVENANCE_DIR / PROVENANCE_NAME).read_text())
    (folder / PROVENANCE_DIR / PROVENANCE_NAME).unlink()
    rewrite_safetensors(
        folder / record["files"]["added_shard"],
        lambda ts: [TensorData(t.name, t.dtype, t.shape, bytes(len(t.data))) for t in ts],
    )
    code, out, _ = run_cli(capsys, "verify", str(folder), "--no-loader-check")
    assert code == 1 and "[FAIL] provenance: carries a weightlock edit's traces" in out, out
    assert "the lock cannot be verified" in out and "re-lock the original model" in out, out
    assert "verified: all checks hold" not in out and NOT_LOCKED_LINE not in out, out
    code, out, _ = run_cli(capsys, "inspect", str(folder))
    assert code == 0 and "locked: no record, but traces of a weightlock edit" in out, out
    code, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    assert code == 0 and json.loads(out)["locked"] is None and json.loads(out)["edit_traces"], out


@pytest.mark.parametrize("which", ["llama-out.gguf", "llama-relock.gguf", "starcoder2-out.gguf"])
def test_a_gguf_with_its_record_key_renamed_fails_verify(world, tmp_path, capsys, which):
    data = world[which].read_bytes()
    assert data.count(RECORD_KEY.encode()) == 1
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(data.replace(RECORD_KEY.encode(), b"weightlock.xdit"))
    code, out, _ = run_cli(capsys, "verify", str(renamed))
    assert code == 1 and "[FAIL] provenance: carries a weightlock edit's traces" in out, out
    assert LOCK_KEY in out and "weightlock.xdit" in out and "all checks hold" not in out, out
    code, out, _ = run_cli(capsys, "inspect", str(renamed))
    assert code == 0 and "locked: no record, but traces of a weightlock edit" in out, out


def _folder_traces() -> dict[str, object]:
    """Each trace the folder writers leave, from their constants: label -> how to add it to a clean folder."""

    def entry(relative: str, folder: bool = False):
        def add(root: Path) -> None:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if folder else path.write_bytes(b"left by an edit")

        return add

    def card(text: str):
        return lambda root: (root / "README.md").write_text(text)

    names = (OUR_RECORD_ENTRIES | {LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR}) - {PROVENANCE_NAME}
    traces: dict[str, object] = {f"{PROVENANCE_DIR}/{name}": entry(f"{PROVENANCE_DIR}/{name}") for name in names}
    traces[f"{PROVENANCE_DIR}/ (empty)"] = entry(PROVENANCE_DIR, folder=True)
    traces[STAGING_PREFIX] = entry(f"{STAGING_PREFIX}1234", folder=True)
    traces[TRASH_PREFIX] = entry(f"{TRASH_PREFIX}1234", folder=True)
    traces[SHARDED_ADDED] = entry(SHARDED_ADDED.format(suffix=""))
    traces[BEGIN] = card(f"a model\n\n{BEGIN}\nsomething\n")
    traces[END] = card(f"a model\n\n{END}\n")
    traces[f"tag {TAGS[0]}"] = card(f"---\ntags:\n- {TAGS[0]}\n---\na model\n")
    # the review's false positives: harmless alone, each still a trace
    traces[f"tags: [{TAGS[0]}]"] = card(f"---\ntags: [{TAGS[0]}]\n---\na model\n")
    traces[f"{PROVENANCE_DIR}/notes.txt"] = entry(f"{PROVENANCE_DIR}/notes.txt")
    traces[f"{BEGIN} in a fenced block"] = card(f"a model\n\n```\n{BEGIN}\n```\n")
    traces[f"{STAGING_PREFIX}notes (empty file)"] = lambda root: (root / f"{STAGING_PREFIX}notes").write_bytes(b"")
    return traces


FOLDER_TRACES = _folder_traces()
# A lock lives only in attention-output biases: traces without a record on a model without them cannot hide one
# (a warning), with them they may (a failure). "llama": no o_proj bias; "sc": starcoder2, which has them.
TRACE_VERDICTS = {"llama": ("warn", "no o_proj bias, so no lock is present"), "sc": ("fail", "the lock cannot be")}


@pytest.mark.parametrize("model", sorted(TRACE_VERDICTS))
@pytest.mark.parametrize("label", sorted(FOLDER_TRACES))
def test_each_folder_trace_alone_without_a_record_fails_provenance_only_where_a_lock_could_hide(
    world, tmp_path, label, model
):
    folder = shutil.copytree(world[model], tmp_path / "clean")
    clean = verify_checkpoint(folder, loader_check=False)
    assert clean.ok and _statuses(clean)["provenance"] == "skip"
    FOLDER_TRACES[label](folder)  # type: ignore[operator]
    report = verify_checkpoint(folder, loader_check=False)
    status, words = TRACE_VERDICTS[model]
    assert _statuses(report)["provenance"] == status, report.checks
    # (a stray bias shard also fails stray_weight_files: a loader might glob it)
    assert report.ok == (status == "warn") or _statuses(report)["stray_weight_files"] == "fail", report.checks
    message = _message(report, "provenance")
    assert "traces" in message and "weightlock edit" in message and words in message, message


GGUF_TRACE_KEYS = sorted({*OUR_KEYS, PARENT_LOCK_KEY.format(1), os.path.commonprefix(OUR_KEYS) + "future"})


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("key", GGUF_TRACE_KEYS)
def test_each_gguf_trace_alone_without_a_record_fails_provenance_only_where_a_lock_could_hide(tmp_path, key, bias):
    arch = "starcoder2" if bias else "llama"  # starcoder2 has attn_output.bias; the llama file none
    assert verify_checkpoint(write_gguf(tmp_path / "clean.gguf", arch=arch, bias=bias)).ok
    report = verify_checkpoint(write_gguf(tmp_path / "t.gguf", arch=arch, bias=bias, extra={key: "left by an edit"}))
    fails = bias or key == RECORD_KEY  # a record that cannot be read is a failure, not a trace
    assert report.ok != fails and _statuses(report)["provenance"] == ("fail" if fails else "warn"), report.checks
    assert ("no attn_output bias, so no lock is present" in _message(report, "provenance")) != fails


@pytest.mark.parametrize("which", ["llama", "llama.gguf"])
def test_an_unlocked_checkpoint_is_not_reported_as_a_verified_lock(world, capsys, which):
    code, out, _ = run_cli(capsys, "verify", str(world[which]), "--no-loader-check")
    assert code == 0 and out.strip().endswith(NOT_LOCKED_LINE) and "all checks hold" not in out, out


# --- 2. originals of biases the source already had ------------------------------------------------------------


def test_a_genuine_existing_bias_folder_is_unverifiable_without_source_and_verified_with_it(world, capsys):
    out = world["sc-out"]
    code, text, _ = run_cli(capsys, "verify", str(out), "--no-loader-check")
    assert code == 1 and f"[FAIL] {ORIGINALS_CHECK}: unverifiable:" in text, text
    assert "only the source can confirm them" in text and "pass --source SOURCE" in text, text
    assert "lock_biases: " in text and "[FAIL] lock_biases" not in text, text  # the lock itself does hold
    code, text, _ = run_cli(capsys, "verify", str(out), "--no-loader-check", "--source", str(world["sc"]))
    assert code == 0 and "originals equal the source's biases" in text, text
    assert text.strip().endswith("verified: all checks hold"), text
    assert any("--source" in w for w in world["sc-warnings"])  # apply's summary says verify needs it
    assert verify_checkpoint(out, loader_check=False, source=world["sc"]).ok


def test_a_relocked_existing_bias_folder_checks_the_first_edits_originals(world):
    relock = world["sc-relock"]
    assert not verify_checkpoint(relock, loader_check=False).ok
    report = verify_checkpoint(relock, loader_check=False, source=world["sc"])
    assert report.ok and _statuses(report)[ORIGINALS_CHECK] == "pass", report.checks
    assert _statuses(report)["edit_chain"] == "pass"


def test_the_forged_originals_attack_on_a_folder_fails_with_and_without_source(world, tmp_path, capsys):
    """sc2.py: the source's own biases restored in the shard and the originals rewritten to original - W_o d, so
    that the record adds up (lock_biases passes); only the source can show the originals are not its biases."""
    out = shutil.copytree(world["sc-out"], tmp_path / "forged")
    originals_path = out / PROVENANCE_DIR / ORIGINALS_NAME
    originals = _read_all(originals_path)
    products = _folder_products(out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in {weight_map[name] for name in originals}:
        solved = {n: _solve(originals[n], products[n]) for n in _read_all(out / shard) if n in originals}
        forged = {n: original for n, (original, _) in solved.items()}
        restore = {n: implied for n, (_, implied) in solved.items()}  # the source's bias, to a rounding unit
        rewrite_safetensors(
            out / shard,
            lambda ts, restore=restore: [
                TensorData(t.name, t.dtype, t.shape, restore[t.name].tobytes()) if t.name in restore else t for t in ts
            ],
        )
        rewrite_safetensors(
            originals_path,
            lambda ts, forged=forged: [
                TensorData(t.name, t.dtype, t.shape, forged[t.name].astype(np.float32).tobytes())
                if t.name in forged
                else t
                for t in ts
            ],
        )
    report = verify_checkpoint(out, loader_check=False)
    assert _statuses(report)["lock_biases"] == "pass", report.failures()  # the forgery adds up
    assert not report.ok and _message(report, ORIGINALS_CHECK).startswith("unverifiable:")
    code, text, _ = run_cli(capsys, "verify", str(out), "--no-loader-check", "--source", str(world["sc"]))
    assert code == 1 and f"[FAIL] {ORIGINALS_CHECK}" in text and "differs from the source's" in text, text


@pytest.mark.parametrize("arch", sorted(EXISTING_BIAS_GGUF))
def test_a_genuine_existing_bias_gguf_is_unverifiable_without_source_and_verified_with_it(world, capsys, arch):
    out, src = world[f"{arch}-out.gguf"], world[f"{arch}.gguf"]
    code, text, _ = run_cli(capsys, "verify", str(out))
    assert code == 1 and f"[FAIL] {ORIGINALS_CHECK}: unverifiable:" in text, text
    assert "only the source can confirm their values" in text and "pass --source SOURCE" in text, text
    code, text, _ = run_cli(capsys, "verify", str(out), "--source", str(src))
    assert code == 0 and "originals equal the source's biases" in text, text


def _rewrite_record(locked: Path, out: Path, record: dict, data: bytes) -> Path:
    """``data`` (a locked GGUF's bytes, tensors changed in place) with its record replaced."""
    model = open_gguf(locked)
    changed = out.with_suffix(".data.gguf")
    changed.write_bytes(data)
    parents, depth = [], 1
    while model.metadata.get(PARENT_LOCK_KEY.format(depth)) is not None:
        parents.append(embedded_bytes(model, PARENT_LOCK_KEY.format(depth)))
        depth += 1
    extra = [
        _kv_string(RECORD_KEY, json.dumps(record)),
        _kv_bytes(LOCK_KEY, embedded_bytes(model, LOCK_KEY)),
        *(_kv_bytes(PARENT_LOCK_KEY.format(i), lock) for i, lock in enumerate(parents, start=1)),
    ]
    write_gguf_file(open_gguf(changed).files[0], out, extra, [], FileChanges(), None)
    return out


def test_the_forged_originals_attack_on_a_gguf_fails_with_and_without_source(world, tmp_path, capsys):
    locked, src = world["starcoder2-out.gguf"], world["starcoder2.gguf"]
    model = open_gguf(locked)
    record = json.loads(model.metadata[RECORD_KEY].value)  # type: ignore[arg-type]
    data = bytearray(locked.read_bytes())
    products = _gguf_products(locked)
    for name, item in record["tensors"]["replaced"].items():
        tensor = model.tensors[name]
        start = model.files[0].data_start + tensor.offset
        forged, implied = _solve(np.frombuffer(base64.b64decode(item["data"]), dtype="<f4"), products[name])
        data[start : start + tensor.nbytes] = implied.tobytes()  # the source's bias (to a rounding unit): no lock
        item["data"] = base64.b64encode(forged.astype("<f4").tobytes()).decode()
    forged = _rewrite_record(locked, tmp_path / "forged.gguf", record, bytes(data))
    report = verify_checkpoint(forged)
    assert _statuses(report)["lock biases"] == "pass", report.failures()  # the forgery adds up
    assert not report.ok and _message(report, ORIGINALS_CHECK).startswith("unverifiable:")
    code, text, _ = run_cli(capsys, "verify", str(forged), "--source", str(src))
    assert code == 1 and f"[FAIL] {ORIGINALS_CHECK}" in text and "differs from the source's" in text, text


def test_a_llama_gguf_needs_no_source_and_checks_it_when_given(world, capsys):
    relock, source = str(world["llama-relock.gguf"]), str(world["llama.gguf"])
    code, text, _ = run_cli(capsys, "verify", relock, "--source", source, "--engines", "llama.cpp")
    assert code == 0 and f"[ok  ] {ORIGINALS_CHECK}: no originals claimed" in text, text
    assert verify_checkpoint(world["llama-relock.gguf"], engines="llama.cpp").ok  # without --source: nothing to confirm


@pytest.mark.parametrize(
    "checkpoint,source",
    [
        ("sc-out", "llama"),  # a different model (its config is not the recorded original)
        ("sc-out", "sc-out"),  # the output itself
        ("sc-out", "fifo"),
        ("sc-out", "starcoder2.gguf"),  # a GGUF for a folder
        ("sc-out", "missing"),
        ("starcoder2-out.gguf", "llama.gguf"),  # a different model
        ("starcoder2-out.gguf", "starcoder2-out.gguf"),
        ("starcoder2-out.gguf", "fifo"),
        ("starcoder2-out.gguf", "sc"),  # a folder for a GGUF
        ("llama-out.gguf", "starcoder2.gguf"),
    ],
)
def test_a_source_that_is_not_the_model_the_lock_was_applied_to_is_refused_cleanly(world, capsys, checkpoint, source):
    where = world.get(source, Path(str(world["fifo"]) + "-missing"))
    code, out, err = run_cli(capsys, "verify", str(world[checkpoint]), "--no-loader-check", "--source", str(where))
    _refused(code, err)
    assert not out.strip(), out


# --- 3. net alpha of a relock chain (issue 24, review 2) ------------------------------------------------------


def _without_net_guards(monkeypatch) -> None:
    """Let apply write (and publish) an edit whose lock nets below zero, as a weightlock before the net check
    did: the only way to get a genuine anti-lock chain whose biases add up, for verify to judge."""
    import weightlock.core.records as records
    import weightlock.formats.gguf.verify as gguf_verify
    import weightlock.formats.safetensors.verify as folder_verify

    monkeypatch.setattr(records, "check_record_net", lambda record, what: None)
    monkeypatch.setattr(folder_verify, "check_net_lock", lambda record, report: None)
    monkeypatch.setattr(gguf_verify, "check_net_lock", lambda record, report: None)


def _chain(world, tmp_path, kind: str, alphas: list[float]) -> tuple[Path, object]:
    """``alphas`` applied one after the other, each edit on the one before, of one lock."""
    src = world["llama"] if kind == "folder" else world["llama.gguf"]
    lock = random_lock(src) if kind == "folder" else lock_for_gguf(src)
    current = src
    for i, alpha in enumerate(alphas):
        name = f"edit{i}" + ("" if kind == "folder" else ".gguf")
        current = apply_lock(current, lock, out=tmp_path / name, alpha=alpha, loader_check=False).out
    return current, lock


@pytest.mark.parametrize("kind", ["folder", "gguf"])
@pytest.mark.parametrize("alphas,net", [([-6.0], -6.0), ([-6.0, 3.0], -3.0), ([6.0, 3.0, -12.0], -3.0)])
def test_a_chain_whose_lock_nets_below_zero_fails_net_lock(world, tmp_path, capsys, monkeypatch, kind, alphas, net):
    """The review's case: -6 then +3 of one lock reads as "alpha 3 verified"; it is an anti-lock at -3."""
    with monkeypatch.context() as patched:
        _without_net_guards(patched)
        out, _ = _chain(world, tmp_path, kind, alphas)
    code, text, _ = run_cli(capsys, "verify", str(out), "--no-loader-check")
    assert code == 1 and f"[FAIL] net_lock: the edits net to alpha {net:g} of lock" in text, text
    assert "the model is not locked" in text and "apply the lock at a positive alpha to the original" in text, text
    assert "all checks hold" not in text, text
    code, text, _ = run_cli(capsys, "verify", str(out), "--no-loader-check", "--json")  # validated by its schema
    locked = json.loads(text)["locked"]
    assert code == 1 and locked["alpha"] == alphas[-1] and locked["net_alpha"] == net, locked
    assert locked["edits"] == len(alphas) and locked["net_alphas"] == {locked["lock_sha256"]: net}, locked
    code, text, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and (f"net alpha {net}" in text if len(alphas) > 1 else f"alpha {net}" in text), text
    if kind == "folder":  # the card quotes the net, and its undo returns to the source
        card = (out / "README.md").read_text()
        assert f"| alpha | {net:g}" in card and f"--alpha {-net:g} --out" in card, card


@pytest.mark.parametrize("kind", ["folder", "gguf"])
@pytest.mark.parametrize("alphas", [[-6.0], [3.0, -6.0]])
def test_apply_refuses_an_edit_after_which_the_lock_nets_below_zero(world, tmp_path, capsys, kind, alphas):
    src = world["llama"] if kind == "folder" else world["llama.gguf"]
    lock = random_lock(src) if kind == "folder" else lock_for_gguf(src)
    save_lock(lock, tmp_path / "l.wlock")
    current = src
    if len(alphas) > 1:
        current = _chain(world, tmp_path, kind, alphas[:-1])[0]
    out = tmp_path / ("neg" if kind == "folder" else "neg.gguf")
    args = ["apply", str(current), "--lock", str(tmp_path / "l.wlock"), "--alpha", str(alphas[-1]), "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    _refused(code, err, what="")
    assert "would net to alpha" in err and "the lock's opposite" in err and not out.exists(), err


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_an_undo_nets_to_zero_and_a_partial_undo_to_the_rest(world, tmp_path, capsys, kind):
    undone, _ = _chain(world, tmp_path / "undo", kind, [4.0, -4.0])
    deployed = ["--engines", "llama.cpp"] if kind == "gguf" else []  # transformers' GGUF loader drops the bias
    code, text, _ = run_cli(capsys, "verify", str(undone), "--no-loader-check", *deployed)
    assert code == 0 and "[warn] net_lock: the edits net to alpha 0 of lock" in text, text
    assert text.strip().endswith("they net to alpha 0: the lock is off, the model is not locked"), text
    partial, _ = _chain(world, tmp_path / "partial", kind, [6.0, -2.0])
    code, text, _ = run_cli(capsys, "verify", str(partial), "--no-loader-check", *deployed)
    assert code == 0 and "[ok  ] net_lock: lock" in text and "nets to alpha 4 over 2 edit(s)" in text, text
    assert "(the chain's edits net to alpha 4)" in text and text.strip().endswith("verified: all checks hold"), text
    if kind == "folder":
        assert "The edits net to alpha 0: the lock is off" in (undone / "README.md").read_text()
        card = (partial / "README.md").read_text()
        assert "| alpha | 4 (net of 2 edits; the newest at -2) |" in card and "--alpha -4 --out" in card, card


# --- 4. --source inside (or around) the checkpoint; the in-place warning ----------------------------------------


@pytest.fixture(scope="module")
def in_place_sc(world, tmp_path_factory):
    folder = shutil.copytree(world["sc"], tmp_path_factory.mktemp("inplace") / "sc")
    result = apply_in_place(folder, world["sc.wlock"], loader_check=False)
    return folder, result.plan.warnings


def test_an_in_place_edit_of_an_existing_bias_family_warns_as_apply_out_does(world, in_place_sc):
    _, warnings = in_place_sc
    assert world["sc-warnings"] and [w for w in warnings if "needs --source SOURCE" in w] == [
        w for w in world["sc-warnings"] if "needs --source SOURCE" in w
    ], warnings


@pytest.mark.parametrize("where", ["backup", "record folder", "parent of the checkpoint", "link to the backup"])
def test_a_source_inside_or_around_the_checkpoint_is_refused(world, in_place_sc, tmp_path, capsys, where):
    """The review's forgery had --source ip_forged/weightlock/backup: what the checkpoint holds cannot vouch for it."""
    folder, _ = in_place_sc
    source = {
        "backup": folder / PROVENANCE_DIR / "backup",
        "record folder": folder / PROVENANCE_DIR,
        "parent of the checkpoint": folder.parent,
        "link to the backup": tmp_path / "looks-like-the-source",
    }[where]
    if where == "link to the backup":
        source.symlink_to(folder / PROVENANCE_DIR / "backup", target_is_directory=True)
    code, out, err = run_cli(capsys, "verify", str(folder), "--no-loader-check", "--source", str(source))
    _refused(code, err)
    assert ("inside the checkpoint" in err or "holds the checkpoint" in err) and not out.strip(), err
    code, text, _ = run_cli(capsys, "verify", str(folder), "--no-loader-check", "--source", str(world["sc"]))
    assert code == 0 and "originals equal the source's biases" in text, text  # the real source, kept outside


def test_a_gguf_source_sharing_the_file_is_refused_but_a_neighbour_is_not(world, tmp_path, capsys):
    out, src = world["starcoder2-out.gguf"], world["starcoder2.gguf"]
    (tmp_path / "same.gguf").symlink_to(out)
    code, _, err = run_cli(capsys, "verify", str(out), "--source", str(tmp_path / "same.gguf"))
    _refused(code, err)
    assert out.parent == src.parent  # the source beside the output in one folder is a different file set
    code, text, _ = run_cli(capsys, "verify", str(out), "--source", str(src))
    assert code == 0, text


# --- 5. chain artefacts no record names, and links out of the record folder -----------------------------------


def _folder_chain_artefacts(depth: int) -> dict[str, object]:
    """Each thing under weightlock/parents/ that a ``depth``-edit chain does not imply, from the writer's names."""
    parents = Path(PROVENANCE_DIR) / PARENTS_DIR

    def copy_of_lock(relative: Path):
        def add(root: Path) -> None:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / PROVENANCE_DIR / LOCK_COPY_NAME, root / relative)

        return add

    def link_out(root: Path) -> None:  # parents/1 -> a folder outside holding the same files
        elsewhere = root.parent / f"{root.name}-elsewhere"
        shutil.move(str(root / parents / "1"), elsewhere)
        (root / parents / "1").symlink_to(elsewhere, target_is_directory=True)

    cases: dict[str, object] = {
        f"{PARENTS_DIR}/{depth}/{LOCK_COPY_NAME}": copy_of_lock(parents / str(depth) / LOCK_COPY_NAME),
        f"{PARENTS_DIR}/0/{LOCK_COPY_NAME}": copy_of_lock(parents / "0" / LOCK_COPY_NAME),
        f"{PARENTS_DIR}/x/{LOCK_COPY_NAME}": copy_of_lock(parents / "x" / LOCK_COPY_NAME),
        f"{PARENTS_DIR}/01/{LOCK_COPY_NAME}": copy_of_lock(parents / "01" / LOCK_COPY_NAME),
    }
    if depth > 1:
        cases[f"{PARENTS_DIR}/1/extra.wlock"] = copy_of_lock(parents / "1" / "extra.wlock")
        cases[f"{PARENTS_DIR}/1 -> outside"] = link_out
    return cases


@pytest.fixture(scope="module")
def relocked_llama(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("relock")
    llama = world["llama"]
    return apply_lock(world["llama-out"], random_lock(llama, seed=3), out=root / "relock", loader_check=False).out


@pytest.mark.parametrize("which,depth", [("llama-out", 1), ("relock", 2)])
def test_every_chain_artefact_no_record_names_fails_provenance(world, relocked_llama, tmp_path, which, depth):
    locked = world[which] if which != "relock" else relocked_llama
    assert verify_checkpoint(locked, loader_check=False).ok
    for label, add in _folder_chain_artefacts(depth).items():
        folder = shutil.copytree(locked, tmp_path / label.replace("/", "_").replace(" ", ""), symlinks=True)
        add(folder)  # type: ignore[operator]
        report = verify_checkpoint(folder, loader_check=False)
        assert not report.ok and _statuses(report)["provenance"] == "fail", (label, report.checks)
        check = next(c for c in report.checks if c.name == "provenance")
        named = " ".join([check.message, *check.details])
        assert f"{PROVENANCE_DIR}/{PARENTS_DIR}" in named, (label, named)


@pytest.mark.parametrize("which,depth", [("llama-out.gguf", 1), ("llama-relock.gguf", 2)])
def test_every_gguf_lock_key_no_record_names_fails_provenance(world, tmp_path, which, depth):
    locked = world[which]
    model = open_gguf(locked)
    record = json.loads(model.metadata[RECORD_KEY].value)  # type: ignore[arg-type]
    ours = [_kv_string(RECORD_KEY, json.dumps(record)), _kv_bytes(LOCK_KEY, embedded_bytes(model, LOCK_KEY))]
    ours += [
        _kv_bytes(PARENT_LOCK_KEY.format(k), embedded_bytes(model, PARENT_LOCK_KEY.format(k))) for k in range(1, depth)
    ]
    lock = embedded_bytes(model, LOCK_KEY)
    prefix = os.path.commonprefix(OUR_KEYS)
    extras = [
        PARENT_LOCK_KEY.format(depth),
        PARENT_LOCK_KEY.format(depth + 1),
        PARENT_LOCK_KEY.format(0),
        PARENT_LOCK_KEY.format("x"),
        PARENT_LOCK_KEY.format("01"),
        prefix + "future",
    ]
    for key in extras:
        out = tmp_path / f"{key}.gguf"
        write_gguf_file(model.files[0], out, [*ours, _kv_bytes(key, lock)], [], FileChanges(), None)
        report = verify_checkpoint(out)
        assert not report.ok and _statuses(report)["provenance"] == "fail", (key, report.checks)
        assert key in next(c for c in report.checks if c.name == "provenance").details, (key, report.checks)


def _one_layer_lock(source_model):
    from weightlock import build_lock

    rng = np.random.default_rng(3)
    return build_lock([1], [0], rng.normal(size=(1, source_model.head_dim)), [1.5], source_model, default_alpha=3.0)


def test_a_lock_on_one_layer_of_a_biased_family_keeps_the_other_layers_biases_and_verifies(tmp_path):
    """A family whose layers all carry an o_proj bias, locked on one layer only: the other layers' biases are
    left as they are and recorded nowhere, which is no claim that the edit created them (verify with --source
    passes, as apply's own check does), for a folder and a GGUF file."""
    from weightlock.core.lock import source_model_from_config

    sc = make_model(tmp_path / "sc", "starcoder2", use_bias=True)
    lock = _one_layer_lock(source_model_from_config(open_checkpoint(sc).config))
    out = apply_lock(sc, lock, out=tmp_path / "sc-out", loader_check=False).out
    report = verify_checkpoint(out, source=sc, loader_check=False, engines="transformers")
    assert report.ok, report.checks
    for arch, model_type in EXISTING_BIAS_GGUF.items():
        src = write_gguf(tmp_path / f"{arch}.gguf", arch=arch, bias=True)
        probe = lock_for_gguf(src, model_type=model_type)
        locked = apply_lock(src, _one_layer_lock(probe.source_model), out=tmp_path / f"{arch}-out.gguf").out
        report = verify_checkpoint(locked, source=src, engines="llama.cpp")
        assert report.ok, (arch, [c for c in report.checks if c.status != "pass"])
