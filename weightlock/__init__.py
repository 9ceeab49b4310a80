"""weightlock: bake a SafetyLock into a checkpoint as o_proj biases, offline and provably.

The public API mirrors the CLI; each function is documented where it is defined. Names are
imported on first use (PEP 562), so ``import weightlock`` and the console entry point are cheap
and a Ctrl-C during start-up can be caught (see ``console.py``).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "WeightlockError": "errors",
    "Lock": "lock",
    "SourceModel": "lock",
    "build_lock": "lock",
    "load_lock": "lock",
    "save_lock": "lock",
    "import_legacy": "legacy",
    "open_checkpoint": "checkpoint",
    "apply_lock": "apply",
    "verify_checkpoint": "verify",
    "apply_in_place": "inplace",
    "revert": "inplace",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'weightlock' has no attribute {name!r}")
