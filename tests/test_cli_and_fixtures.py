"""The CLI's --json output, inspect, import-legacy, and the shipped demo fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LEGACY_LOCKS, make_llama, random_lock, run_cli

from weightlock import load_lock, save_lock

ROOT = Path(__file__).resolve().parents[1]


def test_apply_inspect_verify_json(tmp_path, capsys):
    src = make_llama(tmp_path / "src")
    save_lock(random_lock(src), tmp_path / "l.wlock")
    code, out, _ = run_cli(
        capsys,
        "apply",
        str(src),
        "--lock",
        str(tmp_path / "l.wlock"),
        "--out",
        str(tmp_path / "out"),
        "--alpha",
        "1.5",
        "--json",
    )
    summary = json.loads(out)
    assert code == 0 and summary["ok"] and summary["alpha"] == 1.5
    assert summary["bytes_read_weights"] > 0 and summary["config_changes"] == {
        "set": {"attention_bias": True},
        "removed": [],
    }
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "out"), "--json")
    described = json.loads(out)
    assert described["locked"]["alpha"] == 1.5 and described["layout"] == "sharded"
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "l.wlock"), "--json")
    assert json.loads(out)["manifest"]["format"] == "weightlock-lock"
    code, out, _ = run_cli(capsys, "inspect", str(src))
    assert "locked: no" in out


def test_import_legacy_cli(tmp_path, capsys):
    legacy = LEGACY_LOCKS / "Meta-Llama-3__1-8B-Instruct.safelock"
    code, out, _ = run_cli(capsys, "import-legacy", str(legacy), "--out", str(tmp_path / "l.wlock"), "--json")
    assert code == 0 and json.loads(out)["heads"] == 24
    assert load_lock(tmp_path / "l.wlock").source_model.name == "meta-llama/Llama-3.1-8B-Instruct"
    code, _, err = run_cli(capsys, "import-legacy", str(legacy), "--out", str(tmp_path / "l.wlock"))
    assert code == 5 and "--force" in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("weightlock")
    result = subprocess.run(
        [
            str(exe),
            "apply",
            str(tmp_path / "missing"),
            "--lock",
            str(tmp_path / "x.wlock"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_shipped_demo_lock_regenerates_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "tiny-llama.wlock").read_bytes() == (ROOT / "fixtures" / "tiny-llama.wlock").read_bytes()


@pytest.mark.slow
def test_demo_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo ok" in result.stdout
