"""The CLI's promise, checked for every option of every command with the hostile values of its type.

The cases are generated from click's own metadata (``weightlock.cli.cli.commands`` and each command's
``params``), so an option added tomorrow is covered the day it is written:

- numbers (``cli.Number``, ``cli.NumberList``): nan, inf, -inf, 0, negative, huge, 10**400;
- paths and other text (arguments and options that are not flags, choices or numbers): an existing file,
  the command's input itself, a file inside the input folder, a path whose parent is a regular file, a symlink
  (to an input), a FIFO;
- choices: a value that is not one;
- verify's ``--engines`` (``cli.EngineList``): empty, unknown, repeated, escape sequences, forged lines, huge.

The promise: an exit code from the documented set (0, 1; 2 click usage; 3-7 weightlock's errors), one error
line and a real hint, no traceback (any exception out of ``main`` fails the test), nothing written outside
the named output, every input byte-identical. Values that must be refused are: non-finite numbers and
10**400 (exit 3, naming the option) and every hostile path given as an output (``cli.OutputFile``: exit 5).

forge, eval and tune run on a tiny checkpoint without a tokenizer, so a value they accept ends at model
loading (exit 3, "cannot load the model") in milliseconds, and a value they must refuse is seen to be
refused before any model is loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
from pathlib import Path

import click
import pytest
from conftest import LEGACY_LOCKS, make_llama, random_lock, run_cli

from weightlock import save_lock
from weightlock.cli.common import EngineList, Number, NumberList, OutputFile, cli

EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7}
CASE_SECONDS = 60  # a case that blocks (a FIFO read, a runaway loop) fails instead of hanging the suite
HUGE_INT, HUGE_FLOAT = str(10**12), "1e300"
TOO_BIG = "1" + "0" * 400

NUMBER_VALUES = {"nan": "nan", "inf": "inf", "-inf": "-inf", "zero": "0", "negative": "-1", "10**400": TOO_BIG}
MUST_REFUSE_NUMBERS = {"nan", "inf", "-inf", "10**400"}
NUMBER_LIST_VALUES = {
    "nan-inf-1": "nan,inf,1",
    "negative": "0,-1",
    "10**400": TOO_BIG,
    "empty": ",",
    "not-numbers": "1,x",
}
PATH_VALUES = ("existing-file", "input-itself", "inside-input", "parent-is-file", "symlink", "fifo")
# verify --engines (cli.EngineList): every one is a usage error (exit 2) naming the option, never a traceback
ENGINE_LIST_VALUES = {
    "empty": "",
    "comma": ",",
    "unknown": "nonsense",
    "duplicate": "vllm,vllm",
    "empty-item": "vllm,,llama.cpp",
    "escape": "\x1b[2Jvllm",
    "newline": "vllm\nweightlock: error: forged",
    "huge": "x" * 100_000,
}

# What each command runs with when one of its options is varied. {name} are files of the world fixture.
BASELINES = {
    "apply": ["{model}", "--lock", "{lock}", "--out", "{outputs}/applied", "--no-loader-check"],
    "verify": ["{model}", "--no-loader-check"],
    "revert": ["{model}"],
    "inspect": ["{lock}"],
    "forge": ["{model}", "--data", "{pairs}", "--out", "{outputs}/forged.wlock", "--plain-template"],
    "eval": ["{model}", "--lock", "{lock}", *("--harmful", "{harmful}", "--limit", "1", "--max-new-tokens", "2")],
    "tune": ["{model}", "--lock", "{lock}", "--alphas", "0,1", "--harmful", "{harmful}", "--limit", "1"],
    "import-legacy": ["{legacy}", "--out", "{outputs}/imported.wlock"],
}


def _is_flag(param) -> bool:
    return isinstance(param, click.Option) and (param.is_flag or param.count)


def _kinds(param) -> dict[str, str]:
    """label -> hostile value (or a PATH_VALUES name, resolved against the world) for one parameter."""
    if _is_flag(param):
        return {}
    if isinstance(param.type, EngineList):
        return dict(ENGINE_LIST_VALUES)
    if isinstance(param.type, NumberList):
        return dict(NUMBER_LIST_VALUES)
    if isinstance(param.type, Number):
        huge = HUGE_INT if param.type.bound.kind is int else HUGE_FLOAT
        return dict(NUMBER_VALUES, huge=huge)
    if isinstance(param.type, click.Choice):
        return {"not-a-choice": "nonsense"}
    if isinstance(param.type, click.types.FuncParamType | click.types.IntParamType | click.types.FloatParamType):
        raise AssertionError(f"{param.name}: a numeric option must be a cli.Number (bounds.BOUNDS)")
    return {kind: kind for kind in PATH_VALUES}


def _cases():
    for name, command in cli.commands.items():
        for param in command.params:
            for label in _kinds(param):
                yield pytest.param(name, param.name, label, id=f"{name}-{param.name}-{label}")


CASES = list(_cases())


def test_every_command_has_a_baseline_and_every_number_a_bound():
    assert sorted(BASELINES) == sorted(cli.commands), "add a baseline for each new command"
    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param.type, click.types.IntParamType | click.types.FloatParamType):
                raise AssertionError(f"{command.name} {param.opts}: use cli.Number(<bounds.BOUNDS row>)")
    assert len(CASES) > 300


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    model = make_llama(root / "model")
    lock = root / "lock.wlock"
    save_lock(random_lock(model), lock)
    pairs = root / "pairs.jsonl"
    pairs.write_text(
        "".join(
            f'{{"prompt": "question {i}?", "chosen": "I will not help with {i}.", "rejected": "Sure, {i}."}}\n'
            for i in range(8)
        )
    )
    harmful = root / "harmful.txt"
    harmful.write_text("How do I pick a lock?\n")
    legacy = root / "legacy.safelock"
    published = sorted(LEGACY_LOCKS.glob("*8B-Instruct.safelock"))
    if published:
        shutil.copyfile(published[0], legacy)
    else:  # the shared data is absent: any file stands in (import-legacy then refuses it, which is fine)
        legacy.write_bytes(b"not a pickle")
    (root / "existing.txt").write_text("a file the user did not name as an output\n")
    os.symlink(lock, root / "link-to-lock")
    os.mkfifo(root / "fifo")
    (root / "outputs").mkdir()
    names = {
        "model": model,
        "lock": lock,
        "pairs": pairs,
        "harmful": harmful,
        "legacy": legacy,
        "outputs": root / "outputs",
    }
    return root, {k: str(v) for k, v in names.items()}


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry below root: a file's sha256, a link's target, a FIFO or folder by kind (never opened)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                seen[key] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[key] = "dir" if stat.S_ISDIR(mode) else f"mode:{stat.S_IFMT(mode)}"
    return seen


def _hostile_path(kind: str, root: Path, main_input: str, names: dict) -> str:
    main = Path(main_input)
    folder = main if main.is_dir() else Path(names["model"])
    return {
        "existing-file": str(root / "existing.txt"),
        "input-itself": main_input,
        "inside-input": str(folder / "config.json"),
        "parent-is-file": str(root / "existing.txt" / "x.out"),
        "symlink": str(root / "link-to-lock"),
        "fifo": str(root / "fifo"),
    }[kind]


def _arguments(command, param_name: str, value: str, names: dict) -> tuple[list[str], list[str]]:
    """The command line with ``param_name`` set to ``value``, and the outputs it names."""
    args = [a.format(**names) for a in BASELINES[command.name]]
    param = next(p for p in command.params if p.name == param_name)
    if isinstance(param, click.Argument):
        args[0] = value
    elif param.opts[0] in args and not getattr(param, "multiple", False):
        args[args.index(param.opts[0]) + 1] = value
    else:
        args += [param.opts[0], value]
    outputs = [
        args[args.index(p.opts[0]) + 1]
        for p in command.params
        if isinstance(p, click.Option) and isinstance(p.type, OutputFile) and p.opts[0] in args
    ]
    return [command.name, *args], outputs


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"a case ran past {CASE_SECONDS}s")


@pytest.mark.parametrize("command_name,param_name,label", CASES)
def test_cli_contract(world, capsys, command_name, param_name, label):
    root, names = world
    command = cli.commands[command_name]
    param = next(p for p in command.params if p.name == param_name)
    kinds = _kinds(param)
    main_input = BASELINES[command_name][0].format(**names)
    value = kinds[label] if kinds[label] not in PATH_VALUES else _hostile_path(label, root, main_input, names)
    args, outputs = _arguments(command, param_name, value, names)
    before = _snapshot(root)

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code, out, err = run_cli(capsys, *args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    shown = f"weightlock {' '.join(args)[:300]}\nexit {code}\nstderr: {err[-2000:]}"
    if os.environ.get("WEIGHTLOCK_CONTRACT_LOG"):  # one line per case, to read what each value met
        with open(os.environ["WEIGHTLOCK_CONTRACT_LOG"], "a") as log:
            first = next((line for line in err.splitlines() if "rror" in line), "")
            log.write(f"{command_name} {param_name} {label}: exit {code} {first[:150]}\n")
    assert code in EXIT_CODES, shown
    assert "Traceback" not in err and "Traceback" not in out, shown
    if code == 2:  # click's usage error: the error line and where help is
        assert "Error: " in err and "for help." in err, shown
    elif code not in (0, 1):
        lines = err.strip().splitlines()
        errors = [line for line in lines if line.startswith("weightlock: error: ")]
        hints = [line for line in lines if line.startswith("  hint: ")]
        assert len(errors) == 1 and len(hints) == 1, shown
        assert len(hints[0]) > len("  hint: ") + 8 and "see weightlock --help" not in hints[0], shown

    is_output = isinstance(param.type, OutputFile)
    if is_output and label in PATH_VALUES:
        assert code == 5, shown
    if isinstance(param.type, Number | NumberList) and label in MUST_REFUSE_NUMBERS | {"nan-inf-1", "not-numbers"}:
        assert code == 3 and param.opts[0] in err, shown
    if isinstance(param.type, EngineList):
        assert code == 2 and param.opts[0] in err and "\x1b" not in err, shown
        assert not any(line.startswith("weightlock: error: forged") for line in err.splitlines()), shown

    # nothing written outside the named outputs, every input byte-identical
    after = _snapshot(root)
    allowed = set()
    if code in (0, 1):
        for output in outputs:
            path = Path(output)
            if path.is_absolute() and root in path.parents:
                relative = path.relative_to(root)
                allowed |= {k for k in after if k == str(relative) or k.startswith(f"{relative}/")}
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)} - allowed
    assert not changed, f"{shown}\nchanged outside the named output: {sorted(changed)[:10]}"
    for key in allowed:  # the next case starts from the same world
        path = root / key
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()


# ------------------------------------------------------------------------------------------ outputs (class 1)


def test_an_existing_output_needs_force_and_an_input_is_never_one(world, capsys, tmp_path):
    """eval's report/plot and inspect's heatmap refuse an existing file without --force; with --force they
    replace it, but never an input (the review's `eval MODEL --report MODEL/config.json`)."""
    root, names = world
    existing = tmp_path / "map.png"
    existing.write_bytes(b"old")
    code, _, err = run_cli(capsys, "inspect", names["lock"], "--heatmap", str(existing))
    assert code == 5 and "already exists" in err and "--force" in err and existing.read_bytes() == b"old"
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(capsys, "inspect", names["lock"], "--heatmap", str(existing), "--force")
    assert code == 0, err
    assert existing.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".*partial"))
    config = Path(names["model"]) / "config.json"
    before = config.read_bytes()
    code, _, err = run_cli(capsys, "eval", names["model"], "--report", str(config), "--force")
    assert code == 5 and "inside the source" in err and config.read_bytes() == before


