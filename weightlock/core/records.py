"""Rules every edit record weightlock writes obeys (folder provenance.json, GGUF ``weightlock.edit``).

A relock nests the previous record as ``parent``, so each edit adds one level of JSON nesting; readers refuse
JSON deeper than ``untrusted.MAX_JSON_DEPTH`` (Python's recursive parser must never see more). An edit whose
record would pass that limit is refused before any work (exit 3), rather than written and then found
unreadable by its own verification.
"""

from __future__ import annotations

import math
import re

from weightlock.errors import InvalidInputError
from weightlock.io.untrusted import MAX_JSON_DEPTH

SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


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
    """Refuse an edit whose record (with its parents) would nest deeper than weightlock reads back, or whose
    lock would net below zero over the chain (:func:`check_record_net`); every writer calls it before any work."""
    check_record_net(record, what)
    depth = json_depth(record)
    if depth > MAX_JSON_DEPTH:
        raise InvalidInputError(
            f"{what} already records {chain_length(record.get('parent'))} edit(s); the record of one more would "
            f"nest {depth} levels deep, more than the {MAX_JSON_DEPTH} weightlock reads back",
            hint="lock the original (unlocked) model instead of relocking a locked one again; "
            "a new lock on the original replaces the old edit entirely",
        )


def net_alphas(record) -> dict[str, float]:
    """The alpha each lock (by its sha256) nets to over a record chain (folder or GGUF: each edit adds
    ``alpha * W_o @ d`` of its lock to what the edit before it left, so a lock's effect is the sum of its
    edits' alphas). A sum within rounding of zero (an undo: +a then -a) is 0.0."""
    alphas: dict[str, list[float]] = {}
    while isinstance(record, dict):  # a malformed earlier record is skipped here; the chain check fails it
        lock, alpha = record.get("lock"), record.get("alpha")
        sha = lock.get("sha256") if isinstance(lock, dict) else None
        if (
            isinstance(sha, str)
            and SHA256.fullmatch(sha)
            and isinstance(alpha, (int, float))
            and not isinstance(alpha, bool)
        ):
            if math.isfinite(alpha):
                alphas.setdefault(sha, []).append(float(alpha))
        record = record.get("parent")
    net = {}
    for sha, values in alphas.items():
        total = math.fsum(values)
        net[sha] = 0.0 if abs(total) <= 1e-9 * max(abs(v) for v in values) else total
    return net


def check_record_net(record: dict, what: str) -> None:
    """Refuse an edit after which its lock nets below zero over the record chain (``--alpha -6`` on an unlocked
    model, or ``-6`` after ``+3``): the output would carry the lock's opposite, which verify fails (exit 3)."""
    sha = record["lock"]["sha256"]
    net = net_alphas(record).get(sha, 0.0)
    if net < 0:
        before = net_alphas(record.get("parent")).get(sha, 0.0)
        raise InvalidInputError(
            f"{what}: with alpha {record['alpha']:g} the edits would net to alpha {net:g} of lock {sha[:12]} "
            f"(it is at {before:g} now): the output would carry the lock's opposite, not the lock",
            hint="apply the lock at a positive alpha to the original (unlocked) model"
            + (f"; to take the lock off, apply it at alpha {-before:g} (its net), or use the source" * (before > 0)),
        )
