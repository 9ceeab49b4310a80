"""The gate of a gated lock: the lock's push, added only where a harmfulness probe fires.

A constant lock adds the same bias to every token of every prompt. A gated lock adds, in each locked layer, the
same vector ``v_l = W_o[l] @ d_l`` (the layer's constant bias, computed with the target's own ``W_o``) scaled by
``gate(x) in [0, 1]``, where ``x`` is the layer's MLP input (the normalised residual) and

    score = probe . x
    z     = RAMP * (score - low) / (high - low)
    gate  = (silu(z) - silu(z - RAMP)) / RAMP

``gate`` is 0 below ``low`` (at most silu's dip, 0.035), rises linearly from ``low`` to ``high`` and is 1 above
(silu(z) - silu(z - R) tends to R). Two SwiGLU neurons compute exactly this: each reads the probe through its
``gate_proj`` row (``k * probe``, ``k = RAMP / (high - low)``) and a bias (``-k * low``, and ``-k * low - RAMP``),
has a zero ``up_proj`` row with bias ``+1/RAMP`` or ``-1/RAMP``, and writes along ``v_l`` through its
``down_proj`` column. So a stock Llama MLP with ``mlp_bias`` serves the gate with no code: every layer gains the
same number of neurons (zero rows and columns where no gate sits compute ``silu(0) * 0 = 0``).

The neurons are added in a block whose size keeps ``intermediate_size`` divisible by the power of two (up to 128)
that divided it (up to 256), so tensor-parallel engines that split the MLP keep splitting it evenly and
llama.cpp k-quants (blocks of 256) still quantize a converted down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# z units over which the gate rises from 0 to 1: steep enough that silu's curvature at each end is a small part
# of the ramp, so the gate is nearly linear between low and high
RAMP = 8.0
NEURONS_PER_GATE = 2
MAX_BLOCK_ALIGNMENT = (
    256  # llama.cpp k-quants quantize rows in blocks of 256: a down_proj this wide stays k-quantizable
)
# the only place a gate reads and writes at present: the MLP of the layer whose heads the lock displaces
READS = "mlp_input"


def silu(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z / (1.0 + np.exp(-np.clip(z, -700, 700)))


def gate_value(scores, low: float, high: float) -> np.ndarray:
    """How far the gate is open (0 to 1) at probe ``scores``."""
    z = RAMP * (np.asarray(scores, dtype=np.float64) - low) / (high - low)
    return (silu(z) - silu(z - RAMP)) / RAMP


@dataclass
class Gate:
    """One probe per gated layer. ``layers`` must be exactly the lock's layers (each layer's push is gated)."""

    layers: np.ndarray  # int64 [G], ascending
    probes: np.ndarray  # float32 [G, hidden], unit rows
    low: np.ndarray  # float32 [G]: the probe score where the gate starts to open
    high: np.ndarray  # float32 [G]: where it is fully open (> low)
    details: dict = field(default_factory=dict)  # how it was fitted (forge records the data and the rates)

    @property
    def num_gates(self) -> int:
        return int(self.layers.shape[0])

    def index(self, layer: int) -> int:
        return int(np.flatnonzero(self.layers == layer)[0])

    def neuron_parameters(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The layer's two neurons, float32: ``gate_proj`` rows [2, hidden], ``gate_proj`` biases [2] and
        ``up_proj`` biases [2] (their ``up_proj`` rows are zero; their ``down_proj`` columns are the push)."""
        i = self.index(layer)
        low, high = float(self.low[i]), float(self.high[i])
        k = RAMP / (high - low)
        rows = np.stack([self.probes[i], self.probes[i]]).astype(np.float64) * k
        gate_bias = np.array([-k * low, -k * low - RAMP])
        up_bias = np.array([1.0 / RAMP, -1.0 / RAMP])
        return rows.astype(np.float32), gate_bias.astype(np.float32), up_bias.astype(np.float32)

    def summary(self) -> dict:
        return {
            "reads": READS,
            "ramp": RAMP,
            "layers": self.layers.tolist(),
            "low": [round(float(x), 6) for x in self.low],
            "high": [round(float(x), 6) for x in self.high],
            "details": self.details,
        }


def added_neurons(intermediate_size: int) -> int:
    """How many neurons each layer's MLP gains: the two a gate needs, rounded up to the largest power of two
    (at most 256) that divides ``intermediate_size``, so every power-of-two divisor it had up to 256 still divides
    it (tensor-parallel sizes of 3, 6 or 12 may no longer divide it)."""
    alignment = 1
    while alignment < MAX_BLOCK_ALIGNMENT and intermediate_size % (alignment * 2) == 0:
        alignment *= 2
    return -(-NEURONS_PER_GATE // alignment) * alignment


def gate_problems(gate: Gate, lock_layers, hidden_size: int) -> list[str]:
    """Every way ``gate`` is malformed or disagrees with its lock (layers) and model width."""
    problems = []
    g = gate.layers.shape[0] if gate.layers.ndim == 1 else -1
    if g <= 0:
        return ["the gate gates no layer"]
    if gate.probes.shape != (g, hidden_size):
        problems.append(f"gate probes have shape {list(gate.probes.shape)}, expected {[g, hidden_size]}")
    if gate.low.shape != (g,) or gate.high.shape != (g,):
        problems.append(f"gate low/high have shapes {list(gate.low.shape)}/{list(gate.high.shape)}, expected [{g}]")
    if problems:
        return problems
    if not (np.all(np.isfinite(gate.probes)) and np.all(np.isfinite(gate.low)) and np.all(np.isfinite(gate.high))):
        problems.append("gate probes and thresholds must be finite (found NaN or Inf)")
        return problems
    norms = np.linalg.norm(gate.probes.astype(np.float64), axis=1)
    if np.any(np.abs(norms - 1) > 1e-3):
        problems.append(f"gate probes must be unit length (norms {norms.min():.4g}..{norms.max():.4g})")
    spread = gate.high.astype(np.float64) - gate.low.astype(np.float64)
    # the steepness RAMP / (high - low) is written into float16/bfloat16 weights: a spread this small (relative
    # to the thresholds) would round the gate away
    if np.any(spread <= 1e-4 * np.maximum(1.0, np.abs(gate.low.astype(np.float64)))):
        problems.append("each gate's high must exceed its low by a usable margin (1e-4 relative)")
    if np.any(np.abs(gate.low) > 1e6) or np.any(np.abs(gate.high) > 1e6):
        problems.append("gate thresholds must lie within +-1e6 (the probe reads a normalised residual)")
    layers = gate.layers.tolist()
    if layers != sorted(set(layers)):
        problems.append("gate layers must be ascending with none twice")
    if sorted(set(np.asarray(lock_layers).tolist())) != layers:
        problems.append(
            f"the gate gates layers {layers[:8]}, the lock displaces layers "
            f"{sorted(set(np.asarray(lock_layers).tolist()))[:8]}: each locked layer needs its gate"
        )
    return problems
