"""The numbers weightlock accepts: one table, shared by the CLI's option types and the API's settings.

Every numeric CLI option is a :class:`weightlock.cli.Number` of one row here, and every settings object
(``ForgeSettings``, ``EvalSettings``, ``TuneBounds``, apply's ``alpha``) checks its fields against the same
rows, so ``--holdout nan`` on the command line and ``ForgeSettings(holdout=float("nan"))`` in Python are
refused alike: an :class:`InvalidInputError` (exit 3) that names the option and its range. Floats must be
finite; integers must fit a signed 64-bit integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from weightlock.errors import InvalidInputError

INT64_MAX = 2**63 - 1
MAX_NEW_TOKENS = 1 << 16  # more than any model's context


@dataclass(frozen=True)
class Bound:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # ``low`` itself is refused
    high_open: bool = False
    example: str = "1"

    def describe(self) -> str:
        if self.kind is int:
            high = INT64_MAX if self.high is None else self.high
            if self.low is None:
                return f"an integer of at most {high}"
            if self.high is None:
                return f"at least {self.low:g} (an integer below 2^63)"
            return f"an integer in [{self.low:g}, {high:g}]"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a number in {left}{self.low:g}, {self.high:g}{right}"
        if self.low == 0 and self.low_open:
            return "a positive number"
        if self.low is not None:
            return f"a finite number {'above' if self.low_open else 'of at least'} {self.low:g}"
        return "a finite number"


def _fraction(example: str) -> Bound:
    return Bound(float, 0, 1, example=example)


BOUNDS: dict[str, Bound] = {
    # forge (ForgeSettings)
    "heads": Bound(int, 1, example="24"),
    "last_tokens": Bound(int, 1, example="5"),
    "seed": Bound(int, 0, example="0"),
    "holdout": Bound(float, 0, 1, low_open=True, high_open=True, example="0.25"),
    "batch_size": Bound(int, 1, example="8"),
    "limit": Bound(int, 1, example="100"),
    "default_alpha": Bound(float, 0, low_open=True, example="6"),
    # forge --gate (GateSettings)
    "tail_tokens": Bound(int, 1, 4096, example="32"),
    "benign_quantile": Bound(float, 0, 1, low_open=True, high_open=True, example="0.99"),
    "harmful_quantile": Bound(float, 0, 1, low_open=True, high_open=True, example="0.5"),
    "shrinkage": Bound(float, 0, 100, example="0.1"),
    "shortlist": Bound(int, 1, example="64"),
    "effect_alpha": Bound(float, 0, low_open=True, example="1"),
    "effect_pairs": Bound(int, 1, example="16"),
    "effect_benign": Bound(int, 1, example="16"),
    "effect_answer_tokens": Bound(int, 1, example="8"),
    "greedy_pool": Bound(int, 1, example="8"),
    "effect_batch": Bound(int, 1, example="16"),
    "probe_steps": Bound(int, 1, example="200"),
    "probe_lr": Bound(float, 0, low_open=True, example="0.05"),
    "probe_l2": Bound(float, 0, example="0.001"),
    # apply, eval, tune (a negative alpha takes a lock off)
    "alpha": Bound(float, example="4"),
    # eval (EvalSettings)
    "max_new_tokens": Bound(int, 1, MAX_NEW_TOKENS, example="48"),
    "kl_max_tokens": Bound(int, 1, example="128"),
    # eval --engine vllm: GPUs a model is sharded over (vLLM's own limits apply beyond these)
    "tensor_parallel_size": Bound(int, 1, 4096, example="8"),
    "pipeline_parallel_size": Bound(int, 1, 4096, example="2"),
    # tune (TuneBounds)
    "target_refusal": _fraction("0.8"),
    "max_over_refusal": _fraction("0.2"),
    "max_kl": Bound(float, 0, example="0.5"),
    "max_degenerate": _fraction("0.1"),
    "max_qa_drop": _fraction("0.05"),
    "max_over_refusal_rise": _fraction("0.1"),
}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(name: str, value, option: str | None = None):
    """``value`` as the row ``name`` of :data:`BOUNDS` wants it (an int or a float), or InvalidInputError."""
    bound = BOUNDS[name]
    option = option or option_name(name)
    try:
        shown = str(value).strip()
    except ValueError:  # an integer past Python's digit limit
        shown = "a number too large to print"
    shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"

    def refuse():
        return InvalidInputError(
            f"{option} must be {bound.describe()}, got {shown}", hint=f"e.g. {option} {bound.example}"
        )

    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text, 10) if bound.kind is int else float(text)
        except ValueError:
            raise refuse() from None
    if isinstance(value, bool):
        raise refuse()
    if not isinstance(value, int | float):
        if bound.kind is float and hasattr(value, "__float__"):
            value = float(value)  # numpy scalars
        elif bound.kind is int and hasattr(value, "__index__"):
            value = int(value)
        else:
            raise refuse()
    if bound.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise refuse()
            value = int(value)
        high: float | None = INT64_MAX if bound.high is None else bound.high
    else:
        try:
            value = float(value)
        except OverflowError:
            raise refuse() from None
        if not math.isfinite(value):
            raise refuse()
        high = bound.high
    if bound.low is not None and (value < bound.low or (bound.low_open and value == bound.low)):
        raise refuse()
    if high is not None and (value > high or (bound.high_open and value == high)):
        raise refuse()
    return value


def check_fields(settings, options: dict[str, str] | None = None) -> None:
    """Check every field of a settings dataclass that has a row in :data:`BOUNDS` (None means "not set")."""
    for field in fields(settings):
        value = getattr(settings, field.name)
        if field.name in BOUNDS and value is not None:
            check_number(field.name, value, (options or {}).get(field.name))
