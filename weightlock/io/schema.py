"""JSON schemas shipped with weightlock and validation against them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema


@cache
def load_schema(name: str) -> dict:
    filename = f"{name}.schema.json"
    # In a source tree the schemas sit beside the package; an installed wheel carries
    # them as the weightlock.schemas package (see pyproject's package-dir).
    in_tree = Path(__file__).resolve().parents[2] / "schemas" / filename  # weightlock/io/ -> the tree
    if in_tree.is_file():
        return json.loads(in_tree.read_text("utf-8"))
    return json.loads(resources.files("weightlock.schemas").joinpath(filename).read_text("utf-8"))


def schema_errors(instance, name: str) -> list[str]:
    """Every way ``instance`` departs from schema ``name``, as readable lines (empty if valid)."""
    validator = jsonschema.Draft202012Validator(load_schema(name))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors]
