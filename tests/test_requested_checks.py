"""A check that was asked for and did not run never passes (issue 24, class 3).

Generated from the verify command's own click options: every option that asks for a check (all but those in
ASKS_FOR_NOTHING; a new option is included the day it is written) runs on every input format (folders and
GGUF files, unlocked and locked, and a GGUF whose architecture stops verification early) in environments where
the engines really cannot be imported or run: the CLI runs in a child Python started with ``-S`` whose path
holds this venv's packages without llama_cpp and vllm ("absent"), with packages of those names that fail to
import ("broken"), or with a llama_cpp that dies of SIGILL as a build for another processor does
("illegal-instruction"). Whatever the option asked for either shows in the report as a check that passed (or
warned) and was not there without the option, or the command does not exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import pytest
from conftest import make_llama, random_lock
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import apply_lock, save_lock
from weightlock.cli.common import cli
from weightlock.core.report import FAIL, NOT_RUN, PASS, SKIP, WARN, Report, report_json

ROOT = Path(__file__).resolve().parents[1]
VERIFY = cli.commands["verify"]
# Options of verify that ask for no check: the output format, the opt-out of a default check, and the engines
# deployed to (it narrows the serving checks, which always run: their verdicts are data, no engine is loaded;
# tests/test_serving_table.py covers it).
ASKS_FOR_NOTHING = {"as_json", "no_loader_check", "engines"}
# What each input is deployed to: a locked llama GGUF is served unlocked by transformers' and SGLang's GGUF
# loaders, which the default (every engine) fails; the GGUF inputs here are meant for llama.cpp.
DEPLOYED = {"gguf": ["--engines", "llama.cpp"], "gguf-locked": ["--engines", "llama.cpp"]}
ENGINE_PACKAGES = ("llama_cpp", "vllm")
EXIT_CODES = {1, 3, 7}  # a check failed or did not run; bad input (an engine for the other format); no engine


# Path options that ask for a check, and the input (by format) each is given: --source, the model the locked
# inputs were made from (given to an unlocked input, it is the input itself: refused, exit 3).
SOURCES = {"source": {"folder": "folder", "gguf": "gguf"}}


def requesting_options() -> list[tuple[str, ...]]:
    """The command-line words of every value of every verify option that asks for a check."""
    values: list[tuple[str, ...]] = []
    for param in VERIFY.params:
        if isinstance(param, click.Argument) or param.name in ASKS_FOR_NOTHING:
            continue
        assert isinstance(param, click.Option)
        if param.is_flag:
            values.append((param.opts[0],))
        elif isinstance(param.type, click.Choice):
            values += [(param.opts[0], str(choice)) for choice in param.type.choices]
        elif param.name in SOURCES:  # a path: the model each format's locked input was made from
            values.append((param.opts[0], "{" + param.name + "}"))
        else:
            raise AssertionError(f"verify --{param.name} is new: teach {__file__} its values")
    return values


OPTIONS = requesting_options()
FORMATS = ("folder", "folder-locked", "gguf", "gguf-locked", "gguf-unknown-architecture")
# absent: neither engine importable; broken: both present and raising ImportError on import; illegal-instruction:
# llama_cpp present and killed by SIGILL on import (a build for another processor), vllm absent
ENVIRONMENTS = ("absent", "broken", "illegal-instruction")
SHADOWS = {
    "broken": {name: f"raise ImportError('{name} is broken for this test')\n" for name in ENGINE_PACKAGES},
    "illegal-instruction": {"llama_cpp": "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"},
}

RUNNER = """
import contextlib, io, json, sys
from weightlock.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code or 0
    out.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
