"""weightlock: bake a SafetyLock into a checkpoint as o_proj biases, offline and provably.

The public API mirrors the CLI; each function is documented where it is defined.
"""

__version__ = "0.1.0"

from .errors import WeightlockError  # noqa: E402  (the family every error belongs to)
from .lock import Lock, SourceModel, build_lock, load_lock, save_lock  # noqa: E402
from .legacy import import_legacy  # noqa: E402
from .checkpoint import open_checkpoint  # noqa: E402
from .apply import apply_lock  # noqa: E402
from .verify import verify_checkpoint  # noqa: E402
from .inplace import apply_in_place, revert  # noqa: E402

__all__ = ["WeightlockError", "Lock", "SourceModel", "build_lock", "load_lock", "save_lock",
           "import_legacy", "open_checkpoint", "apply_lock", "apply_in_place", "revert", "verify_checkpoint",
           "__version__"]
