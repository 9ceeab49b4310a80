"""One exception family for everything weightlock refuses or fails to do.

Every error carries a message that says what was wrong and what to do about it,
and an exit code the CLI maps it to. Catch ``WeightlockError`` to catch them all.
"""

from __future__ import annotations


class WeightlockError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; ``hint`` what to do."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")

    def to_dict(self) -> dict:
        return {"error": self.kind, "message": self.message, "hint": self.hint}


class InvalidInputError(WeightlockError):
    """A file or argument given by the user is malformed or unusable."""

    exit_code = 3
    kind = "invalid_input"


class LockFormatError(InvalidInputError):
    """A lock file is not a valid weightlock lock."""

    kind = "invalid_lock"


class UnsafePickleError(LockFormatError):
    """A legacy lock's pickle asks for something other than numpy data."""

    kind = "unsafe_pickle"


class CheckpointError(InvalidInputError):
    """A checkpoint folder or safetensors file is malformed or inconsistent."""

    kind = "invalid_checkpoint"


class IncompatibleLockError(WeightlockError):
    """The lock was made for a model of another shape or architecture."""

    exit_code = 4
    kind = "incompatible_lock"


class UnsupportedError(WeightlockError):
    """The checkpoint is valid but weightlock cannot edit it exactly."""

    exit_code = 4
    kind = "unsupported"


class OutputError(WeightlockError):
    """The output location is unusable (exists, inside the source, not writable)."""

    exit_code = 5
    kind = "output"


class VerificationError(WeightlockError):
    """A written checkpoint failed verification; it was not put in place."""

    exit_code = 6
    kind = "verification_failed"


class MissingDependencyError(WeightlockError):
    """An optional extra is needed for this command."""

    exit_code = 7
    kind = "missing_dependency"


class EngineCannotRunHere(MissingDependencyError):
    """The engine is installed, but its build cannot run this model on this machine (e.g. vLLM's CPU build
    lacks the int4 kernel without AVX-512). ``verify`` reports the engine check as not run, with the reason."""

    kind = "engine_cannot_run_here"
