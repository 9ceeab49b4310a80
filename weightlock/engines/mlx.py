"""mlx-lm (Apple's MLX; its Linux CPU build here) as an engine: ``verify --engine mlx`` and ``eval`` /
``tune --engine mlx``.

``verify --engine mlx`` loads the folder as ``mlx_lm.load`` does (``mlx_lm.utils.load_model``: the class by
``model_type``, its ``sanitize``, mlx-lm's quantization, ``load_weights`` strict), lazily (nothing beyond the
biases is read), and then checks that every attention-output bias the folder stores is a parameter of the model
mlx-lm built, holding the stored values. A strict load already refuses a tensor the model has no parameter for;
the second check catches what a class's ``sanitize`` renames or removes before that.

Eval bakes each alpha into a temporary checkpoint (``apply_lock``, passed in by the lab: engines sit below the
dispatcher) and runs mlx-lm on it, as a user serves it: greedy answers (``mlx_lm.generate.generate_step``) and
the next-token log-probabilities for KL, so that MLX-quantized folders, which transformers cannot load, are
evaluated whole in mlx-lm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightlock.core.report import FAIL, PASS, Report
from weightlock.errors import MissingDependencyError, UnsupportedError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.io.scratch import ScratchBeside

INSTALL_HINT = "pip install 'mlx-lm[cpu]' on Linux, 'mlx-lm' on a Mac (bash scripts/install_mlx.sh pins the version)"


def import_mlx(command: str, instead: str):
    """(mlx.core, mlx_lm), or the error that says how to get them; ``instead`` names the alternative."""
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError:
        raise MissingDependencyError(
            f"{command} needs mlx-lm, which is not installed in this environment", hint=f"{INSTALL_HINT}, or {instead}"
        ) from None
    return mx, mlx_lm


def _load(folder: Path, *, lazy: bool = False):
    from mlx_lm.utils import load_model

    return load_model(Path(folder), lazy=lazy, strict=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: " + (" ".join(text.splitlines()[:3])[:400] if text else "")


def check_mlx_loading_report(checkpoint: Checkpoint, report: Report) -> None:
    """``--engine mlx``: without mlx-lm, exit 7. FAIL where mlx-lm refuses the folder, or builds a model without
    one of the stored attention-output biases, or with other values in it; PASS with what was loaded."""
    from weightlock.core.families import shape_from_config, spec_for_config
    from weightlock.io.safetensors_file import TensorReaders

    mx, mlx_lm = import_mlx("verify --engine mlx", "leave out --engine")
    from mlx.utils import tree_flatten

    try:
        model, _ = _load(checkpoint.root, lazy=True)
    except Exception as e:  # mlx-lm signals an unknown model_type, a missing or extra tensor by raising
        report.add("mlx_load", FAIL, f"mlx-lm {mlx_lm.__version__} refuses it: {_first_line(e)}")
        return
    spec = spec_for_config(checkpoint.config)
    shape = shape_from_config(checkpoint.config, spec)
    stored = [n for n in map(spec.output_bias, range(shape.num_layers)) if n in checkpoint.tensors]
    parameters: dict = tree_flatten(model.parameters(), destination={})  # type: ignore[assignment]
    missing, differ = [], []
    with TensorReaders() as readers:
        for name in stored:
            entry = checkpoint.tensors[name]
            values = readers[entry].read_float32(entry)
            served_as = served_name(model, name, mx.array(values))
            if served_as not in parameters:
                missing.append(name + (f" (mlx-lm's sanitize makes it {served_as})" if served_as else ""))
                continue
            served = np.array(parameters[served_as].astype(mx.float32))
            if served.shape != tuple(entry.shape) or not np.array_equal(served, values):
                differ.append(name)
    where = f"mlx-lm {mlx_lm.__version__} {type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"
    if missing or differ:
        report.add(
            "mlx_load",
            FAIL,
            f"{where} loads it but would not serve its attention-output biases as stored "
            f"({len(missing)} not parameters of the model, {len(differ)} with other values)",
            [f"not in the model mlx-lm builds: {n}" for n in missing] + [f"other values: {n}" for n in differ],
        )
        return
    report.add(
        "mlx_load",
        PASS,
        f"{where} loads every tensor (strict) and holds the {len(stored)} stored attention-output biases as stored",
    )


def served_name(model, name: str, value) -> str | None:
    """The name mlx-lm gives the stored tensor ``name`` in ``model``: what the class's ``sanitize`` makes of it
    (GPT-NeoX's renames ``gpt_neox.layers.N`` to ``model.h.N``); None where sanitize removes it."""
    sanitize = getattr(model, "sanitize", None)
    if sanitize is None:
        return name
    try:
        renamed = sanitize({name: value})
    except Exception:  # a sanitize that needs the other tensors: it does not rename this one alone
        return name
    return next(iter(renamed), None) if len(renamed) == 1 else None


class MlxGenerator(ScratchBeside):
    """Greedy answers and next-token log-probabilities from mlx-lm, each alpha baked first."""

    def __init__(self, folder: str | os.PathLike, bake: Callable[..., object]):
        """``bake``: :func:`weightlock.api.apply_lock`."""
        import_mlx("eval --engine mlx", "use --engine transformers")
        self.folder, self.bake = Path(folder), bake
        self._current: tuple | None = None  # (lock and alpha, folder, (model, config)) last served
        super().__init__(self.folder)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, lock=None, alpha=None) -> list[list[int]]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        model, config = self._served(lock, alpha)
        stop = _eos_ids(config)
        answers = []
        for ids in prompt_ids:
            new: list[int] = []
            if max_new_tokens > 0:
                for token, _ in generate_step(mx.array(ids), model, max_tokens=max_new_tokens):
                    if int(token) in stop:
                        break
                    new.append(int(token))
            answers.append(new)
        return answers

    def log_probs(self, token_ids: list[list[int]], lock=None, alpha=None) -> list[np.ndarray]:
        """Per sequence, next-token log-probabilities [tokens, vocab] (float32)."""
        import mlx.core as mx

        model, _ = self._served(lock, alpha)
        rows = []
        for ids in token_ids:
            logits = model(mx.array([ids]))[0].astype(mx.float32)
            rows.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
        return rows

    def _served(self, lock, alpha):
        """The model with ``lock`` baked at ``alpha``, loaded in mlx-lm: kept for the next call at the same alpha
        (an eval asks for answers to three sets and the KL text at each), the previous one removed."""
        key = None if lock is None or alpha is None or alpha == 0 else (id(lock), float(alpha))
        if self._current is None or self._current[0] != key:
            self._drop_current()
            folder = self.folder
            if key is not None:
                folder = Path(tempfile.mkdtemp(prefix="alpha-", dir=self.scratch)) / "checkpoint"
                self.bake(self.folder, lock, out=folder, alpha=alpha)
            try:
                self._current = (key, folder, _load(folder))
            except Exception as e:  # mlx-lm refuses a folder by raising (an unknown class, a tensor it lacks)
                if folder != self.folder:
                    shutil.rmtree(folder.parent, ignore_errors=True)
                raise UnsupportedError(
                    f"mlx-lm cannot load {self.folder.name}"
                    + (f" locked at alpha {alpha:g}" if key else "")
                    + f": {_first_line(e)}",
                    hint="weightlock verify FOLDER --engine mlx says why; or use --engine transformers",
                ) from None
        return self._current[2]

    def _drop_current(self) -> None:
        if self._current is not None and self._current[1] != self.folder:
            shutil.rmtree(self._current[1].parent, ignore_errors=True)
        self._current = None

    def close(self) -> None:
        self._current = None
        super().close()


def _eos_ids(config: dict) -> set[int]:
    """The tokens that end an answer: config.json's eos_token_id (mlx-lm's load_config merges
    generation_config.json's), an int or a list."""
    eos = config.get("eos_token_id")
    values = eos if isinstance(eos, list) else [eos]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
