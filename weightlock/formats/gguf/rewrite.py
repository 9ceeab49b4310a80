"""A GGUF file rewritten as another llama.cpp architecture that computes the same model and has an
attn_output.bias (the rules are data: :class:`weightlock.formats.gguf.architectures.GraphRewrite`).

Planned from the headers alone (what the target graph cannot reproduce is refused by name before anything is
read), carried out by the writer (:mod:`.edit`) one head of one tensor at a time, recorded in the edit record
(``rewrite``), and checked by verify: the record's claims against the rule and the file, and, given the
source, every permuted tensor and every renamed key against the source's bytes.

Why by hand: llama.cpp's converter permutes Q/K while converting from Hugging Face tensors; nothing rewrites
the architecture of a finished (quantized) GGUF. The permutation is the converter's
(``conversion/llama.py: LlamaModel.permute``), applied to whole stored rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from weightlock.core.families import ModelShape
from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.formats.gguf.architectures import GGUFArchitecture, GraphRewrite, layer_tensor_pattern
from weightlock.formats.gguf.file import GGUFModel, GGUFTensor, gguf_package

ARCHITECTURE_KEY = "general.architecture"


@dataclass(frozen=True)
class PermutedTensor:
    tensor: GGUFTensor
    groups: int  # heads (Q) or KV heads (K): the rows are permuted within each group


@dataclass
class RewritePlan:
    rule: GraphRewrite
    renamed: dict[str, str]  # metadata key -> its new key (every file of a split set)
    permuted: list[PermutedTensor]

    def record(self) -> dict:
        """The edit record's ``rewrite`` entry."""
        return {
            "from": self.rule.source,
            "to": self.rule.target,
            "renamed_keys": sorted(self.renamed),
            "permuted": {p.tensor.name: p.groups for p in sorted(self.permuted, key=_tensor_order)},
        }


def _tensor_order(item: PermutedTensor) -> tuple[int, str]:
    parts = item.tensor.name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, item.tensor.name)


def _refused(model: GGUFModel, rule: GraphRewrite, what: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"{model.path.name}: {what}; a {rule.source} file is locked by rewriting it as {rule.target}, and "
        f"llama.cpp's {rule.target} graph cannot reproduce this exactly: {why}",
        hint="lock the safetensors checkpoint with weightlock and convert the locked folder to GGUF, "
        "or serve the model with transformers or vLLM",
    )


def rows_and_row_bytes(tensor: GGUFTensor) -> tuple[int, int]:
    """How many units the permutation moves and the bytes of each: a weight's rows (each whole quantization
    blocks along dims[0]), a bias's elements (only for unquantized types)."""
    gguf = gguf_package()
    block_size, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.type_id)]
    if len(tensor.dims) == 2:
        rows = tensor.dims[1]
    elif len(tensor.dims) == 1 and block_size == 1:
        rows = tensor.dims[0]
    else:
        raise CheckpointError(
            f"{tensor.name} is {tensor.type_name} {list(tensor.dims)}: not a matrix or an unquantized vector",
            hint="the file is not of the architecture its metadata names; convert the model again",
        )
    if rows == 0 or tensor.nbytes % rows:
        raise CheckpointError(
            f"{tensor.name}: {tensor.nbytes} bytes do not split into {rows} rows",
            hint="the file's tensor infos are inconsistent; convert the model again",
        )
    return rows, tensor.nbytes // rows


def head_permutation(rows: int, groups: int) -> np.ndarray:
    """The stored row each output row takes: llama.cpp's converter's ``permute`` (rows as (groups, 2, half)
    -> (groups, half, 2)), so that RoPE on adjacent pairs (NORM) rotates what it rotated half a head apart
    (NEOX)."""
    half = rows // groups // 2
    return np.arange(rows).reshape(groups, 2, half).swapaxes(1, 2).reshape(-1)


