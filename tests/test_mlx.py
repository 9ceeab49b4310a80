"""What mlx-lm itself (0.32.2, its Linux CPU build: scripts/install_mlx.sh) does with weightlock's outputs, for
every family make_model builds: the serving table's verdict for the `mlx-lm` engine (its strict `load`) is what
mlx-lm does. Where the table says it applies the lock, mlx-lm's next-token logits on the locked output equal
stock transformers on the source with the lock by hooks, within twice the gap of the same comparison on the
unlocked source (mlx against transformers), while the lock moves them far more; where it says mlx-lm refuses
the output, loading it raises.

Skipped without mlx-lm unless WEIGHTLOCK_REQUIRE_MLX=1 (scripts/test.sh sets it: then it cannot pass by
skipping).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import FAMILIES, INPUT_IDS, logits, make_model, random_lock

from weightlock import apply_lock, open_checkpoint
from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.engines.serving import assess_folder
from weightlock.engines.serving_table import APPLIES, REFUSES

ALPHA = 3.0


def _mlx():
    try:
        import mlx.core as mx
        from mlx_lm.utils import load_model
    except ImportError:
        message = "mlx-lm is not installed (bash scripts/install_mlx.sh)"
        if os.environ.get("WEIGHTLOCK_REQUIRE_MLX") == "1":
            pytest.fail(message + "; WEIGHTLOCK_REQUIRE_MLX=1 forbids skipping")
        pytest.skip(message)
    return mx, load_model


def _mlx_logits(folder) -> np.ndarray:
    mx, load_model = _mlx()
    model, _ = load_model(folder)
    return np.array(model(mx.array(INPUT_IDS)).astype(mx.float32))


def _table_verdict(folder) -> str | None:
    checkpoint = open_checkpoint(folder)
    spec = spec_for_config(checkpoint.config)
    assessment = assess_folder(checkpoint, spec, shape_from_config(checkpoint.config, spec), ("mlx-lm",))
    (verdict,) = assessment.verdicts
    return verdict.verdict


# gpt_oss: mlx-lm's class quantizes its experts as MXFP4 on load (not a float checkpoint it can take as saved)
MLX_FAMILIES = sorted(f for f in FAMILIES if f not in ("gpt_oss", "starcoder2-nobias"))


@pytest.mark.parametrize("family", MLX_FAMILIES)
def test_mlx_lm_does_what_the_serving_table_says(tmp_path, family):
    _mlx()
    source = make_model(tmp_path / family, family, layers=3)
    lock = random_lock(source, n_heads=5)
    out = tmp_path / f"{family}-locked"
    apply_lock(source, lock, out=out, alpha=ALPHA, loader_check=False)
    verdict = _table_verdict(out)
    assert verdict in (APPLIES, REFUSES), verdict
    if verdict == REFUSES:
        with pytest.raises(ValueError, match="not in model|parameters"):
            _mlx_logits(out)
        return
    locked = _mlx_logits(out)
    hooked = logits(source, lock=lock, alpha=ALPHA).numpy()
    plain = logits(source).numpy()
    engine_gap = np.abs(_mlx_logits(source) - plain).max()
    error = np.abs(locked - hooked).max()
    effect = np.abs(hooked - plain).max()
    print(f"{family}: mlx-lm engine gap {engine_gap:.2e}, locked error {error:.2e}, lock effect {effect:.2f}")
    assert error <= 2 * engine_gap + 1e-4, (error, engine_gap)
    assert effect > 100 * error, (effect, error)
