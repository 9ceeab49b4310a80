"""A gated lock baked into a safetensors folder: the gate's neurons appended to every layer's SwiGLU MLP.

The edit (see :mod:`weightlock.core.gate` for the arithmetic): the output class (Llama; Mistral and Qwen2 are
redeclared as it, as for a constant lock) with ``mlp_bias`` on and ``intermediate_size`` grown by
``added_neurons`` in every layer. Per layer, ``gate_proj`` and ``up_proj`` gain rows and ``down_proj`` gains
columns; every layer gains the three MLP biases. In a gated layer the first two new neurons are the gate, with
``down_proj`` columns ``v = W_o @ d`` (the lock's push there, from the target's own o_proj weight); every other
new row, column and bias entry is zero. The stored weights are copied byte for byte, streaming, ahead of the new
rows or columns, and their sha256 is recorded, so verify proves them unchanged; o_proj biases carry no push.

A gated lock goes only on a checkpoint weightlock has not edited, in a float dtype, as a new folder: the source
is the undo (the grown MLPs are the bulk of the model, too big to keep a second time as originals).
"""

from __future__ import annotations

import hashlib

import numpy as np

from weightlock.core.edit import refuse_no_effect
from weightlock.core.families import ArchitectureSpec, ModelShape, output_declaration
from weightlock.core.gate import RAMP, added_neurons
from weightlock.core.lock import Lock
from weightlock.errors import CheckpointError, UnsupportedError, WeightlockError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.plan import EditPlan, plan_edit, stored_linear, weight_product
from weightlock.formats.safetensors.quant.layouts import quantization_of, stored_quantized
from weightlock.io.safetensors_file import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    GrownTensor,
    TensorData,
    TensorEntry,
    TensorReaders,
    float32_to_raw,
    raw_to_float32,
)

NO_GATE_HINT = "pass --no-gate to bake the lock's heads as a constant lock, or lock a Llama, Mistral or Qwen2 folder"
PROJECTIONS = ("gate", "up", "down")


