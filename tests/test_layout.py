"""The package's layout holds: dependencies point one way, no import cycles, every module imports cold.

The layer rule (README, "Layout of the code"): ``errors`` < ``io`` < ``core`` < ``formats`` < ``engines`` < ``api`` <
``lab`` < ``cli``. A module may import its own layer or a lower one, never a higher one; one format's package never
imports another's (a format is replaceable alone); and no set of modules imports itself in a circle, whether the
import sits at the top of a module or inside a function (a function-local import is a real edge: it runs). Imports
under ``if TYPE_CHECKING:`` never run, so they are not edges.

Checked from the source with ``ast`` (every module, so a new one is covered the day it is added) and by importing
each module in a fresh interpreter: a warm ``sys.modules`` can hide a cycle that only a cold import order shows
(huggingface_hub's ``check_imports`` does the same).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import weightlock

PACKAGE = Path(weightlock.__file__).parent

# the rooms, lowest first: (first dotted part under weightlock, ...) per layer
LAYERS: list[tuple[str, ...]] = [
    ("", "errors"),  # "": the package itself (__version__; its lazy names are resolved on use)
    ("io",),
    ("core",),
    ("formats",),
    ("engines",),
    ("api",),
    ("lab",),
    ("cli", "console", "__main__"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _room(module: str) -> str:
    rest = module.removeprefix("weightlock").lstrip(".")
    return rest.split(".")[0]


def _layer(module: str) -> int:
    room = _room(module)
    for index, rooms in enumerate(LAYERS):
        if room in rooms:
            return index
    raise AssertionError(f"{module} is in no layer: add its room ({room!r}) to LAYERS and to the README's layout")


def _format_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "formats" else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> set[str]:
    """The weightlock modules ``module`` imports when it runs (top level or in a function)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from weightlock.x import y`: y may be a submodule or a name in x
            names = [
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import weightlock.a.b` names a module; an attribute's owner
                name = name.rpartition(".")[0]
            if name.startswith("weightlock") and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_is_in_a_room():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    """A module imports only its own layer or lower ones, and no format imports another format."""
    wrong = []
    for imported in sorted(GRAPH[module]):
        if imported == "weightlock":
            continue  # the package itself: __version__
        if _layer(imported) > _layer(module):
            wrong.append(f"{imported} (layer {_room(imported)!r} is above {_room(module)!r})")
        mine, theirs = _format_package(module), _format_package(imported)
        if mine and theirs and mine != theirs:
            wrong.append(f"{imported} (another format's package)")
    assert not wrong, f"{module} imports upwards or across: " + "; ".join(wrong)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the run-time import graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt == "weightlock":
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_what_it_checks():
    """The graph is not empty by a parsing slip: known edges (top level, function-local, relative-free) are in it,
    and a TYPE_CHECKING import is not."""
    assert "weightlock.core.lock" in GRAPH["weightlock.formats.safetensors.plan"]
    assert "weightlock.formats.gguf.apply" in GRAPH["weightlock.api"]  # a function-local import
    assert (
        "weightlock.formats.safetensors.quant.layouts" not in GRAPH["weightlock.formats.safetensors.quant.dequantize"]
    )
    assert len(MODULES) > 40


def test_public_names_are_mirrored_for_type_checkers():
    """``weightlock/__init__.py`` resolves 12 names lazily; its TYPE_CHECKING block imports exactly those, from
    the modules _EXPORTS names, and each resolves at run time to that module's object."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    mirrored = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    mirrored[alias.name] = stmt.module.removeprefix("weightlock.")
    assert mirrored == weightlock._EXPORTS
    import importlib

    for name, module in weightlock._EXPORTS.items():
        assert getattr(weightlock, name) is getattr(importlib.import_module(f"weightlock.{module}"), name)


def _cold_import(module: str) -> tuple[str, int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent
    )
    return module, proc.returncode, proc.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_cold():
    """Each module imported first, alone, in a fresh interpreter (two at a time: CI has two cores)."""
    modules = [m for m in sorted(MODULES) if m != "weightlock.__main__"]  # __main__ runs the CLI
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(m, err) for m, rc, err in pool.map(_cold_import, modules) if rc != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)


def test_every_package_ships():
    """Every package of the source tree is in pyproject's ``packages`` (an installed wheel without one fails at its
    first import: the console script could not even start)."""
    import tomllib

    declared = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - declared == set(), f"packages missing from pyproject.toml: {sorted(packages - declared)}"