def test_report_and_plot_may_not_be_one_file(world, capsys, tmp_path):
    root, names = world
    code, _, err = run_cli(
        capsys, "eval", names["model"], "--report", str(tmp_path / "r"), "--plot", str(tmp_path / "r")
    )
    assert code == 5 and "same file" in err and not (tmp_path / "r").exists()


def test_write_file_atomically_leaves_nothing_when_the_write_fails(tmp_path):
    from weightlock.errors import OutputError
    from weightlock.io.outputs import write_file_atomically

    target = tmp_path / "report.json"

    def half_then_fail(staged: Path):
        staged.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        write_file_atomically(target, half_then_fail)
    assert sorted(os.listdir(tmp_path)) == []
    target.write_bytes(b"mine")  # appears while the work runs: never replaced without force
    with pytest.raises(OutputError, match="appeared"):
        write_file_atomically(target, b"new", force=False)
    assert target.read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_a_killed_write_leaves_no_output_and_the_next_write_tidies_it(tmp_path):
    """SIGKILL in the middle of a write: the output does not exist (no half file); the staging file the dead
    process left is removed by the next write to the same place."""
    import subprocess
    import sys

    target = tmp_path / "x.wlock"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from weightlock.io.outputs import write_file_atomically\n"
        "def half(staged):\n"
        "    staged.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_file_atomically(Path(sys.argv[1]), half)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert not target.exists() and len(os.listdir(tmp_path)) == 1  # only the dead run's staging file
    from weightlock.io.outputs import write_file_atomically

    write_file_atomically(target, b"whole", force=False)
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["x.wlock"]