def plan_gated_edit(
    checkpoint: Checkpoint, lock: Lock, alpha: float, *, allow_architecture_mismatch: bool = False
) -> EditPlan:
    """The constant edit's plan with no push in the o_proj biases, plus the MLPs' growth (from headers and
    config alone; the neurons' values are computed by :func:`compute_gate`)."""
    assert lock.gate is not None
    from weightlock.core.families import spec_for_config

    spec = spec_for_config(checkpoint.config)
    if spec.gated_mlp is None or output_declaration(spec)[0].gated_mlp is None:
        raise UnsupportedError(
            f"a gated lock cannot be baked into a {spec.family} checkpoint: weightlock grows SwiGLU MLPs of "
            "Llama-graph families only (Llama, and Mistral and Qwen2 written as Llama)",
            hint=NO_GATE_HINT,
        )
    if checkpoint.provenance is not None:
        raise UnsupportedError(
            f"{checkpoint.root} was already edited by weightlock; a gated lock goes on an unedited checkpoint",
            hint="apply the gated lock to the original checkpoint (the record names it: weightlock inspect)",
        )
    if quantization_of(checkpoint.config) is not None or any(
        stored_quantized(checkpoint.tensors, name.rpartition(".")[0]) for name in checkpoint.tensors
    ):
        raise UnsupportedError(
            "a gated lock cannot be baked into a quantized checkpoint: its MLP weights would have to be "
            "requantized with the new neurons",
            hint="apply the gated lock to the unquantized model and quantize after, or " + NO_GATE_HINT,
        )
    mlp = spec.gated_mlp
    target_mlp = output_declaration(spec)[0].gated_mlp
    assert mlp is not None and target_mlp is not None
    activation = mlp.activation_problem(checkpoint.config)
    if activation is not None:
        raise UnsupportedError(activation, hint=NO_GATE_HINT)
    biased = sorted(
        name
        for name in checkpoint.tensors
        if name.endswith(".bias") and name.rpartition(".")[0].rpartition(".")[0].endswith(".mlp")
    )
    if checkpoint.config.get(target_mlp.bias_flag) or biased:
        raise UnsupportedError(
            f"the checkpoint already has MLP biases ({target_mlp.bias_flag}="
            f"{checkpoint.config.get(target_mlp.bias_flag)!r}{', ' + biased[0] if biased else ''}): a gated lock "
            "was baked into it already, or the model has biases the gate's neurons would have to share",
            hint="apply the gated lock to the original, unedited checkpoint, or " + NO_GATE_HINT,
        )
    plan = plan_edit(
        checkpoint, lock, alpha, allow_architecture_mismatch=allow_architecture_mismatch, push_in_output_bias=False
    )
    shape = plan.shape
    intermediate = shape.intermediate_size
    if intermediate is None:
        raise CheckpointError(
            f"config.json gives no {spec.intermediate_key}: the MLP's width is unknown",
            hint="the config is damaged or incomplete; restore it from the original",
        )
    added = added_neurons(intermediate)
    if lock.gate.probes.shape[1] != shape.hidden_size:
        raise CheckpointError(
            f"the gate's probes read {lock.gate.probes.shape[1]} features, the model's hidden size is "
            f"{shape.hidden_size}",
            hint="use a gated lock forged from this model's base",
        )
    dtypes = set()
    for layer in range(shape.num_layers):
        for which in PROJECTIONS:
            module = mlp.projection(which, layer)
            entry = stored_linear(checkpoint.tensors, checkpoint.config, module)
            expected = (shape.hidden_size, intermediate) if which == "down" else (intermediate, shape.hidden_size)
            if not isinstance(entry, TensorEntry):
                raise CheckpointError(
                    f"the checkpoint has no {module}.weight",
                    hint="the checkpoint is incomplete or not of the architecture its config names",
                )
            if entry.shape != expected or entry.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{entry.name} is {entry.dtype} {list(entry.shape)}, but config.json implies a float "
                    f"{list(expected)}",
                    hint="the config and the tensors disagree; restore the checkpoint",
                )
            dtypes.add(entry.dtype)
    if len(dtypes) != 1:
        raise CheckpointError(
            f"the MLP weights mix dtypes ({', '.join(sorted(dtypes))})",
            hint="the checkpoint is damaged or mixed; restore it from the original",
        )
    (dtype,) = dtypes
    for layer in lock.gate.layers.tolist():
        problem = rounding_problem(lock, layer, dtype)
        if problem is not None:
            raise UnsupportedError(
                problem,
                hint="apply it to the float32 checkpoint, or refit the gate wider (forge --gate with a higher "
                "--gate-harmful-quantile or a lower --gate-benign-quantile)",
            )
    plan.new_config = dict(
        plan.new_config,
        **{target_mlp.bias_flag: True, spec.intermediate_key: intermediate + added},
    )
    plan.gate_record = {
        "reads": "mlp_input",
        "original_intermediate_size": intermediate,
        "added_neurons": added,
        "first_neuron": intermediate,
        "layers": lock.gate.layers.tolist(),
        "mlp_biases": mlp_bias_names(target_mlp, shape.num_layers),
        "undo": "the source checkpoint (a gated edit keeps no originals of the grown MLPs)",
    }
    return plan


# how far (in gate units, 0..1) the neurons rounded to the model's dtype may move the gate from the lock's
ROUNDING_TOLERANCE = 0.05
SILU_MAX_SLOPE = 1.1  # silu'(z) lies in [-0.1, 1.1]


def rounding_problem(lock: Lock, layer: int, dtype: str) -> str | None:
    """Why the layer's gate neurons, rounded to ``dtype``, would open the gate elsewhere than the lock says (None:
    within ROUNDING_TOLERANCE). The bound: each neuron's pre-activation error times silu's largest slope, over
    the ramp, at residuals along the probe scoring from low to high."""
    assert lock.gate is not None
    i = lock.gate.index(layer)
    low, high = float(lock.gate.low[i]), float(lock.gate.high[i])
    rows, gate_bias, _ = lock.gate.neuron_parameters(layer)
    exact_rows, exact_bias = rows.astype(np.float64), gate_bias.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        stored_rows = raw_to_float32(float32_to_raw(rows.reshape(-1), dtype), dtype).reshape(rows.shape)
        stored_bias = raw_to_float32(float32_to_raw(gate_bias, dtype), dtype)
    probe = lock.gate.probes[i].astype(np.float64)
    worst = 0.0
    for score in np.linspace(low - (high - low), high + (high - low), 9):
        x = probe * score  # a residual along the probe with this score
        shift = np.abs((stored_rows.astype(np.float64) @ x + stored_bias) - (exact_rows @ x + exact_bias))
        worst = max(worst, float(shift.sum()) * SILU_MAX_SLOPE / RAMP)
    if np.isfinite(worst) and worst <= ROUNDING_TOLERANCE:
        return None
    ratio = abs(low) / (high - low)
    return (
        f"layer {layer}'s gate does not survive rounding to {dtype}: its thresholds {low:.4g}..{high:.4g} are too "
        f"close together for their size (|low| / (high - low) = {ratio:.3g}), so the stored neurons would open it "
        + (f"up to {worst:.2f} away from where the lock says" if np.isfinite(worst) else "nowhere it says (overflow)")
    )


