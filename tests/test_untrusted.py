"""Everything read from disk is hostile (issue 11, classes 4-8), tested by class, not by example.

4. The parser accepts nothing the safetensors library refuses (generated headers, both asked); verify checks
   the biases the lock implies, not the ones the record lists; apply publishes only what verify passes.
5. Widths from config.json must agree with the tensors they sit beside.
6. Every JSON document (config, index, tokenizer config, provenance, lock manifest) with values of the wrong
   type, or nested 100,000 deep, is refused with one error line and a hint.
7. Work sized by input is bounded: huge headers, zero-width tensors with huge row counts, FIFOs and devices.
8. Output: text from files cannot forge lines; every refusal has a hint; Ctrl-C at start-up; glob characters
   in --out; a broken Hub-cache link is an input error.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import apply_cli, make_llama, make_model, random_lock, rewrite_safetensors, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.errors import WeightlockError
from weightlock.io.safetensors_file import TensorData, read_header

WEIGHTLOCK = [sys.executable, "-m", "weightlock"]
PACKAGE = Path(__file__).resolve().parents[1] / "weightlock"


@pytest.fixture
def setup(tmp_path):
    src = make_llama(tmp_path / "src", shard_kb=40)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    return src, tmp_path / "l.wlock"


def refused_cleanly(code, err, codes=(3, 4)):
    """One error line and one hint line, the right exit code, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    lines = lines[next((i for i, line in enumerate(lines) if line.startswith("weightlock: error: ")), 0) :]
    assert code in codes, err
    assert "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("weightlock: error: ") and lines[1].startswith("  hint: "), err


# --------------------------------------------------------------------------------------------------- class 4


def _safetensors_bytes(header, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - any refusal by the library counts
        return False


def _ours_accepts(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except WeightlockError:
        return False


DIMS = st.sampled_from([0, 1, 2, 3, 7, 2**31, 2**32, 2**62, 2**63, 2**64 - 1, 2**64, 2**65, -1, 1.5, True, "2"])
METADATA = st.sampled_from(["absent", None, {}, {"format": "pt"}, [], "pt", 1, {"x": 1}, {"x": None}, {"x": ["y"]}])


@st.composite
def headers(draw):
    header, data, offset = {}, b"", 0
    metadata = draw(METADATA)
    if metadata != "absent":
        header["__metadata__"] = metadata
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.lists(DIMS, min_size=0, max_size=4))
        dtype = draw(st.sampled_from(["F32", "BF16", "I64", "U8", "F4", "f32", 3]))
        try:
            count = int(np.prod([int(d) for d in shape], dtype=object)) if shape else 1
            nbytes = count * {"F32": 4, "BF16": 2, "I64": 8, "U8": 1}.get(dtype, 1)
        except (TypeError, ValueError):
            nbytes = 4
        nbytes = nbytes if 0 <= nbytes <= 64 else draw(st.sampled_from([0, 4, 64]))
        end = offset + nbytes + draw(st.sampled_from([0, 0, 0, 1, -1]))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, max(end, 0)]}
        data += b"\0" * max(end - offset, 0)
        offset = max(end, 0)
    return header, data + b"\0" * draw(st.sampled_from([0, 0, 3]))


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=headers())
def test_parser_refuses_whatever_the_safetensors_library_refuses(tmp_path_factory, case):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(_safetensors_bytes(*case))
    library, ours = _library_accepts(path), _ours_accepts(path)
    assert library or not ours, f"accepted what safetensors refuses: {case[0]}"
    if ours:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            assert sorted(f.keys()) == sorted(read_header(path).tensors)