print(json.dumps(out))
"""


def _inputs(tmp: Path) -> dict[str, Path]:
    folder = make_llama(tmp / "folder")
    save_lock(random_lock(folder), tmp / "folder.wlock")
    apply_lock(folder, tmp / "folder.wlock", out=tmp / "folder-locked", loader_check=False)
    gguf = write_gguf(tmp / "model.gguf")
    save_lock(lock_for_gguf(gguf), tmp / "gguf.wlock")
    apply_lock(gguf, tmp / "gguf.wlock", out=tmp / "locked.gguf")
    return {
        "folder": folder,
        "folder-locked": tmp / "folder-locked",
        "gguf": gguf,
        "gguf-locked": tmp / "locked.gguf",
        "gguf-unknown-architecture": write_gguf(tmp / "other.gguf", arch="no-such-architecture"),
    }


def _python_path(tmp: Path, environment: str) -> str:
    """This venv's packages without the engines (symlinked one by one), after the repository itself; for
    "broken" and "illegal-instruction", first the engine packages of SHADOWS."""
    view = tmp / f"site-{environment}"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(ENGINE_PACKAGES) and not entry.name.endswith(".pth"):
            (view / entry.name).symlink_to(entry)
    path = [str(ROOT), str(view)]
    if environment in SHADOWS:
        shadow = tmp / f"engines-{environment}"
        for name, code in SHADOWS[environment].items():
            (shadow / name).mkdir(parents=True)
            (shadow / name / "__init__.py").write_text(code)
        path.insert(0, str(shadow))
    return os.pathsep.join(path)


def _resolved(option: tuple[str, ...], fmt: str, inputs: dict[str, Path]) -> list[str]:
    """An option's words with a path placeholder ({source}) made the input SOURCES names for the format."""
    kind = "folder" if fmt.startswith("folder") else "gguf"
    return [
        str(inputs[SOURCES[word[1:-1]][kind]]) if word.startswith("{") and word[1:-1] in SOURCES else word
        for word in option
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every (environment, format, option) case and each format's run without options, from one child Python
    per environment."""
    tmp = tmp_path_factory.mktemp("requested")
    inputs = _inputs(tmp)
    cases = [(f, ()) for f in FORMATS] + [(f, o) for f in FORMATS for o in OPTIONS]
    out = {}
    for environment in ENVIRONMENTS:
        env = dict(os.environ, PYTHONPATH=_python_path(tmp, environment))
        argvs = [
            ["verify", str(inputs[f]), "--json", "--no-loader-check", *DEPLOYED.get(f, []), *_resolved(o, f, inputs)]
            for f, o in cases
        ]
        probe = f"import importlib.util as u; print([u.find_spec(n) is not None for n in {ENGINE_PACKAGES!r}])"
        found = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
        shadowed = [name in SHADOWS.get(environment, {}) for name in ENGINE_PACKAGES]
        assert found.stdout.strip() == str(shadowed), found.stderr  # only the shadows are found
        process = subprocess.run(
            [sys.executable, "-S", "-c", RUNNER, json.dumps(argvs)], env=env, capture_output=True, text=True, cwd=tmp
        )
        assert process.returncode == 0, process.stderr[-3000:]
        for case, result in zip(cases, json.loads(process.stdout.splitlines()[-1]), strict=True):
            out[(environment, *case)] = result
    return out


def _checks(result: dict) -> set[tuple[str, str, str]]:
    return {(c["name"], c["status"], c["message"]) for c in json.loads(result["stdout"])["checks"]}


@pytest.mark.parametrize("environment", ENVIRONMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("option", OPTIONS, ids=" ".join)
def test_a_requested_check_passes_only_by_running(results, environment, fmt, option):
    baseline = results[(environment, fmt, ())]
    result = results[(environment, fmt, option)]
    assert "Traceback" not in result["stderr"], result["stderr"]
    if result["code"] == 0:
        added = _checks(result) - _checks(baseline)
        assert added, f"{' '.join(option)} exits 0 and changes nothing in the report: it did not run"
        assert {status for _, status, _ in added} <= {PASS, WARN}, added
        return
    assert result["code"] in EXIT_CODES, result
    if result["code"] == 1:
        report = json.loads(result["stdout"])
        assert not report["ok"] and any(c["status"] in (FAIL, NOT_RUN) for c in report["checks"]), report
    else:  # an error, said with a hint
        assert "weightlock: error:" in result["stderr"] and "hint:" in result["stderr"], result["stderr"]


def test_the_generated_cases_reach_each_outcome(results):
    """The cases above are not vacuous: an engine that cannot be imported exits 7 (both engines alike), an
    engine for the other format exits 3, --deep runs, and a check verification never reached is not run."""
    for environment in ENVIRONMENTS:
        for fmt in FORMATS:
            folder = fmt.startswith("folder")
            vllm = results[(environment, fmt, ("--engine", "vllm"))]
            llama = results[(environment, fmt, ("--engine", "llama-cpp"))]
            stops = fmt == "gguf-unknown-architecture"  # verification ends before the engine is tried
            cannot_run = environment == "illegal-instruction"  # installed, but stops on this processor: not run
            assert vllm["code"] == (7 if folder else 3), vllm
            assert llama["code"] == (3 if folder else 1 if stops or cannot_run else 7), llama
            if cannot_run and not folder and not stops:
                checks = {c["name"]: c for c in json.loads(llama["stdout"])["checks"]}
                assert checks["llama.cpp"]["status"] == NOT_RUN, checks
                assert (
                    "cannot run on this machine: llama.cpp stopped on an illegal instruction"
                    in (checks["llama.cpp"]["message"])
                )
            for result in (vllm, llama):
                if result["code"] == 7:
                    assert "needs" in result["stderr"] and "leave out --engine" in result["stderr"], result
        deep = {fmt: results[(environment, fmt, ("--deep",))] for fmt in FORMATS}
        assert all(deep[f]["code"] == 0 for f in FORMATS if f != "gguf-unknown-architecture"), deep
        stopped = json.loads(deep["gguf-unknown-architecture"]["stdout"])
        assert deep["gguf-unknown-architecture"]["code"] == 1 and not stopped["ok"]
        assert ("finite", NOT_RUN) in {(c["name"], c["status"]) for c in stopped["checks"]}, stopped
    assert "broken for this test" in results[("broken", "gguf", ("--engine", "llama-cpp"))]["stderr"]


def test_report_requirements_by_construction():
    """ok needs every required check to have passed or warned; finish() shows the rest as not run."""
    report = Report("x")
    report.add("a", PASS, "fine")
    report.require("b", "--engine e")
    report.require("c", "--deep")
    report.add("c", SKIP, "nothing to scan")
    assert not report.ok and report.unmet() == ["b", "c"]
    report.finish().finish()
    assert [(c.name, c.status) for c in report.checks] == [("a", PASS), ("c", NOT_RUN), ("b", NOT_RUN)]
    assert "requested by --deep but did not run: nothing to scan" in report.checks[1].message
    assert len(report.failures()) == 2 and not json.loads(report_json(report))["ok"]  # the schema knows not-run
    report = Report("y")
    report.require("b", "--engine e")
    report.add("b", WARN, "loads, with a warning")
    assert report.ok and report.finish().ok


def test_apply_asks_for_no_check_verify_would_leave_out():
    """apply runs verify's default checks before publishing; an option that asks apply for one of verify's
    optional checks must be covered here first."""
    apply_options = {p.name for p in cli.commands["apply"].params}
    requesting = {p.name for p in VERIFY.params if isinstance(p, click.Option) and p.name not in ASKS_FOR_NOTHING}
    assert not apply_options & requesting, f"apply gained {apply_options & requesting}: add apply to {__file__}"