def mlp_bias_names(mlp, num_layers: int) -> list[str]:
    """Every bias a gated edit adds: each layer's gate_proj, up_proj and down_proj bias."""
    return [f"{mlp.projection(which, layer)}.bias" for layer in range(num_layers) for which in PROJECTIONS]


def gate_values(lock: Lock, layer: int, push: np.ndarray | None, added: int, intermediate: int):
    """The float32 values of one layer's new parts: (new gate_proj rows [added, hidden], new down_proj columns
    [hidden, added], gate_proj bias [intermediate + added], up_proj bias [same], down_proj bias [hidden]);
    ``push`` is ``W_o @ d`` for a gated layer, None for a layer without a gate."""
    assert lock.gate is not None
    hidden = lock.gate.probes.shape[1]
    rows = np.zeros((added, hidden), dtype=np.float32)
    columns = np.zeros((hidden, added), dtype=np.float32)
    gate_bias = np.zeros(intermediate + added, dtype=np.float32)
    up_bias = np.zeros(intermediate + added, dtype=np.float32)
    if push is not None:
        gate_rows, gate_b, up_b = lock.gate.neuron_parameters(layer)
        rows[:2] = gate_rows
        columns[:, 0] = columns[:, 1] = push
        gate_bias[intermediate : intermediate + 2] = gate_b
        up_bias[intermediate : intermediate + 2] = up_b
    return rows, columns, gate_bias, up_bias, np.zeros(hidden, dtype=np.float32)


def _raw(values: np.ndarray, dtype: str, what: str, alpha: float) -> bytes:
    raw = float32_to_raw(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), dtype)
    if not np.all(np.isfinite(raw_to_float32(raw, dtype))):
        raise UnsupportedError(f"{what} overflows {dtype} at alpha {alpha}", hint="use a smaller alpha")
    return raw


def stored_pushes(checkpoint: Checkpoint, spec: ArchitectureSpec, shape: ModelShape, displacements: dict, readers):
    """Per gated layer, ``W_o @ d`` in float32 from the stored o_proj weight (apply's values and verify's
    recomputation alike)."""
    pushes = {}
    for layer, displacement in displacements.items():
        weight = stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer))
        if weight is None:
            raise CheckpointError(
                f"layer {layer} has no o_proj weight to compute the gate's push from",
                hint="the checkpoint is incomplete; fetch all its shards",
            )
        with np.errstate(over="ignore", invalid="ignore"):
            pushes[layer] = weight_product(readers, weight, displacement, shape.head_dim)
    return pushes


def compute_gate(plan: EditPlan, checkpoint: Checkpoint) -> None:
    """Fill ``plan.grown`` and ``plan.extra_tensors``: every layer's grown MLP weights and its three biases."""
    assert plan.gate_record is not None and plan.lock.gate is not None
    mlp = plan.spec.gated_mlp
    assert mlp is not None
    target_mlp = plan.target.gated_mlp
    assert target_mlp is not None
    intermediate = plan.gate_record["original_intermediate_size"]
    added = plan.gate_record["added_neurons"]
    with TensorReaders() as readers:
        pushes = stored_pushes(checkpoint, plan.spec, plan.shape, plan.displacements, readers)
    for layer, push in pushes.items():
        if not np.all(np.isfinite(push)):
            raise CheckpointError(
                f"the gate's push in layer {layer} would not be finite: the o_proj weights hold NaN or Inf, "
                "or alpha is too large for them",
                hint="check the checkpoint (weightlock verify --deep), or use a smaller alpha",
            )
    zeros: dict[int, bytes] = {}  # one zero buffer per size, shared by every layer without a gate

    def zero(nbytes: int) -> bytes:
        return zeros.setdefault(nbytes, bytes(nbytes))

    changed = False
    for layer in range(plan.shape.num_layers):
        weights = {which: checkpoint.tensors[f"{mlp.projection(which, layer)}.weight"] for which in PROJECTIONS}
        dtype = weights["gate"].dtype
        size = added * plan.shape.hidden_size * DTYPE_SIZES[dtype]
        push = pushes.get(layer)
        rows, columns, gate_bias, up_bias, down_bias = gate_values(plan.lock, layer, push, added, intermediate)
        where = f"layer {layer}'s gate"
        if push is None:
            row_bytes, column_bytes = zero(size), zero(size)
        else:
            row_bytes, column_bytes = _raw(rows, dtype, where, plan.alpha), _raw(columns, dtype, where, plan.alpha)
            changed = changed or bool(np.any(raw_to_float32(column_bytes, dtype) != 0))
        for which, extra, axis in (("gate", row_bytes, 0), ("up", zero(size), 0), ("down", column_bytes, 1)):
            plan.grown[weights[which].name] = GrownTensor(weights[which].name, weights[which], extra, axis)
        for which, values in (("gate", gate_bias), ("up", up_bias), ("down", down_bias)):
            name = f"{target_mlp.projection(which, layer)}.bias"
            plan.extra_tensors.append(TensorData(name, dtype, (len(values),), _raw(values, dtype, where, plan.alpha)))
    # the gate's push rounded to nothing (alpha 0, or a tiny alpha in F16/BF16): an output with no lock in it
    refuse_no_effect(changed, plan.alpha, "/".join(sorted({e.dtype for e in plan.grown.values()})))