@pytest.mark.parametrize(
    "header,data",
    [
        ({"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"a": {"dtype": "F32", "shape": [0, 2**65], "data_offsets": [0, 0]}}, b""),
        ({"a": {"dtype": "F32", "shape": [2**63, 4, 0], "data_offsets": [0, 0]}}, b""),
        ({"a": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 0]}}, b""),
    ],
    ids=["metadata-list", "dim-past-2^64", "overflow-before-zero", "bytes-overflow"],
)
def test_shards_the_library_refuses_fail_apply_and_verify(tmp_path, capsys, setup, header, data):
    src, lock = setup
    extra = _safetensors_bytes(header, data)
    assert not _library_accepts(_write(tmp_path / "probe.safetensors", extra))
    # put the malformed tensor into a real shard of the checkpoint, named in its index
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / "model-extra.safetensors").write_bytes(extra)
    index["weight_map"].update({name: "model-extra.safetensors" for name in header if name != "__metadata__"})
    index["weight_map"].setdefault("a", "model-extra.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = apply_cli(capsys, src, lock, tmp_path / "out")
    refused_cleanly(code, err)
    assert not verify_checkpoint(src).ok


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_verify_checks_the_biases_the_lock_implies_not_the_record_list(tmp_path, setup):
    src, lock = setup
    out = tmp_path / "out"
    apply_lock(src, lock, out=out, alpha=3.0)
    record_path = out / "weightlock" / "provenance.json"
    good = json.loads(record_path.read_text())
    assert verify_checkpoint(out).ok
    for name in good["tensors"]["locked"]:
        shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
        original = shard.read_bytes()
        rewrite_safetensors(
            shard,
            lambda ts, n=name: [
                TensorData(t.name, t.dtype, t.shape, bytes(len(t.data))) if t.name == n else t for t in ts
            ],
        )
        forged = json.loads(json.dumps(good))
        for key in ("added", "locked"):
            forged["tensors"][key] = [n for n in forged["tensors"][key] if n != name]
        record_path.write_text(json.dumps(forged))
        report = verify_checkpoint(out)
        assert not report.ok, f"a zeroed {name} left out of the record passed"
        record_path.write_text(json.dumps(good))
        assert not verify_checkpoint(out).ok, f"a zeroed {name} passed"
        shard.write_bytes(original)
    for lie in (
        lambda r: r.update(alpha=r["alpha"] + 1),
        lambda r: r["tensors"].update(added=[]),
        lambda r: r["lock"].update(sha256="0" * 64),
        lambda r: r["files"].update(lock="weightlock/x"),
        lambda r: r["files"].update(originals="../victim.wlt"),
    ):
        forged = json.loads(json.dumps(good))
        lie(forged)
        record_path.write_text(json.dumps(forged))
        assert not verify_checkpoint(out).ok
    record_path.write_text(json.dumps(good))
    assert verify_checkpoint(out).ok


def test_apply_publishes_only_what_verify_passes_with_the_same_checks(tmp_path, setup):
    src, lock = setup
    result = apply_lock(src, lock, out=tmp_path / "out")
    again = verify_checkpoint(tmp_path / "out", source=src)  # apply verifies with the source it read
    assert [(c.name, c.status) for c in result.report.checks] == [(c.name, c.status) for c in again.checks]
    assert result.report.ok and again.ok


# --------------------------------------------------------------------------------------------------- class 5


@pytest.mark.parametrize(
    "lie",
    [
        {"num_key_value_heads": 1},
        {"num_key_value_heads": 4},
        {"num_attention_heads": 8, "head_dim": 2},
        {"head_dim": 8},
        {"hidden_size": 32},
        {"intermediate_size": 64},
    ],
    ids=str,
)
def test_widths_from_config_must_match_the_tensors(tmp_path, capsys, lie):
    src = make_llama(tmp_path / "src")  # 4 heads, 2 KV heads, head_dim 16, hidden 64
    lock = random_lock(src)
    save_lock(lock, tmp_path / "l.wlock")
    apply_lock(src, lock, out=tmp_path / "good")
    for folder in (src, tmp_path / "good"):
        config = json.loads((folder / "config.json").read_text())
        config.update(lie)
        (folder / "config.json").write_text(json.dumps(config))
    code, _, err = apply_cli(capsys, src, tmp_path / "l.wlock", tmp_path / "out", "--allow-architecture-mismatch")
    refused_cleanly(code, err)  # the MLP width too: the output would fail verify's loader check
    assert not (tmp_path / "out").exists()
    assert not verify_checkpoint(tmp_path / "good").ok


# --------------------------------------------------------------------------------------------------- class 6

WRONG_TYPES = ["text", 7, -1, 0, 1.5, True, None, [], {}, [1, "x"], {"a": {"b": []}}, 10**40]
DEEP = "[" * 100_000 + "]" * 100_000


def _mutations(document: dict, depth: int = 2):
    """(path, mutated copy) for every key down to ``depth`` levels, each set to every wrong type, and the
    whole document replaced by each wrong type."""
    for value in WRONG_TYPES:
        yield "(whole)", value

    def walk(node, path, level):
        if not isinstance(node, dict) or level > depth:
            return
        for key in list(node)[:40]:
            for value in WRONG_TYPES:
                copy = json.loads(json.dumps(document))
                target = copy
                for p in path:
                    target = target[p]
                target[key] = value
                yield "/".join([*path, key]), copy
            yield from walk(node[key], [*path, key], level + 1)

    yield from walk(document, [], 1)


def _run_quietly(args):
    result = subprocess.run(WEIGHTLOCK + args, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def _check_document(folder: Path, relative: str, args, ok_codes, tries: int):
    path = folder / relative
    good = path.read_text()
    document = json.loads(good)
    count = 0
    from weightlock.cli import main

    for where, mutated in _mutations(document):
        path.write_text(json.dumps(mutated))
        code = 0
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code
        assert "Traceback" not in err.getvalue(), (relative, where)
        assert code in ok_codes, (relative, where, code, err.getvalue())
        if code not in (0, 1):
            assert "hint:" in err.getvalue(), (relative, where, err.getvalue())
        count += 1
    path.write_text(DEEP)
    code, _, err = _run_quietly(list(args))
    assert code in ok_codes - {0} and "Traceback" not in err, (relative, err)
    path.write_text(good)
    assert count >= tries
    return count


def test_every_json_document_with_wrong_types_or_deep_nesting_is_refused(tmp_path):
    src = make_model(tmp_path / "src", "qwen2")  # redeclared: its tokenizer config is read too
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 128, "extra": {"k": [1]}})
    )
    lock = tmp_path / "l.wlock"
    save_lock(random_lock(src), lock)
    out = tmp_path / "out"
    apply_lock(src, lock, out=out)
    apply_args = ["apply", str(src), "--lock", str(lock), "--out", str(tmp_path / "x"), "--no-loader-check", "--force"]
    total = 0
    total += _check_document(src, "config.json", apply_args, {0, 3, 4}, 100)
    total += (
        _check_document(src, "model.safetensors.index.json", apply_args, {0, 3, 4}, 20)
        if (src / "model.safetensors.index.json").exists()
        else 0
    )
    total += _check_document(src, "tokenizer_config.json", apply_args, {0, 3, 4}, 30)
    total += _check_document(out, "weightlock/provenance.json", ["verify", str(out), "--no-loader-check"], {0, 1}, 200)
    total += _check_document(out, "weightlock/provenance.json", ["inspect", str(out)], {0, 3}, 200)
    assert total > 500


