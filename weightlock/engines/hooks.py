"""The lock applied at run time, by forward-pre-hooks on each locked layer's o_proj.

This is SafetyLock's online form: add ``alpha * scale * direction`` to each selected
head's slice of the o_proj input. It is the reference the offline edit is proven
against, and it is how forge and eval run a lock without writing a checkpoint.
Needs torch and a model built by transformers (or any module with the same names).
"""

from __future__ import annotations

from contextlib import contextmanager

from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.core.lock import Lock


@contextmanager
def lock_hooks(model, lock: Lock, alpha: float | None = None, *, gate: bool = True):
    """Within the block, ``model`` runs with ``lock`` added to its o_proj inputs, or, for a gated lock (unless
    ``gate`` is False), with each layer's push added to its MLP output as far as the layer's gate is open."""
    config = model.config.to_dict()
    shape = shape_from_config(config, spec_for_config(config))
    lock.check_compatible(shape)
    displacements = lock.displacements(lock.default_alpha if alpha is None else alpha, shape.num_heads)
    if gate and lock.gate is not None:
        spec = spec_for_config(config)
        if spec.gated_mlp is None:
            from weightlock.errors import UnsupportedError

            raise UnsupportedError(
                f"a gated lock runs only in Llama, Mistral and Qwen2 models (their SwiGLU MLP holds the gate), "
                f"not in a {spec.family} model",
                hint="use the lock without its gate (apply --no-gate), or a lock for a supported family",
            )
        with gate_hooks(model, lock.gate, displacements):
            yield model
        return
    with displacement_hooks(model, displacements):
        yield model


def gated_pushes(model, displacements: dict) -> dict:
    """Per gated layer, the push ``W_o @ d`` (float32, from the model's own o_proj weight): the constant lock's
    bias for that layer, which the gate scales."""
    import torch

    spec = spec_for_config(model.config.to_dict())
    pushes = {}
    with torch.no_grad():
        for layer, displacement in displacements.items():
            weight = model.get_submodule(spec.output_module(layer)).weight
            pushes[layer] = weight.detach().float().cpu() @ torch.as_tensor(displacement, dtype=torch.float32)
    return pushes


@contextmanager
def gate_hooks(model, gate, displacements: dict, record: dict | None = None):
    """Within the block, each gated layer's MLP output gains what the baked gate neurons compute: their
    ``gate_proj`` rows and biases, a constant ``up_proj`` (the bias), ``silu`` of one times the other, along
    ``down_proj`` columns holding the layer's push, each rounded to the model's dtype as the baked tensors are.
    ``record``, when given, receives per layer the gate's opening at every position of each call (for
    measuring where it fires): ``record[layer]`` is a list of [batch, positions] float tensors."""
    import torch

    spec = spec_for_config(model.config.to_dict())
    pushes = gated_pushes(model, displacements)
    handles = []

    def make_hook(layer):
        rows, gate_bias, up_bias = (torch.as_tensor(a) for a in gate.neuron_parameters(layer))
        columns = torch.stack([pushes[layer], pushes[layer]], dim=1)  # [hidden, 2]
        placed: dict = {}

        def hook(module, args, output):
            hidden = args[0]
            key = (hidden.device, hidden.dtype)
            if key not in placed:
                placed[key] = tuple(
                    t.to(device=hidden.device, dtype=hidden.dtype) for t in (rows, gate_bias, up_bias, columns)
                )
            r, gb, ub, cols = placed[key]
            activation = torch.nn.functional.silu(torch.nn.functional.linear(hidden, r, gb)) * ub
            if record is not None:
                record.setdefault(layer, []).append(activation.float().sum(-1).detach().cpu())
            return output + torch.nn.functional.linear(activation, cols)

        return hook

    try:
        for layer in gate.layers.tolist():
            assert spec.gated_mlp is not None
            module = model.get_submodule(spec.gated_mlp.module.format(layer=layer))
            handles.append(module.register_forward_hook(make_hook(layer)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def displacement_hooks(model, displacements: dict):
    """Within the block, ``model`` runs with ``displacements[layer]`` (a vector as wide as the o_proj input)
    added to each listed layer's o_proj input. forge's effect measurement runs single heads through this."""
    import torch

    def addend(vector):
        # One copy per (device, dtype), made on first use: a host-to-device copy in every call would
        # stall the GPU once per locked layer per generated token (measured: issue 15, README).
        return lambda hidden: vector.to(device=hidden.device, dtype=hidden.dtype), lambda hidden: ()

    with _added_to_output_inputs(model, {layer: addend(torch.as_tensor(d)) for layer, d in displacements.items()}):
        yield model


@contextmanager
def row_displacement_hooks(model, displacements: dict, rows_per_vector: list[int]):
    """Within the block, each listed layer's o_proj input gets a displacement of its own per batch row:
    ``displacements[layer]`` is a [vectors, width] tensor, and vector ``v`` is added to ``rows_per_vector[0]``
    consecutive rows (vector 0 to the first block of rows, vector 1 to the next, ...). ``rows_per_vector[0]``
    is read at each call, so one set of hooks serves batches of different sizes. forge measures many
    candidate heads in one forward pass this way: one vector per candidate, a zero row where a candidate
    leaves that layer alone."""

    def addend(vectors):
        # The vectors rounded to the model's dtype first, as displacement_hooks rounds its one vector: a row
        # here gets exactly the addend that candidate would get measured alone.
        def make(hidden):
            placed = vectors.to(device=hidden.device, dtype=hidden.dtype)
            return placed.repeat_interleave(rows_per_vector[0], dim=0)[:, None, :]

        return make, lambda hidden: (rows_per_vector[0],)

    with _added_to_output_inputs(model, {layer: addend(v) for layer, v in displacements.items()}):
        yield model


@contextmanager
def _added_to_output_inputs(model, addends: dict):
    """Forward-pre-hooks adding a tensor to each listed layer's o_proj input. ``addends[layer]`` is
    (make, key): ``make(hidden)`` builds the tensor, once per (device, dtype, *key(hidden)), then reused."""
    spec = spec_for_config(model.config.to_dict())
    handles = []

    def make_hook(make, key_of):
        placed: dict = {}

        def hook(module, args):
            hidden = args[0]
            key = (hidden.device, hidden.dtype, *key_of(hidden))
            if key not in placed:
                placed[key] = make(hidden)
            return (hidden + placed[key],) + tuple(args[1:])

        return hook

    try:
        for layer, (make, key_of) in addends.items():
            module = model.get_submodule(spec.output_module(layer))
            handles.append(module.register_forward_pre_hook(make_hook(make, key_of)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
