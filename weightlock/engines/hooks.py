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
def lock_hooks(model, lock: Lock, alpha: float | None = None):
    """Within the block, ``model`` runs with ``lock`` added to its o_proj inputs."""
    config = model.config.to_dict()
    shape = shape_from_config(config, spec_for_config(config))
    lock.check_compatible(shape)
    displacements = lock.displacements(lock.default_alpha if alpha is None else alpha, shape.num_heads)
    with displacement_hooks(model, displacements):
        yield model


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
