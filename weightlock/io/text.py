"""Text from an input shown to a person: one table of the characters that must never reach a terminal or a
model card as they are.

They break a line, move the cursor, are invisible, or reorder what is shown: C0 and C1 controls and DEL, the
soft hyphen, the combining grapheme joiner, the Hangul and Mongolian fillers, zero-width characters, bidi marks,
embeddings, overrides and isolates, line and paragraph separators, the word joiner and invisible operators, the
byte order mark, the interlinear annotation marks and the tag characters. ``printable`` (the CLI) shows each as an
escape; the model card (``card.md``) replaces each with a space. Both read this table, so they cannot disagree.
"""

from __future__ import annotations

import re

HIDDEN_CHARACTERS = (
    "\x00-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\u3164\ufeff\uffa0\ufff9-\ufffb\U000e0000-\U000e007f"
)
HIDDEN = re.compile(f"[{HIDDEN_CHARACTERS}]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text) -> str:
    """``text`` as one safe terminal line: every hidden character shown as an escape."""
    return HIDDEN.sub(_escape, str(text))
