"""weightlock: bake a SafetyLock into a checkpoint as o_proj biases, offline and provably.

The public API mirrors the CLI; each function is documented where it is defined. Names are
imported on first use (PEP 562), so ``import weightlock`` and the console entry point are cheap
and a Ctrl-C during start-up can be caught (see ``console.py``). The ``TYPE_CHECKING`` block
mirrors ``_EXPORTS`` for type checkers and editors (a test keeps the two equal).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "WeightlockError": "errors",
    "Lock": "core.lock",
    "SourceModel": "core.lock",
    "build_lock": "core.lock",
    "load_lock": "core.lock",
    "save_lock": "core.lock",
    "import_legacy": "core.legacy",
    "open_checkpoint": "formats.safetensors.folder",
    "apply_lock": "api",
    "verify_checkpoint": "api",
    "apply_in_place": "api",
    "revert": "api",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from weightlock.api import apply_in_place, apply_lock, revert, verify_checkpoint  # noqa: F401
    from weightlock.core.legacy import import_legacy  # noqa: F401
    from weightlock.core.lock import Lock, SourceModel, build_lock, load_lock, save_lock  # noqa: F401
    from weightlock.errors import WeightlockError  # noqa: F401
    from weightlock.formats.safetensors.folder import open_checkpoint  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'weightlock' has no attribute {name!r}")
