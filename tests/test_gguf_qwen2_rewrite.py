"""A qwen2 GGUF locked by rewriting it as llama, without llama.cpp: what the rewrite moves and renames (checked
with the gguf package's own reader and the converter's permutation written independently in torch), what it
refuses by name, what verify catches, and the chain of edits on a rewritten file.

llama.cpp's verdict on the rewritten files is tests/test_gguf_qwen2_llama_cpp.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from gguf_helpers import finish, lock_for_gguf

from weightlock import apply_lock, verify_checkpoint
from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.formats.gguf.architectures import QWEN2_AS_LLAMA
from weightlock.formats.gguf.edit import FileChanges, write_gguf_file
from weightlock.formats.gguf.file import open_gguf
from weightlock.formats.gguf.rewrite import head_permutation

gguf = pytest.importorskip("gguf")


def write_qwen2(
    path: Path,
    *,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=8,
    qk_type="F32",
    biases=True,
    extra_tensors=(),
    extra_keys=None,
    seed=0,
    q_rows=None,
) -> Path:
    """A small qwen2 GGUF as llama.cpp's converter lays one out: the qwen2.* keys, Q/K/V with biases, o_proj."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(layers)
    writer.add_context_length(131072)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    for key, value in (extra_keys or {}).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", rng.normal(size=(64, hidden)).astype(np.float32))
    qtype = gguf.GGMLQuantizationType[qk_type]

    def weight(name, rows, cols):
        data = rng.normal(0, 0.2, size=(rows, cols)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    for layer in range(layers):
        weight(f"blk.{layer}.attn_q.weight", q_rows or hidden, hidden)
        weight(f"blk.{layer}.attn_k.weight", kv_heads * head_dim, hidden)
        weight(f"blk.{layer}.attn_v.weight", kv_heads * head_dim, hidden)
        if biases:
            for part, width in (("q", hidden), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
                writer.add_tensor(f"blk.{layer}.attn_{part}.bias", rng.normal(0, 0.1, width).astype(np.float32))
        weight(f"blk.{layer}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    finish(writer)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _converter_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (conversion/llama.py: LlamaModel.permute), on a row-major (rows, ...) array."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.mark.parametrize("qk_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_rewrite_permutes_qk_rows_as_the_converter_does_and_carries_the_rest(tmp_path, qk_type):
    source = write_qwen2(tmp_path / "q.gguf", qk_type=qk_type, head_dim=32 if qk_type == "Q4_0" else 8)
    before = _sha(source)
    lock = _qwen2_lock(source)
    result = apply_lock(source, lock, out=tmp_path / "out.gguf", alpha=2.0)
    assert _sha(source) == before and result.report.ok
    assert result.summary()["architecture"] == "llama"

    src, out = _tensors(source), _tensors(tmp_path / "out.gguf")
    heads, kv_heads = 4, 2
    for name, data in src.items():
        if ".attn_q." in name:
            np.testing.assert_array_equal(out[name], _converter_permute(data, heads))
        elif ".attn_k." in name:
            np.testing.assert_array_equal(out[name], _converter_permute(data, kv_heads))
        else:
            np.testing.assert_array_equal(out[name], data)
    assert {n for n in out if n not in src} == {f"blk.{i}.attn_output.bias" for i in range(2)}

    fields_in, fields_out = _fields(source), _fields(tmp_path / "out.gguf")
    assert fields_out["general.architecture"] == "llama"
    for key, value in fields_in.items():
        if key.startswith("qwen2."):
            assert fields_out["llama." + key.removeprefix("qwen2.")] == value
            assert key not in fields_out
        elif key != "general.architecture":
            assert fields_out[key] == value
    record = json.loads(fields_out["weightlock.edit"])
    assert record["rewrite"]["from"] == "qwen2" and record["rewrite"]["to"] == "llama"
    assert record["rewrite"]["permuted"]["blk.1.attn_k.bias"] == kv_heads
    assert len(record["rewrite"]["permuted"]) == 8
    # verify, with and without the source
    assert verify_checkpoint(tmp_path / "out.gguf", engines="llama.cpp").ok
    checks = {c.name: c for c in verify_checkpoint(tmp_path / "out.gguf", source=source, engines="llama.cpp").checks}
    assert checks["rewrite"].status == "pass" and "byte for byte" in checks["rewrite"].message


def _qwen2_lock(path: Path, **kwargs):
    """A random lock of a qwen2 model of the file's shape (gguf_shape reads the qwen2.* keys)."""
    from conftest import random_lock_for

    from weightlock.core.lock import SourceModel
    from weightlock.formats.gguf.architectures import architecture_row
    from weightlock.formats.gguf.edit import gguf_shape

    model = open_gguf(path)
    shape = gguf_shape(model, architecture_row("qwen2"))
    source = SourceModel(
        "Qwen2ForCausalLM", "qwen2", shape.num_layers, shape.num_heads, shape.head_dim, shape.hidden_size
    )
    return random_lock_for(source, kwargs.get("n_heads", 3), kwargs.get("seed", 1), 3.0)


def test_head_permutation_is_the_converters():
    for rows, groups in ((8, 1), (64, 4), (24, 3), (128, 2)):
        rows_in = np.arange(rows * 3).reshape(rows, 3)
        assert np.array_equal(rows_in[head_permutation(rows, groups)], _converter_permute(rows_in, groups))


def test_missing_qk_biases_are_exact_too(tmp_path):
    """Q/K biases are optional in both graphs: a file without them has only its weights permuted."""
    source = write_qwen2(tmp_path / "q.gguf", biases=False)
    apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    record = json.loads(_fields(tmp_path / "out.gguf")["weightlock.edit"])
    assert sorted(record["rewrite"]["permuted"]) == sorted(
        f"blk.{i}.attn_{p}.weight" for i in range(2) for p in ("q", "k")
    )
    assert verify_checkpoint(tmp_path / "out.gguf", source=source, engines="llama.cpp").ok


REFUSED = {
    "output bias": (dict(extra_tensors=[("output.bias", np.zeros(64, np.float32))]), "output.bias"),
    "fused qkv": (dict(extra_tensors=[("blk.0.attn_qkv.weight", np.zeros((64, 32), np.float32))]), "attn_qkv"),
    "rope factors": (dict(extra_tensors=[("rope_freqs.weight", np.ones(4, np.float32))]), "rope_freqs"),
    "mlp bias": (dict(extra_tensors=[("blk.0.ffn_up.bias", np.zeros(64, np.float32))]), "ffn_up.bias"),
    "experts": (dict(extra_keys={"qwen2.expert_count": 8}), "qwen2.expert_count"),
    "partial rope": (dict(extra_keys={"qwen2.rope.dimension_count": 4}), "qwen2.rope.dimension_count"),
    "llama keys already": (dict(extra_keys={"llama.context_length": 4096}), "llama.context_length"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_llama_graph_cannot_reproduce_is_refused_by_name(tmp_path, case, capsys):
    kwargs, named = REFUSED[case]
    source = write_qwen2(tmp_path / "q.gguf", **kwargs)
    before = _sha(source)
    with pytest.raises(UnsupportedError, match=named.replace(".", r"\.")) as error:
        apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    assert "llama" in error.value.message and error.value.hint
    assert _sha(source) == before and not (tmp_path / "out.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(q_rows=24),  # 4 heads of 8 make 32 Q rows
        dict(extra_keys={"qwen2.attention.key_length": 6}),  # 4 x 6 != 32 rows
    ],
    ids=["q-rows", "key-length"],
)
def test_head_counts_that_do_not_divide_the_rows_are_refused(tmp_path, kwargs):
    source = write_qwen2(tmp_path / "q.gguf", **kwargs)
    with pytest.raises(CheckpointError, match="rows"):
        apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    assert not (tmp_path / "out.gguf").exists()


def test_odd_head_size_is_refused(tmp_path):
    source = write_qwen2(tmp_path / "q.gguf", head_dim=7, heads=2, kv_heads=2)
    with pytest.raises(UnsupportedError, match="head size is 7"):
        apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)


def test_relock_and_minus_alpha_on_a_rewritten_file(tmp_path):
    """A rewritten (llama) file locked again is a plain llama edit in the chain (no second permutation); -alpha
    takes the lock off to float rounding; verify against the qwen2 source holds for the whole chain."""
    source = write_qwen2(tmp_path / "q.gguf")
    lock = _qwen2_lock(source)
    apply_lock(source, lock, out=tmp_path / "once.gguf", alpha=2.0)
    apply_lock(tmp_path / "once.gguf", lock, out=tmp_path / "twice.gguf", alpha=-2.0)
    once, twice = _tensors(tmp_path / "once.gguf"), _tensors(tmp_path / "twice.gguf")
    for name, data in once.items():
        if name.endswith("attn_output.bias"):
            assert np.abs(twice[name]).max() < 1e-5 * max(1.0, float(np.abs(data).max()))
        else:
            np.testing.assert_array_equal(twice[name], data)  # Q/K not permuted a second time
    record = json.loads(_fields(tmp_path / "twice.gguf")["weightlock.edit"])
    assert "rewrite" not in record and record["parent"]["rewrite"]["from"] == "qwen2"
    report = verify_checkpoint(tmp_path / "twice.gguf", source=source, engines="llama.cpp")
    assert report.ok, [c for c in report.checks if c.status != "pass"]
    with pytest.raises(Exception, match="not the qwen2 model|is a llama model"):
        verify_checkpoint(tmp_path / "twice.gguf", source=tmp_path / "once.gguf", engines="llama.cpp")


def _rewrite_file(path: Path, out: Path, *, swap_rows_of=None, drop_key=None, record_edit=None) -> Path:
    """``path`` written again with one thing changed: two rows of a tensor swapped, a key dropped, or the
    record edited; the embedded lock kept."""
    model = open_gguf(path)
    file = model.files[0]
    changes = FileChanges()
    if swap_rows_of is not None:
        tensor = model.tensors[swap_rows_of]
        raw = bytearray(Path(path).read_bytes()[file.data_start + tensor.offset :][: tensor.nbytes])
        row = tensor.nbytes // tensor.dims[-1]
        raw[:row], raw[row : 2 * row] = raw[row : 2 * row], raw[:row]
        changes.rewritten[swap_rows_of] = bytes(raw)
    if drop_key is not None:
        from weightlock.formats.gguf.edit import _kv_string

        changes.replaced[drop_key] = _kv_string("general.dropped", "x")
    if record_edit is not None:
        from weightlock.formats.gguf.edit import _kv_string
        from weightlock.formats.gguf.record import RECORD_KEY

        record = json.loads(model.metadata[RECORD_KEY].value)  # type: ignore[arg-type]
        record_edit(record)
        changes.replaced[RECORD_KEY] = _kv_string(RECORD_KEY, json.dumps(record))
    out.unlink(missing_ok=True)
    # the writer drops weightlock's keys and re-adds what it is given: keep the source's own
    from weightlock.formats.gguf.record import is_our_key

    ours = []
    with open(path, "rb") as handle:
        for key, entry in file.metadata.items():
            if is_our_key(key):
                handle.seek(entry.start)
                ours.append(changes.replaced.pop(key, None) or handle.read(entry.end - entry.start))
    write_gguf_file(file, out, ours, [], changes, None)
    return out


@pytest.mark.parametrize(
    "tamper",
    [
        dict(swap_rows_of="blk.1.attn_q.weight"),
        dict(swap_rows_of="blk.0.attn_k.bias"),
        dict(drop_key="llama.rope.freq_base"),
        dict(record_edit=lambda r: r["rewrite"]["permuted"].pop("blk.0.attn_q.bias")),
        dict(record_edit=lambda r: r["rewrite"].update({"to": "granite"})),
        dict(record_edit=lambda r: r["rewrite"]["renamed_keys"].append("qwen2.made_up")),
    ],
    ids=["q-rows", "k-bias", "key", "record-permuted", "record-target", "record-renamed"],
)
def test_verify_catches_a_tampered_rewrite(tmp_path, tamper):
    source = write_qwen2(tmp_path / "q.gguf")
    apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    tampered = _rewrite_file(tmp_path / "out.gguf", tmp_path / "tampered.gguf", **tamper)
    report = verify_checkpoint(tampered, source=source, engines="llama.cpp")
    assert not report.ok
    assert [c.name for c in report.checks if c.status == "fail"] == ["rewrite"], report.checks
    if "swap_rows_of" not in tamper and "drop_key" not in tamper:
        assert not verify_checkpoint(
            tampered, engines="llama.cpp"
        ).ok  # the record's claims fail against the file alone


def test_cli_locks_a_qwen2_gguf_and_inspect_says_so(tmp_path, capsys):
    from weightlock import save_lock

    source = write_qwen2(tmp_path / "q.gguf")
    save_lock(_qwen2_lock(source), tmp_path / "lock.wlock")
    code, text, _ = run_cli(capsys, "inspect", str(source))
    assert code == 0 and "apply writes it as llama.cpp llama" in text
    out = tmp_path / "out.gguf"
    code, text, err = run_cli(capsys, "apply", str(source), "--lock", str(tmp_path / "lock.wlock"), "--out", str(out))
    assert code == 0, err
    code, text, _ = run_cli(capsys, "inspect", str(out), "--json")
    assert json.loads(text)["locked"]["rewritten_from"] == {
        "architecture": "qwen2",
        "permuted_tensors": 8,
        "renamed_keys": 8,
    }
    code, text, _ = run_cli(capsys, "verify", str(out), "--source", str(source), "--engines", "llama.cpp")
    assert code == 0 and "rewrite" in text


def test_qwen3_and_phi3_gguf_stay_refused_and_say_what_llama_cpp_would_need(tmp_path):
    from gguf_helpers import write_gguf

    for arch in ("qwen3", "phi3", "gemma2"):
        source = write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
        with pytest.raises(UnsupportedError, match="optional `bo`") as error:
            apply_lock(source, lock_for_gguf(source), out=tmp_path / "out.gguf", alpha=2.0)
        assert "TENSOR_NOT_REQUIRED" in error.value.message


def test_rewrite_rule_is_data():
    assert QWEN2_AS_LLAMA.source == "qwen2" and QWEN2_AS_LLAMA.target == "llama"
    assert {p for p, _ in QWEN2_AS_LLAMA.permuted} == {
        "blk.{layer}.attn_q.weight",
        "blk.{layer}.attn_q.bias",
        "blk.{layer}.attn_k.weight",
        "blk.{layer}.attn_k.bias",
    }


def test_a_llama_lock_on_a_qwen2_file_is_a_mismatch(tmp_path):
    """The lock must come from a Qwen2 model: that the output is written as llama does not make a Llama lock
    fit (refused unless --allow-architecture-mismatch, as for any other pair)."""
    from weightlock.errors import IncompatibleLockError

    source = write_qwen2(tmp_path / "q.gguf")
    with pytest.raises(IncompatibleLockError, match="qwen2"):
        apply_lock(source, lock_for_gguf_as(source, "llama"), out=tmp_path / "out.gguf", alpha=2.0)
    assert not (tmp_path / "out.gguf").exists()


def lock_for_gguf_as(path: Path, model_type: str):
    from conftest import random_lock_for

    from weightlock.core.lock import SourceModel

    lock = _qwen2_lock(path)
    s = lock.source_model
    return random_lock_for(
        SourceModel(
            "LlamaForCausalLM", model_type, s.num_hidden_layers, s.num_attention_heads, s.head_dim, s.hidden_size
        ),
        3,
        1,
        3.0,
    )


def _add_keys(path: Path, out: Path, keys: dict[str, str], record_edit=None) -> Path:
    """``path`` written again with extra string keys (and the record edited): what verify must catch."""
    from weightlock.formats.gguf.edit import _kv_string
    from weightlock.formats.gguf.record import RECORD_KEY, is_our_key

    model = open_gguf(path)
    file = model.files[0]
    ours = []
    with open(path, "rb") as handle:
        for key, entry in file.metadata.items():
            if not is_our_key(key):
                continue
            if key == RECORD_KEY and record_edit is not None:
                record = json.loads(entry.value)  # type: ignore[arg-type]
                record_edit(record)
                ours.append(_kv_string(RECORD_KEY, json.dumps(record)))
            else:
                handle.seek(entry.start)
                ours.append(handle.read(entry.end - entry.start))
    extra = [_kv_string(key, value) for key, value in keys.items()]
    write_gguf_file(file, out, ours + extra, [], FileChanges(), None)
    return out


@pytest.mark.parametrize(
    "keys, claimed",
    [
        ({"llama.rope.scaling.type": "linear"}, ["qwen2.rope.scaling.type"]),  # a key the source never had, claimed
        ({"llama.rope.scaling.type": "linear"}, []),  # and unclaimed
        ({}, None),  # the renamed keys listed twice
        ({}, "empty"),  # or not at all
    ],
    ids=["added-claimed", "added-unclaimed", "duplicated", "emptied"],
)
def test_verify_checks_the_renamed_keys_both_ways(tmp_path, keys, claimed):
    source = write_qwen2(tmp_path / "q.gguf")
    apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)

    def edit(record):
        names = record["rewrite"]["renamed_keys"]
        if claimed == "empty":
            names.clear()
        elif claimed is None:
            names.extend(names)
        else:
            names.extend(claimed)

    tampered = _add_keys(tmp_path / "out.gguf", tmp_path / "tampered.gguf", keys, edit)
    # a claimed key is consistent with the file alone: only the source shows that it was added
    for with_source in (source,) if keys and claimed else (source, None):
        report = verify_checkpoint(tampered, source=with_source, engines="llama.cpp")
        failed = {c.name for c in report.checks if c.status == "fail"}
        assert failed & {"rewrite", "provenance"}, (with_source, report.checks)


def test_a_group_count_written_as_a_float_fails_cleanly(tmp_path, capsys):
    source = write_qwen2(tmp_path / "q.gguf")
    apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    tampered = _rewrite_file(
        tmp_path / "out.gguf",
        tmp_path / "tampered.gguf",
        record_edit=lambda r: r["rewrite"]["permuted"].update({"blk.0.attn_q.weight": 4.0}),
    )
    code, text, err = run_cli(capsys, "verify", str(tampered), "--source", str(source), "--engines", "llama.cpp")
    assert code == 1 and "Traceback" not in err + text and "[FAIL] rewrite" in text


def test_a_qwen2_file_carrying_a_record_is_refused_before_anything_is_written(tmp_path):
    """weightlock writes every qwen2 file it locks as llama: a qwen2 file with a record was changed since."""
    source = write_qwen2(tmp_path / "q.gguf")
    apply_lock(source, _qwen2_lock(source), out=tmp_path / "out.gguf", alpha=2.0)
    model = open_gguf(tmp_path / "out.gguf")
    from weightlock.formats.gguf.edit import _kv_string

    changes = FileChanges(
        renamed={k: "qwen2." + k.removeprefix("llama.") for k in model.metadata if k.startswith("llama.")},
        replaced={"general.architecture": _kv_string("general.architecture", "qwen2")},
    )
    relabelled = tmp_path / "relabelled.gguf"
    from weightlock.formats.gguf.record import is_our_key

    ours = []
    with open(tmp_path / "out.gguf", "rb") as handle:
        for key, entry in model.files[0].metadata.items():
            if is_our_key(key):
                handle.seek(entry.start)
                ours.append(handle.read(entry.end - entry.start))
    write_gguf_file(model.files[0], relabelled, ours, [], changes, None)
    with pytest.raises(CheckpointError, match="carries a weightlock record"):
        apply_lock(relabelled, _qwen2_lock(source), out=tmp_path / "again.gguf", alpha=2.0)
    assert not (tmp_path / "again.gguf").exists()
