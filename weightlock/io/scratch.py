"""A scratch folder for the checkpoints eval bakes at each alpha."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


class ScratchBeside:
    """A temporary folder beside ``model`` when possible (the same filesystem, so baking a folder hardlinks its
    shards instead of copying them), else in the system's temporary folder; removed by ``close``."""

    _scratch: Path | None = None  # so that close() works on an instance whose __init__ failed early

    def __init__(self, model: Path):
        try:
            self._scratch: Path | None = Path(tempfile.mkdtemp(prefix=".weightlock-eval-", dir=model.parent))
        except OSError:
            self._scratch = Path(tempfile.mkdtemp(prefix="weightlock-eval-"))

    @property
    def scratch(self) -> Path:
        if self._scratch is None:
            raise RuntimeError("the scratch folder was already removed")
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __del__(self):
        self.close()