def test_lock_manifests_with_wrong_types_are_refused(tmp_path, capsys):
    from weightlock.core.lock import METADATA_KEY

    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "good.wlock")
    header = read_header(tmp_path / "good.wlock")
    manifest = json.loads(header.metadata[METADATA_KEY])
    count = 0
    for where, mutated in [*_mutations(manifest, depth=3), ("deep", "DEEP")]:
        text = DEEP if mutated == "DEEP" else json.dumps(mutated)
        path = tmp_path / "bad.wlock"
        path.unlink(missing_ok=True)
        rewrite_copy = tmp_path / "copy.wlock"
        shutil.copyfile(tmp_path / "good.wlock", rewrite_copy)
        rewrite_safetensors(rewrite_copy, lambda ts: ts, metadata={**header.metadata, METADATA_KEY: text})
        os.replace(rewrite_copy, path)
        for args in (
            ["inspect", str(path)],
            ["apply", str(src), "--lock", str(path), "--out", str(tmp_path / "o"), "--no-loader-check", "--force"],
        ):
            code, _, err = run_cli(capsys, *args)
            assert "Traceback" not in err, where
            assert code in (0, 3, 4), (where, err)
            if code:
                assert "hint:" in err, (where, err)
        count += 1
    assert count > 100


# --------------------------------------------------------------------------------------------------- class 7