def _hash_rows(readers: TensorReaders, entry: TensorEntry, rows: int, columns: int) -> str:
    """The sha256 of the first ``rows`` x ``columns`` block of a stored 2-D tensor, row after row."""
    digest = hashlib.sha256()
    size = entry.nbytes // (entry.shape[0] * entry.shape[1])
    row_bytes = entry.shape[1] * size
    block = max(1, (16 << 20) // row_bytes)
    for first in range(0, rows, block):
        count = min(block, rows - first)
        data = readers[entry].read_range(entry, first * row_bytes, (first + count) * row_bytes)
        if columns == entry.shape[1]:
            digest.update(data)
        else:
            digest.update(np.frombuffer(data, np.uint8).reshape(count, row_bytes)[:, : columns * size].tobytes())
    return digest.hexdigest()


def gate_neuron_problems(
    checkpoint: Checkpoint, spec: ArchitectureSpec, shape: ModelShape, lock: Lock, record: dict, source=None
) -> tuple[list[str], str]:
    """Every way the folder's MLPs differ from the recorded gated edit, recomputed from the recorded lock and
    the stored o_proj weights (never from the record's claims but the original width, which the config's
    recorded changes tie to config.json); and a line saying what was checked."""
    gate_record = record["gate"]
    if lock.gate is None:
        return ["the record describes a gated edit, but its lock has no gate"], ""
    if record["parent"] is not None:
        return ["a gated edit is recorded over an earlier edit, which weightlock never writes"], ""
    mlp = spec.gated_mlp
    if mlp is None:
        return [f"a gated edit is recorded, but a {spec.family} checkpoint cannot hold one"], ""
    original_config = record["original_config"]
    intermediate = original_config.get(spec.intermediate_key)
    if not isinstance(intermediate, int) or isinstance(intermediate, bool) or intermediate <= 0:
        return [f"the recorded original config has no usable {spec.intermediate_key}"], ""
    added = added_neurons(intermediate)
    if shape.intermediate_size != intermediate + added:
        return [
            f"config.json says intermediate_size {shape.intermediate_size}; the gated edit of a model of "
            f"{intermediate} gives {intermediate + added}"
        ], ""
    if gate_record.get("original_intermediate_size") != intermediate or gate_record.get("added_neurons") != added:
        return ["the record's gate sizes are not those of its original config"], ""
    if gate_record.get("first_neuron") != intermediate:
        return ["the record's first gate neuron is not the original MLP width"], ""
    if gate_record.get("layers") != lock.gate.layers.tolist():
        return ["the record's gated layers are not the recorded lock's"], ""
    if gate_record.get("mlp_biases") != mlp_bias_names(mlp, shape.num_layers):
        return ["the record's list of added MLP biases is not every layer's three"], ""
    activation = mlp.activation_problem(checkpoint.config)
    if activation is not None:
        return [activation], ""
    if not checkpoint.config.get(mlp.bias_flag):
        return [f"config.json does not set {mlp.bias_flag}: loaders would drop the gate's biases"], ""
    if lock.gate.probes.shape[1] != shape.hidden_size:
        return ["the recorded gate's probes do not match the model's hidden size"], ""
    hashes = gate_record.get("original_sha256")
    expected_names = {f"{mlp.projection(w, layer)}.weight" for layer in range(shape.num_layers) for w in PROJECTIONS}
    if not isinstance(hashes, dict) or set(hashes) != expected_names:
        return ["the record does not hash exactly the original MLP weights"], ""
    problems: list[str] = []
    with np.errstate(over="ignore", invalid="ignore"):
        displacements = lock.displacements(record["alpha"], shape.num_heads)
    try:
        with TensorReaders() as readers:
            pushes = stored_pushes(checkpoint, spec, shape, displacements, readers)
            for layer in range(shape.num_layers):
                problems += _layer_problems(
                    checkpoint, readers, mlp, shape, lock, record, layer, pushes.get(layer), intermediate, added, hashes
                )
                if len(problems) > 20:
                    break
            if source is not None and not problems:
                for name, digest in sorted(hashes.items()):
                    entry = source.tensors.get(name)
                    if entry is None or len(entry.shape) != 2:
                        problems.append(f"the source has no 2-D {name}")
                    elif _hash_rows(readers, entry, entry.shape[0], entry.shape[1]) != digest:
                        problems.append(f"{name}: the output's original part is not the source's")
    except WeightlockError as e:
        problems.append(e.message)
    how = (
        f"{shape.num_layers} MLPs grown by {added} neurons; {len(lock.gate.layers)} gates recomputed from the "
        "recorded lock and the stored o_proj weights; the original weights "
        + (
            "equal the source's (their sha256, as recorded)"
            if source is not None
            else "equal the sha256 the record gives (only --source compares them with the source's)"
        )
    )
    return problems, how


def _layer_problems(
    checkpoint, readers, mlp, shape, lock, record, layer, push, intermediate, added, hashes
) -> list[str]:
    tensors = checkpoint.tensors
    names = {which: f"{mlp.projection(which, layer)}.weight" for which in PROJECTIONS}
    entries = {which: tensors.get(name) for which, name in names.items()}
    hidden = shape.hidden_size
    width = intermediate + added
    shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    for which, entry in entries.items():
        if entry is None or entry.shape != shapes[which] or entry.dtype not in FLOAT_DTYPES:
            got = "missing" if entry is None else f"{entry.dtype} {list(entry.shape)}"
            return [f"{names[which]} is {got}, the gated edit gives a float {list(shapes[which])}"]
    dtype = entries["gate"].dtype
    if {e.dtype for e in entries.values()} != {dtype}:
        return [f"layer {layer}'s MLP weights mix dtypes"]
    rows, columns, gate_bias, up_bias, down_bias = gate_values(lock, layer, push, added, intermediate)
    problems = []
    size = entries["gate"].nbytes // (width * hidden)
    for which in ("gate", "up"):
        entry = entries[which]
        stored_new = readers[entry].read_range(entry, intermediate * hidden * size, entry.nbytes)
        expected = float32_to_raw((rows if which == "gate" else np.zeros_like(rows)).reshape(-1), dtype)
        if stored_new != expected:
            problems.append(f"{names[which]}: the new rows are not the recorded gate's")
        if _hash_rows(readers, entry, intermediate, hidden) != hashes[names[which]]:
            problems.append(f"{names[which]}: the original rows differ from the recorded original")
    down = entries["down"]
    row_bytes = width * size
    new_columns = bytearray()
    original = hashlib.sha256()  # one pass over down_proj: its original columns hashed, its new ones kept
    block = max(1, (16 << 20) // row_bytes)
    for first in range(0, hidden, block):
        count = min(block, hidden - first)
        data = np.frombuffer(
            readers[down].read_range(down, first * row_bytes, (first + count) * row_bytes), np.uint8
        ).reshape(count, row_bytes)
        original.update(np.ascontiguousarray(data[:, : intermediate * size]).data)
        new_columns += data[:, intermediate * size :].tobytes()
    if bytes(new_columns) != float32_to_raw(columns.reshape(-1), dtype):
        problems.append(
            f"{names['down']}: the new columns are not the layer's push"
            if push is not None
            else f"{names['down']}: the new columns of a layer without a gate are not zero"
        )
    if original.hexdigest() != hashes[names["down"]]:
        problems.append(f"{names['down']}: the original columns differ from the recorded original")
    for which, values in (("gate", gate_bias), ("up", up_bias), ("down", down_bias)):
        name = f"{mlp.projection(which, layer)}.bias"
        entry = tensors.get(name)
        if entry is None or entry.shape != (len(values),) or entry.dtype != dtype:
            problems.append(f"{name} is {'missing' if entry is None else f'{entry.dtype} {list(entry.shape)}'}")
        elif readers[entry].read_bytes(entry) != float32_to_raw(values, dtype):
            problems.append(f"{name} is not the recorded gate's")
    return problems
