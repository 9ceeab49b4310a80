"""What every benchmark's ``--markdown`` prints: Markdown tables and the line that says where figures come from.

A block is a caption, one or more tables and notes, then one provenance line naming the exact command, the
date, the code (git commit) and the machine (CPU model from /proc/cpuinfo, usable cores, memory, and the GPU
if one was used). scripts/README.md quotes these blocks verbatim. Imported by the scripts beside it (``python
scripts/X.py`` puts scripts/ first on sys.path).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned (labels), the rest right-aligned (figures).
    Cells are printed as given (format numbers before), None as an empty cell; ``|`` is escaped."""

    def cell(value: object) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "| " + " | ".join("---" if i < left else "---:" for i in range(len(header))) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def span(values: Sequence[float], pattern: str) -> str:
    """``lo-hi`` of several measurements (one value when they agree at the printed precision)."""
    lo, hi = format(min(values), pattern), format(max(values), pattern)
    return lo if lo == hi else f"{lo}-{hi}"


def command() -> str:
    """The command line that ran this script: the interpreter relative to the working directory when it lies
    inside it (``.venv-vllm/bin/python``), else ``python``; then the arguments as given."""
    interpreter = Path(sys.executable)
    try:
        shown = str(interpreter.relative_to(Path.cwd()))
    except ValueError:
        shown = "python"
    return shlex.join([shown, *sys.argv])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def commit() -> str | None:
    """The short commit of the checkout the script runs from, with ``+ uncommitted changes`` when dirty."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head} + uncommitted changes" if dirty else head


def machine(gpu: str | None = None) -> str:
    """``CPU model, N cores, M GiB RAM, GPU: name`` (or ``no GPU used``)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = os.cpu_count()
    cores = f"{usable} cores" if usable == total else f"{usable} of {total} cores"
    memory = memory_gib()
    parts = [cpu_model(), cores] + ([f"{memory:.0f} GiB RAM"] if memory else [])
    parts.append(f"GPU: {gpu}" if gpu else "no GPU used")
    return ", ".join(parts)


def provenance(gpu: str | None = None) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d")
    code = commit()
    return (
        f"Command: `{command()}`; run on {when}"
        + (f" at commit {code}" if code else "")
        + f"; machine: {machine(gpu)}."
    )


def block(*parts: str, gpu: str | None = None) -> str:
    """The parts (caption, tables, notes) separated by blank lines, then the provenance line."""
    return "\n\n".join([*(p for p in parts if p), provenance(gpu)])


def emit(*parts: str, gpu: str | None = None) -> None:
    """Print the block at the end of stdout, after a blank line."""
    print("\n" + block(*parts, gpu=gpu), flush=True)