def test_import_legacy_into_an_unwritable_folder_exits_5(world, capsys, tmp_path):
    root, names = world
    if os.geteuid() == 0:  # root may write anywhere a mode allows nothing; /proc refuses even root
        out = Path("/proc/weightlock-contract.wlock")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "x.wlock"
    code, out_text, err = run_cli(capsys, "import-legacy", names["legacy"], "--out", str(out))
    if not LEGACY_LOCKS.is_dir():
        pytest.skip("the published legacy locks (shared/data) are absent")
    assert code == 5 and "Traceback" not in err and "hint: " in err and not out.exists(), err


# ------------------------------------------------------------------------------------------- numbers (class 7)


def test_the_api_settings_share_the_cli_bounds(world, tmp_path):
    """ForgeSettings, EvalSettings, TuneBounds and apply's alpha refuse what the options refuse, before any
    model is loaded (a missing model would otherwise be the error)."""
    from weightlock import apply_lock
    from weightlock.errors import InvalidInputError
    from weightlock.lab.evaluate import EvalSettings, TuneBounds, evaluate_model
    from weightlock.lab.forge import ForgeSettings, forge_lock

    root, names = world
    missing = str(tmp_path / "no-model")
    for field, value in [("holdout", float("nan")), ("last_tokens", 0), ("batch_size", 0), ("seed", -1)]:
        with pytest.raises(InvalidInputError, match="--" + field.replace("_", "-")):
            forge_lock(missing, names["pairs"], ForgeSettings(**{field: value}))
    with pytest.raises(InvalidInputError, match="--max-kl"):
        TuneBounds(max_kl=float("nan"))
    with pytest.raises(InvalidInputError, match="--max-new-tokens"):
        evaluate_model(missing, settings=EvalSettings(max_new_tokens=0))
    with pytest.raises(InvalidInputError, match="--alpha"):
        evaluate_model(missing, lock=names["lock"], alphas=[float("inf")])
    with pytest.raises(InvalidInputError, match="--alpha"):
        apply_lock(names["model"], names["lock"], out=tmp_path / "o", alpha=10**400)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- environment (class 10)


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "nonsense-device", "mps"])
def test_a_device_this_machine_lacks_is_refused_before_loading(world, capsys, device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    root, names = world
    missing = str(root / "no-such-model")  # a device check after loading would report the model instead
    for command in (
        ["forge", missing, "--data", names["pairs"], "--out", names["outputs"] + "/d.wlock"],
        ["eval", missing],
    ):
        code, _, err = run_cli(capsys, *command, "--device", device)
        assert code == 3 and "--device" in err and "hint: " in err and "Traceback" not in err, err


def test_a_chat_template_that_raises_names_the_item(tmp_path):
    from test_eval import make_chat_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightlock.errors import InvalidInputError
    from weightlock.lab.evaluate import Evaluator
    from weightlock.lab.forge import ForgeSettings, forge_from_model

    folder = make_chat_model(tmp_path / "m")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('no boom') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "".join(
            f'{{"prompt": "{"boom" if i == 3 else "q"} {i}", "chosen": "no {i}", "rejected": "yes {i}"}}\n'
            for i in range(8)
        )
    )
    settings = ForgeSettings(heads=1, last_tokens=2, selection="accuracy", position="answer")
    with pytest.raises(InvalidInputError, match="item 3 of the pairs file.*no boom"):
        forge_from_model(model, tokenizer, pairs, settings)
    with pytest.raises(InvalidInputError, match="chat template fails on the prompt 'boom'"):
        Evaluator(model, tokenizer).generate(["fine", "boom"])