def test_huge_headers_cost_linear_time(tmp_path):
    """4 MB of zero-size tensors with dims near 2^63 (valid for the library) and one that overflows."""
    entries = {
        f"t{i:06d}": {"dtype": "F32", "shape": [0, 2**63 - 1, 2**63 - 1, 2**63 - 1], "data_offsets": [0, 0]}
        for i in range(40_000)
    }
    path = tmp_path / "big.safetensors"
    path.write_bytes(_safetensors_bytes(entries, b""))
    assert path.stat().st_size > 3_000_000
    code = (
        "import sys, time; from weightlock.io.safetensors_file import read_header; t=time.time(); "
        "read_header(sys.argv[1]); print(time.time()-t)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _library_accepts(path)


def test_zero_width_tensor_with_huge_row_count_is_scanned_at_once(tmp_path):
    src = make_llama(tmp_path / "src")
    rewrite_safetensors(src / "model.safetensors", lambda ts: ts + [TensorData("extra.weight", "F32", (2**40, 0), b"")])
    result = subprocess.run(
        WEIGHTLOCK + ["verify", str(src), "--deep", "--no-loader-check"], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in result.stderr and result.returncode in (0, 1), result.stderr


def _fifo(path: Path) -> Path:
    if os.path.lexists(path):
        os.remove(path)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "where", ["config.json", "tokenizer.json", "model.safetensors", "lock", "recorded-lock", "provenance", "pairs"]
)
def test_fifos_are_refused_never_waited_on(tmp_path, where):
    src = make_llama(tmp_path / "src")
    lock = tmp_path / "l.wlock"
    save_lock(random_lock(src), lock)
    if where in ("recorded-lock", "provenance"):
        apply_lock(src, lock, out=tmp_path / "locked")
        target = tmp_path / "locked" / "weightlock" / ("lock.wlock" if where == "recorded-lock" else "provenance.json")
        _fifo(target)
        args = ["verify", str(tmp_path / "locked"), "--no-loader-check"]
    elif where == "lock":
        args = ["apply", str(src), "--lock", str(_fifo(tmp_path / "fifo.wlock")), "--out", str(tmp_path / "o")]
    elif where == "pairs":
        args = ["forge", str(src), "--data", str(_fifo(tmp_path / "pairs.json")), "--out", str(tmp_path / "f.wlock")]
    else:
        _fifo(src / where)
        args = ["apply", str(src), "--lock", str(lock), "--out", str(tmp_path / "o")]
    result = subprocess.run(WEIGHTLOCK + args, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (1, 3), result.stderr
    assert not (tmp_path / "o").exists()


def test_a_device_file_in_the_source_is_not_copied(tmp_path, capsys):
    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    try:
        os.mknod(src / "extra.bin", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # what /dev/zero is
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD, which this machine does not grant")
    code, _, err = apply_cli(capsys, src, tmp_path / "l.wlock", tmp_path / "out", "--link-mode", "copy")
    refused_cleanly(code, err)
    assert "device" in err and not (tmp_path / "out").exists()


def test_heatmap_size_is_bounded_and_free_form_details_ignored(tmp_path):
    from weightlock import SourceModel, build_lock
    from weightlock.lab.plot import DPI, MAX_FIGURE_INCHES, lock_heatmap

    cases = [(4096, {"probe_accuracy": "x"})] + [
        (8, d)
        for d in (
            {"probe_accuracy": [[1.0, "a"]]},
            {"probe_accuracy": [[0.5] * 3] * 2},
            {"probe_accuracy": None},
            {},
            {"probe_accuracy": [[float("nan")] * 8] * 8},
            {"probe_accuracy": [[True] * 8] * 8},
            {"probe_accuracy": [[0.7] * 8] * 8},
        )
    ]
    for size, details in cases:
        source = SourceModel("LlamaForCausalLM", "llama", size, size, 16, 64)
        lock = build_lock(
            [0, size - 1],
            [0, size - 1],
            np.eye(2, 16),
            [1.0, 1.0],
            source,
            default_alpha=1.0,
            creation={"method": "api", "tool": "test", "details": details},
        )
        png = lock_heatmap(lock, "png")
        width, height = struct.unpack(">II", png[16:24])
        assert width <= MAX_FIGURE_INCHES * DPI and height <= MAX_FIGURE_INCHES * DPI


# --------------------------------------------------------------------------------------------------- class 8


def test_text_from_files_cannot_forge_output_lines(tmp_path, capsys):
    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "evil\n[ok  ] everything verified\x1b[2J\u2028"
    (src / "config.json").write_text(json.dumps(config))
    code, out, err = apply_cli(capsys, src, tmp_path / "l.wlock", tmp_path / "out")
    refused_cleanly(code, err)
    assert "\x1b" not in err and "\u2028" not in err and "\n[ok" not in err and "[ok  ] everything" in err
    code, out, _ = run_cli(capsys, "verify", str(src))
    assert (
        code == 1 and "\x1b" not in out and not any(line.startswith("[ok  ] everything") for line in out.splitlines())
    )


def _error_calls():
    errors = {
        name
        for name, obj in vars(__import__("weightlock.errors", fromlist=["x"])).items()
        if isinstance(obj, type) and issubclass(obj, WeightlockError)
    }
    for path in sorted(PACKAGE.rglob("*.py")):  # every room of the package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in errors:
                yield str(path.relative_to(PACKAGE)), node.lineno, node


def test_every_refusal_in_the_code_carries_a_hint():
    calls = list(_error_calls())
    assert len(calls) > 100
    missing = [f"{name}:{line}" for name, line, node in calls if not any(k.arg == "hint" for k in node.keywords)]
    assert not missing, missing


def test_ctrl_c_while_starting_up_prints_no_traceback():
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'click':\n"  # the first heavy import of the CLI's start (numpy is no longer one)
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "sys.argv = ['weightlock', '--help']\n"
        "from weightlock.console import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "interrupted" in result.stderr


@pytest.mark.parametrize("name", ["out[1]", "out*", "out?x", "[!o]ut"])
def test_glob_characters_in_out_do_not_defeat_clean_up(tmp_path, name):
    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    (tmp_path / "out1").mkdir()  # a sibling the pattern would match if it were a glob
    args = ["apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / name), "--no-loader-check"]
    env = dict(os.environ, WEIGHTLOCK_FAILPOINT="shards-written")
    assert subprocess.run(WEIGHTLOCK + args, env=env, capture_output=True, timeout=120).returncode < 0
    assert [p for p in tmp_path.iterdir() if "weightlock-partial" in p.name]
    result = subprocess.run(WEIGHTLOCK + args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not [p for p in tmp_path.iterdir() if "weightlock-partial" in p.name]
    assert (tmp_path / "out1").is_dir() and verify_checkpoint(tmp_path / name).ok


def test_broken_link_in_a_hub_snapshot_is_an_input_error(tmp_path, capsys):
    from test_checkpoint_io import _hub_cache

    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    cache, commit = _hub_cache(tmp_path, src)
    snapshot = cache / "models--org--tiny" / "snapshots" / commit
    os.remove(os.path.realpath(snapshot / "README.md"))
    code, _, err = apply_cli(capsys, snapshot, tmp_path / "l.wlock", tmp_path / "out")
    refused_cleanly(code, err, codes=(3,))
    assert "README.md" in err and "does not exist" in err


def test_no_file_descriptor_is_left_open(tmp_path, setup):
    """Every reader is closed: a long-lived process (a pipeline, a notebook) can apply and verify for ever."""
    src, lock = setup

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    apply_lock(src, lock, out=tmp_path / "out", loader_check=False)
    verify_checkpoint(tmp_path / "out", loader_check=False, deep=True)
    before = open_fds()
    for _ in range(5):
        apply_lock(src, lock, out=tmp_path / "out", force=True, loader_check=False)
        verify_checkpoint(tmp_path / "out", loader_check=False, deep=True)
    assert open_fds() == before
