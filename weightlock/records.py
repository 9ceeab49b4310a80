"""Rules every edit record weightlock writes obeys (folder provenance.json, GGUF ``weightlock.edit``).

A relock nests the previous record as ``parent``, so each edit adds one level of JSON nesting; readers refuse
JSON deeper than ``untrusted.MAX_JSON_DEPTH`` (Python's recursive parser must never see more). An edit whose
record would pass that limit is refused before any work (exit 3), rather than written and then found
unreadable by its own verification.
"""

from __future__ import annotations

from .errors import InvalidInputError
from .untrusted import MAX_JSON_DEPTH


def json_depth(value) -> int:
    """How deep ``value`` nests as JSON (a scalar 0, ``{}``/``[]`` 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def chain_length(record) -> int:
    """The number of edits a record describes (itself and its parents)."""
    count = 0
    while isinstance(record, dict):
        count, record = count + 1, record.get("parent")
    return count


def check_record_depth(record: dict, what: str) -> None:
    """Refuse an edit whose record (with its parents) would nest deeper than weightlock reads back."""
    depth = json_depth(record)
    if depth > MAX_JSON_DEPTH:
        raise InvalidInputError(
            f"{what} already records {chain_length(record.get('parent'))} edit(s); the record of one more would "
            f"nest {depth} levels deep, more than the {MAX_JSON_DEPTH} weightlock reads back",
            hint="lock the original (unlocked) model instead of relocking a locked one again; "
            "a new lock on the original replaces the old edit entirely",
        )