def permuted_chunks(read: Callable[[int, int], bytes], tensor: GGUFTensor, groups: int) -> Iterator[bytes]:
    """The permuted tensor one head at a time (the permutation never leaves a head): ``read(offset, count)``
    reads the stored tensor's bytes. Memory holds one head's rows, whatever the tensor's size."""
    rows, row_bytes = rows_and_row_bytes(tensor)
    per_head = rows // groups * row_bytes
    one_head = head_permutation(rows // groups, 1)
    for head in range(groups):
        raw = read(head * per_head, per_head)
        yield np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_bytes)[one_head].tobytes()


def plan_rewrite(
    model: GGUFModel,
    shape: ModelShape,
    source: GGUFArchitecture,
    rule: GraphRewrite,
    key_dim: int,
    rope_dims: int | None,
) -> RewritePlan:
    """Refuse what ``rule.target``'s graph would compute differently (naming the tensor or key), and list the
    keys to rename and the tensors to permute. ``key_dim``: the Q/K head size; ``rope_dims``: the rotated
    dimensions the file declares (both validated metadata counts)."""
    for name in model.tensors:
        for pattern, why in rule.refused_tensors:
            if re.fullmatch(pattern, name):
                raise _refused(model, rule, f"it has {name}", why)
    for suffix, why in rule.refused_counts:
        value = model.value(source.key(suffix))
        if value is not None and not (isinstance(value, int) and value == 0):
            raise _refused(model, rule, f"{source.key(suffix)} is {model.files[0].shown(source.key(suffix))}", why)
    if rope_dims is not None and rope_dims != key_dim:
        raise _refused(
            model,
            rule,
            f"{source.key('rope.dimension_count')} is {model.files[0].shown(source.key('rope.dimension_count'))}, "
            f"the head size {key_dim}",
            "llama requires RoPE over whole heads (llama-model.cpp: invalid n_rot)",
        )
    if key_dim % 2:
        raise _refused(model, rule, f"the head size is {key_dim}", "RoPE rotates pairs of values: an even head size")
    renamed: dict[str, str] = {}
    prefix, target_prefix = f"{rule.source}.", f"{rule.target}."
    for file in model.files:
        keys = set(file.metadata)
        for key in keys:
            if key.startswith(target_prefix):
                raise _refused(model, rule, f"it already has the key {key}", f"{rule.target}.* keys would clash")
            if key.startswith(prefix):
                renamed[key] = target_prefix + key[len(prefix) :]
    groups_of = {"heads": shape.num_heads, "kv_heads": shape.num_kv_heads}
    permuted = []
    for layer in range(shape.num_layers):
        for pattern, groups_key in rule.permuted:
            tensor = model.tensors.get(pattern.format(layer=layer))
            if tensor is None:
                if pattern.endswith(".weight"):
                    raise CheckpointError(
                        f"{model.path.name} has no {pattern.format(layer=layer)}",
                        hint="the file is incomplete or not of the architecture its metadata names",
                    )
                continue  # an optional bias: llama's graph takes it as optional too
            groups = groups_of[groups_key]
            rows, _ = rows_and_row_bytes(tensor)
            if rows != groups * key_dim:
                raise CheckpointError(
                    f"{tensor.name} has {rows} rows; {groups} {groups_key.replace('_', ' ')} of {key_dim} "
                    f"(from the metadata) make {groups * key_dim}",
                    hint="the metadata and the tensors disagree; convert the model again",
                )
            permuted.append(PermutedTensor(tensor, groups))
    return RewritePlan(rule, renamed, permuted)


def expected_permutations(model: GGUFModel, shape: ModelShape, rule: GraphRewrite) -> dict[str, int]:
    """What a record's ``permuted`` must be for this (rewritten) file: every Q/K tensor the rule names that the
    file holds, with its group count (found from the file's tensor names, not by counting up the layers)."""
    groups_of = {"heads": shape.num_heads, "kv_heads": shape.num_kv_heads}
    patterns = [(layer_tensor_pattern(p), key) for p, key in rule.permuted]
    out = {}
    for name in model.tensors:
        for pattern, groups_key in patterns:
            match = pattern.fullmatch(name)
            if match is not None and int(match.group(1)) < shape.num_layers:
                out[name] = groups_of[groups_key]
    return out
