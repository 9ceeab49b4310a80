"""Gated locks for tests: a random lock with a gate whose thresholds straddle the tiny models' probe scores,
so it is open at some positions and shut at others (a gate always open or always shut would prove little)."""

from __future__ import annotations

import numpy as np
from conftest import random_lock


def gated_lock(folder, *, n_heads=5, seed=1, default_alpha=3.0, low=-0.3, high=0.3):
    from weightlock.core.gate import Gate
    from weightlock.core.lock import _validate

    lock = random_lock(folder, n_heads=n_heads, seed=seed, default_alpha=default_alpha)
    rng = np.random.default_rng(seed + 100)
    layers = np.array(sorted(set(lock.layers.tolist())), dtype=np.int64)
    probes = rng.normal(size=(len(layers), lock.source_model.hidden_size))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    lock.gate = Gate(
        layers,
        probes.astype(np.float32),
        np.full(len(layers), low, np.float32),
        np.full(len(layers), high, np.float32),
        {"method": "test"},
    )
    _validate(lock, "the test's gated lock")
    return lock
