"""verify believes no claim it cannot check (issue 24, class 2: the second review's two holes).

1. A record deleted (or a GGUF's record key renamed) must not turn a tampered locked output into "verified":
   without a record, every trace weightlock's writers leave fails provenance. The traces are generated from the
   writers' own constants (writer.py, inplace.py, card.py, gguf_format/edit.py), each one alone.
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

from weightlock import save_lock
from weightlock.apply import apply_lock
from weightlock.card import BEGIN, END, TAGS
from weightlock.checkpoint import PROVENANCE_DIR, PROVENANCE_NAME
from weightlock.gguf_format.architectures import BIAS_EXISTING, GGUF_ARCHITECTURES
from weightlock.gguf_format.edit import (
    LOCK_KEY,
    OUR_KEYS,
    PARENT_LOCK_KEY,
    RECORD_KEY,
    _kv_bytes,
    _kv_string,
    write_gguf_file,
)
from weightlock.gguf_format.file import open_gguf
from weightlock.gguf_format.verify import embedded_bytes
from weightlock.inplace import OUR_RECORD_ENTRIES, STAGING_PREFIX, TRASH_PREFIX
from weightlock.safetensors_file import TensorData, TensorReader, read_header
from weightlock.verify import ORIGINALS_CHECK, verify_checkpoint
from weightlock.writer import LOCK_COPY_NAME, ORIGINALS_NAME, PARENTS_DIR, SHARDED_ADDED

NOT_LOCKED_LINE = "verified: loads as written; not locked by weightlock (no record)"
# llama.cpp architectures that always carry attn_output.bias, from weightlock's own table: name -> a model type
EXISTING_BIAS_GGUF = {row.name: row.model_types[0] for row in GGUF_ARCHITECTURES if row.bias == BIAS_EXISTING}


def _statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def _message(report, name: str) -> str:
    return next(c.message for c in report.checks if c.name == name)


def _refused(code: int, err: str) -> None:
    """A clean refusal: exit 3 (bad input) or 5, one error line, a real hint, no traceback."""
    assert code in (3, 5), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len([line for line in lines if line.startswith("weightlock: error: --source")]) == 1, err
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
    from weightlock.architectures import shape_from_config, spec_for_config
    from weightlock.lock import load_lock
    from weightlock.plan import stored_linear, weight_product
    from weightlock.safetensors_file import TensorReaders

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
    from weightlock.gguf_format.architectures import OUTPUT_BIAS, OUTPUT_WEIGHT, gguf_architecture
    from weightlock.gguf_format.edit import gguf_shape, weight_product
    from weightlock.gguf_format.file import tensor_readers
    from weightlock.gguf_format.verify import read_record, record_lock

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
    return traces


FOLDER_TRACES = _folder_traces()


@pytest.mark.parametrize("label", sorted(FOLDER_TRACES))
def test_each_folder_trace_alone_without_a_record_fails_provenance(world, tmp_path, label):
    folder = shutil.copytree(world["llama"], tmp_path / "clean")
    clean = verify_checkpoint(folder, loader_check=False)
    assert clean.ok and _statuses(clean)["provenance"] == "skip"
    FOLDER_TRACES[label](folder)  # type: ignore[operator]
    report = verify_checkpoint(folder, loader_check=False)
    assert not report.ok and _statuses(report)["provenance"] == "fail", report.checks
    assert "carries a weightlock edit's traces" in _message(report, "provenance")


GGUF_TRACE_KEYS = sorted({*OUR_KEYS, PARENT_LOCK_KEY.format(1), os.path.commonprefix(OUR_KEYS) + "future"})


@pytest.mark.parametrize("key", GGUF_TRACE_KEYS)
def test_each_gguf_trace_alone_without_a_record_fails_provenance(tmp_path, key):
    assert verify_checkpoint(write_gguf(tmp_path / "clean.gguf")).ok
    report = verify_checkpoint(write_gguf(tmp_path / "t.gguf", extra={key: "left by an edit"}))
    assert not report.ok and _statuses(report)["provenance"] == "fail", report.checks


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
    write_gguf_file(open_gguf(changed).files[0], out, extra, [], {}, None)
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
    code, text, _ = run_cli(capsys, "verify", str(world["llama-relock.gguf"]), "--source", str(world["llama.gguf"]))
    assert code == 0 and f"[ok  ] {ORIGINALS_CHECK}: no originals claimed" in text, text
    assert verify_checkpoint(world["llama-relock.gguf"]).ok  # without --source: nothing to confirm


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
