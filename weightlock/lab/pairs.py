"""Safety preference pairs: a prompt, a safe answer and an unsafe answer.

Accepted, as a JSON list or JSON Lines, with either key set per item:

    SafetyLock:  question, answer_matching_behavior (safe), answer_not_matching_behavior (unsafe)
    preference:  prompt, chosen (safe), rejected (unsafe)

The prompt may be a string or a chat: a list of {role, content} messages (the misspelt
role "assistent" found in public SafetyLock data is read as "assistant").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from weightlock.errors import InvalidInputError
from weightlock.io.untrusted import parse_json, read_bytes

KEY_SETS = (("question", "answer_matching_behavior", "answer_not_matching_behavior"), ("prompt", "chosen", "rejected"))
PAIRS_HINT = (
    "pairs are JSON or JSON Lines: objects with question, answer_matching_behavior and "
    "answer_not_matching_behavior, or prompt, chosen and rejected"
)
MAX_PAIRS_BYTES = 1 << 30
ROLE_ALIASES = {"assistent": "assistant", "human": "user", "bot": "assistant"}


@dataclass(frozen=True)
class Pair:
    messages: tuple[tuple[str, str], ...]  # (role, content), the prompt as a chat
    safe: str
    unsafe: str


def _messages(prompt, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidInputError(f"{where}: the prompt is empty", hint=PAIRS_HINT)
        return (("user", prompt),)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        out = []
        for m in prompt:
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise InvalidInputError(
                    f"{where}: each chat message needs string 'role' and 'content'", hint=PAIRS_HINT
                )
            out.append((ROLE_ALIASES.get(role, role), content))
        if not any(content.strip() for _, content in out):
            raise InvalidInputError(f"{where}: every message of the prompt is empty", hint=PAIRS_HINT)
        return tuple(out)
    raise InvalidInputError(
        f"{where}: the prompt must be a string or a list of {{role, content}} messages", hint=PAIRS_HINT
    )


def _pair(item, where: str) -> Pair:
    if not isinstance(item, dict):
        raise InvalidInputError(f"{where} is not a JSON object", hint=PAIRS_HINT)
    for prompt_key, safe_key, unsafe_key in KEY_SETS:
        if {prompt_key, safe_key, unsafe_key} <= set(item):
            safe, unsafe = item[safe_key], item[unsafe_key]
            if not isinstance(safe, str) or not isinstance(unsafe, str) or not safe.strip() or not unsafe.strip():
                raise InvalidInputError(
                    f"{where}: '{safe_key}' and '{unsafe_key}' must be non-empty strings", hint=PAIRS_HINT
                )
            return Pair(_messages(item[prompt_key], where), safe, unsafe)
    raise InvalidInputError(
        f"{where} has keys {sorted(item)[:6]}, which are neither SafetyLock's nor prompt/chosen/rejected",
        hint="each pair needs question, answer_matching_behavior (safe) and answer_not_matching_behavior "
        "(unsafe), or prompt, chosen (safe) and rejected (unsafe)",
    )


def load_pairs(path: str | Path, limit: int | None = None) -> tuple[list[Pair], str]:
    """The pairs in ``path`` (first ``limit`` if given) and the sha256 of the file."""
    path = Path(path)
    try:
        raw = read_bytes(path, "the pairs file", MAX_PAIRS_BYTES, InvalidInputError)
    except InvalidInputError as e:
        raise InvalidInputError(f"cannot read the pairs file: {e.message}", hint=PAIRS_HINT) from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text", hint=PAIRS_HINT) from None
    try:
        items = parse_json(text, str(path), error=InvalidInputError)
        if isinstance(items, dict):
            items = [items]
    except InvalidInputError:
        try:
            items = [parse_json(line, str(path), error=InvalidInputError) for line in text.splitlines() if line.strip()]
        except InvalidInputError as e:
            raise InvalidInputError(f"{path} is neither JSON nor JSON Lines ({e.message})", hint=PAIRS_HINT) from None
    if not isinstance(items, list) or not items:
        raise InvalidInputError(f"{path} holds no pairs", hint=PAIRS_HINT)
    pairs = [_pair(item, f"{path.name} item {i}") for i, item in enumerate(items[:limit] if limit else items)]
    if len(pairs) < 4:
        raise InvalidInputError(
            f"{path} has {len(pairs)} pairs; forge needs at least 4 to hold some out",
            hint="use more pairs (the reference uses 100)",
        )
    return pairs, digest
