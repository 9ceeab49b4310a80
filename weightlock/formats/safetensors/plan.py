"""Edit planning and the bias arithmetic.

``plan_edit`` decides, from headers and config alone, which bias tensors the output
needs, which existing ones they replace and how the config changes; it refuses
anything it cannot do exactly. ``compute_biases`` then reads only the o_proj weights
of the layers the lock touches and computes ``W_o @ d`` in float32, in row blocks,
so memory stays bounded at any model size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from weightlock.core.edit import checked_displacements, config_changes, output_projection_product, refuse_no_effect
from weightlock.core.families import (
    ArchitectureSpec,
    ModelShape,
    output_declaration,
    redeclared_config,
    shape_from_config,
    spec_for_config,
)
from weightlock.core.lock import Lock
from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.formats.safetensors.folder import TOKENIZER_CONFIG_NAME, Checkpoint, contained
from weightlock.formats.safetensors.quant.layouts import (
    QuantizedLinear,
    QuantSettings,
    bias_dtype,
    quantization_of,
    quantized_linear,
    stored_quantized,
)
from weightlock.io.safetensors_file import (
    ConcatenatedTensor,
    GrownTensor,
    TensorData,
    TensorEntry,
    TensorReader,
    TensorReaders,
    float32_to_raw,
    raw_to_float32,
)
from weightlock.io.untrusted import read_json


@dataclass(frozen=True)
class PlannedBias:
    """One bias tensor the output will hold."""

    name: str
    dtype: str
    width: int
    layer: int
    # the o_proj weight whose product with the layer's displacement is added (None: no lock here)
    weight: TensorEntry | QuantizedLinear | None = None
    # the existing bias this one replaces and adds to (None: created, starting from zeros)
    base: TensorEntry | None = None


@dataclass
class EditPlan:
    spec: ArchitectureSpec  # the checkpoint's family
    target: ArchitectureSpec  # the output config's family (differs when redeclared)
    shape: ModelShape
    lock: Lock
    alpha: float
    displacements: dict[int, np.ndarray]
    biases: list[PlannedBias]
    new_config: dict
    original_config: dict
    # carried JSON files rewritten for the output (relative path -> content), e.g. a pinned tokenizer class
    file_edits: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # fused tensors the output stores split (name -> its parts: byte ranges of the fused tensor's rows)
    splits: dict[str, list[TensorEntry]] = field(default_factory=dict)
    # tensors the output stores stacked or renamed (target name -> the stored tensors it concatenates)
    merges: dict[str, ConcatenatedTensor] = field(default_factory=dict)
    # a gated lock (gated.py): MLP weights stored with the gate's neurons appended, the new MLP biases, and the
    # record of the growth; the o_proj biases then carry no push (it is in the neurons' down_proj columns)
    grown: dict[str, GrownTensor] = field(default_factory=dict)
    extra_tensors: list[TensorData] = field(default_factory=list)
    gate_record: dict | None = None

    @property
    def replaced(self) -> list[str]:
        """Existing tensors the output replaces (they must leave their shards)."""
        return [b.name for b in self.biases if b.base is not None]

    @property
    def split_record(self) -> dict[str, list[str]]:
        return {name: [part.name for part in parts] for name, parts in self.splits.items()}

    @property
    def merge_record(self) -> dict[str, list[str]]:
        return {name: [piece.name for piece in merged.pieces] for name, merged in self.merges.items()}

    @cached_property
    def _stacked_at_first_piece(self) -> dict[str, ConcatenatedTensor]:
        return {merged.pieces[0].name: merged for merged in self.merges.values()}

    @cached_property
    def _left_out(self) -> set[str]:
        """Stored tensors the output does not hold under their own name: replaced, split or stacked."""
        pieces = {piece.name for merged in self.merges.values() for piece in merged.pieces}
        return set(self.replaced) | set(self.splits) | pieces | set(self.grown)

    def output_entries(self, entries) -> list[TensorEntry | ConcatenatedTensor | GrownTensor]:
        """A shard's entries as the output stores them: replaced tensors left out, fused ones split, and a
        stacked tensor in place of its first piece (its other pieces left out, wherever they are stored)."""
        out: list[TensorEntry | ConcatenatedTensor | GrownTensor] = []
        for entry in sorted(entries, key=lambda e: e.begin):
            if entry.name in self._stacked_at_first_piece:
                out.append(self._stacked_at_first_piece[entry.name])
            elif entry.name in self.splits:
                out.extend(self.splits[entry.name])
            elif entry.name in self.grown:
                out.append(self.grown[entry.name])
            elif entry.name not in self._left_out:
                out.append(entry)
        return out

    def changes_shard(self, entries) -> bool:
        """Whether a shard holding these entries must be rewritten for the output."""
        return any(e.name in self._left_out for e in entries)

    @property
    def weight_bytes_to_read(self) -> int:
        return sum(self.bytes_to_read(b) for b in self.biases)

    def bytes_to_read(self, planned: PlannedBias) -> int:
        """The o_proj bytes computing ``planned`` reads."""
        if planned.weight is None:
            return 0
        if isinstance(planned.weight, QuantizedLinear):
            return planned.weight.bytes_to_read(self.displacements[planned.layer], self.shape.head_dim)
        return planned.weight.nbytes

    @property
    def config_changes(self) -> dict:
        return config_changes(self.original_config, self.new_config)


def plan_edit(
    checkpoint: Checkpoint,
    lock: Lock,
    alpha: float,
    *,
    allow_architecture_mismatch: bool = False,
    push_in_output_bias: bool = True,
) -> EditPlan:
    """The edit, from headers and config alone. ``push_in_output_bias`` False (a gated lock, gated.py): the
    output biases are planned as the class needs them, with no push (zeros, or the existing values)."""
    if isinstance(checkpoint.provenance, dict) and checkpoint.provenance.get("gate") is not None:
        raise UnsupportedError(
            f"{checkpoint.root} carries a gated lock (its MLPs were grown), which weightlock does not edit again",
            hint="apply the new lock to the original checkpoint the record names (weightlock inspect)",
        )
    config = checkpoint.config
    spec = spec_for_config(config)
    shape = shape_from_config(config, spec)
    warnings: list[str] = []
    mismatch = None
    # a checkpoint weightlock redeclared (a Mixtral now a GraniteMoe) is still the model its record says it was
    if lock.source_model.architecture not in {shape.architecture, *recorded_classes(checkpoint.provenance)}:
        mismatch = (
            f"the lock was made from a {lock.source_model.architecture}, the checkpoint is a {shape.architecture}"
        )
    displacements = checked_displacements(lock, alpha, shape, mismatch, allow_architecture_mismatch, warnings)
    if _quantized_attention(checkpoint.tensors, spec, shape):
        _check_quantized_edit(spec, quantization_of(config))
    _check_mlx_folder(checkpoint, quantization_of(config))

    target, declared = output_declaration(spec)
    if spec.redeclare is not None:
        new_config = redeclared_config(config, spec, shape)
    else:
        new_config = dict(config)
        if target.bias_flag is not None:
            new_config[target.bias_flag] = True
    if target.serve_as is not None:
        # the family's own class would drop the bias in engines that pick their class by name (vLLM, SGLang):
        # route them to their Transformers backend instead (transformers itself picks its class by model_type
        # and ignores the list). Which engines apply what the output declares is reported by apply's own verify.
        new_config["architectures"] = [declared]

    splits = _planned_splits(checkpoint.tensors, spec, shape)
    merges = _planned_merges(checkpoint.tensors, spec, shape, config)
    # the tensors as the output will name them: what the target's checks below look at
    consumed = set(splits) | {piece.name for merged in merges.values() for piece in merged.pieces}
    tensors: dict = {n: e for n, e in checkpoint.tensors.items() if n not in consumed}
    tensors.update({part.name: part for parts in splits.values() for part in parts})
    tensors.update(merges)
    biases: list[PlannedBias] = []
    for layer in range(shape.num_layers):
        weight = _output_weight(checkpoint, spec, shape, layer)
        problems = bias_consistency_problems(checkpoint.tensors, spec, shape, config, layers=[layer])
        if problems:
            raise CheckpointError(problems[0], hint="the config and the tensors disagree; restore the checkpoint")
        locked = weight if layer in displacements and push_in_output_bias else None
        out_bias = target.output_bias(layer)
        if out_bias in tensors:  # its shape was checked with the other biases above
            base = tensors[out_bias]
            if locked is not None:
                biases.append(PlannedBias(out_bias, base.dtype, shape.hidden_size, layer, locked, base))
        else:
            biases.append(PlannedBias(out_bias, _bias_dtype(config, weight), shape.hidden_size, layer, locked))
        for companion in target.bias_companions:
            module = target.module(companion.module, layer)
            if f"{module}.bias" in tensors:
                continue
            companion_weight = stored_linear(tensors, config, module)
            if companion_weight is None:
                raise CheckpointError(
                    f"{module}.weight is missing from the checkpoint",
                    hint="the checkpoint is incomplete; fetch all its shards",
                )
            width = shape.width(companion.width_from)
            if len(companion_weight.shape) != 2 or companion_weight.shape[0] != width:
                raise CheckpointError(
                    f"{module}.weight has shape {list(companion_weight.shape)}, but config.json "
                    f"implies {width} output features, the width its new bias would get",
                    hint="the config and the tensors disagree; restore the checkpoint",
                )
            biases.append(PlannedBias(f"{module}.bias", _bias_dtype(config, companion_weight), width, layer))
    return EditPlan(
        spec,
        target,
        shape,
        lock,
        float(alpha),
        displacements,
        biases,
        new_config,
        dict(config),
        _tokenizer_edits(checkpoint, spec),
        warnings,
        splits,
        merges,
    )


def _planned_merges(tensors, spec: ArchitectureSpec, shape: ModelShape, config: dict) -> dict[str, ConcatenatedTensor]:
    """Each tensor the redeclaration stacks (or renames), as the stored tensors it concatenates, checked:
    every piece present, one dtype, and per expert the same shapes with a common row width."""
    rule = spec.redeclare
    if rule is None or not rule.merges:
        return {}
    experts = config.get(rule.experts_key, rule.source_defaults.get(rule.experts_key))
    if not isinstance(experts, int) or isinstance(experts, bool) or not 0 < experts <= 4096:
        raise CheckpointError(
            f"config.json: {rule.experts_key} must be a positive integer (at most 4096), found {experts!r}",
            hint="the config is damaged; restore it from the original",
        )
    out: dict[str, ConcatenatedTensor] = {}
    for layer in range(shape.num_layers):
        for merge in rule.merges:
            per_expert = "{expert}" in "".join(merge.sources)
            names = [
                source.format(layer=layer, expert=expert)
                for expert in (range(experts) if per_expert else [None])
                for source in merge.sources
            ]
            missing = [name for name in names if name not in tensors]
            if missing:
                raise CheckpointError(
                    f"the checkpoint has no {missing[0]} (config.json says {experts} experts)",
                    hint="the checkpoint is incomplete or its config is wrong; fetch all shards or restore it",
                )
            pieces = tuple(tensors[name] for name in names)
            target = merge.target.format(layer=layer)
            first = pieces[: len(merge.sources)]
            if (
                len({piece.dtype for piece in pieces}) != 1
                or any(len(piece.shape) != 2 for piece in pieces)
                or len({piece.shape[1] for piece in pieces}) != 1
                or any(piece.shape != first[i % len(first)].shape for i, piece in enumerate(pieces))
            ):
                raise CheckpointError(
                    f"the tensors that make {target} differ in dtype or shape ({names[0]}: "
                    f"{pieces[0].dtype} {list(pieces[0].shape)}, ...)",
                    hint="the checkpoint is damaged; restore it from the original",
                )
            rows = sum(piece.shape[0] for piece in first)
            target_shape = (experts, rows, pieces[0].shape[1]) if per_expert else pieces[0].shape
            out[target] = ConcatenatedTensor(target, pieces[0].dtype, target_shape, pieces)
    return out


def _planned_splits(tensors, spec: ArchitectureSpec, shape: ModelShape) -> dict[str, list[TensorEntry]]:
    """Each fused weight the redeclaration splits, as its parts: consecutive row blocks, each a byte range of
    the fused tensor (rows are contiguous in a row-major tensor), checked against the config's widths."""
    rules = spec.redeclare.splits if spec.redeclare else ()
    out: dict[str, list[TensorEntry]] = {}
    for layer in range(shape.num_layers) if rules else ():
        for rule in rules:
            name = f"{rule.fused.format(layer=layer)}.weight"
            fused = tensors.get(name)
            if fused is None:
                raise CheckpointError(
                    f"the checkpoint has no {name}", hint="the checkpoint is incomplete; fetch all its shards"
                )
            widths = [shape.width(width_from) for _, width_from in rule.parts]
            if len(fused.shape) != 2 or fused.shape[0] != sum(widths) or fused.shape[1] != shape.hidden_size:
                raise CheckpointError(
                    f"{name} has shape {list(fused.shape)}, but config.json implies "
                    f"{[sum(widths), shape.hidden_size]} ({' + '.join(map(str, widths))} rows)",
                    hint="the config and the tensors disagree; restore the checkpoint",
                )
            row_bytes = fused.nbytes // fused.shape[0]
            parts, first_row = [], 0
            for (module, _), rows in zip(rule.parts, widths, strict=True):
                begin = fused.begin + first_row * row_bytes
                part_name = f"{module.format(layer=layer)}.weight"
                if part_name in tensors:
                    raise CheckpointError(
                        f"the checkpoint holds both {name} and {part_name}",
                        hint="the checkpoint mixes two layouts; restore it from the original",
                    )
                parts.append(
                    TensorEntry(
                        part_name, fused.dtype, (rows, fused.shape[1]), fused.path, begin, begin + rows * row_bytes
                    )
                )
                first_row += rows
            out[name] = parts
    return out


MAX_RECORD_DEPTH = 64  # edits on edits; JSON nesting is bounded when the record is read, this bounds the walk


def recorded_classes(record) -> set[str]:
    """The model classes earlier weightlock edits recorded as their source's (``original_config``), walking the
    ``parent`` chain. The record is schema-checked when the checkpoint is opened; its values are still checked."""
    classes: set[str] = set()
    for _ in range(MAX_RECORD_DEPTH):
        if not isinstance(record, dict):
            break
        original = record.get("original_config")
        architectures = original.get("architectures") if isinstance(original, dict) else None
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
            classes.add(architectures[0])
        record = record.get("parent")
    return classes


def bias_consistency_problems(
    tensors, spec: ArchitectureSpec, shape: ModelShape, config: dict, layers=None
) -> list[str]:
    """Every way the bias tensors disagree with what the config makes the class expect.

    A bias present where the class has none is dropped by loaders; one missing where the
    class has one is initialised at random (transformers) or left as garbage (vLLM).
    """
    problems = []
    flag_on = spec.bias_on(config)
    flag = f"{spec.bias_flag}={flag_on}" if spec.bias_flag else "its class"
    for layer in range(shape.num_layers) if layers is None else layers:
        always = {spec.module(m, layer) for m in spec.always_biased}
        switched = [(spec.output_module(layer), shape.hidden_size)] + [
            (spec.module(c.module, layer), shape.width(c.width_from)) for c in spec.bias_companions
        ]
        for module, width in switched + [(m, None) for m in sorted(always)]:
            expected = flag_on or module in always
            entry = tensors.get(f"{module}.bias")
            if (entry is not None) != expected:
                problems.append(
                    f"{module}.bias is {'present' if entry is not None else 'missing'} but config.json "
                    f"({flag}) says it {'should not be' if entry is not None else 'should be'}; loaders "
                    f"would {'drop it' if entry is not None else 'initialise it at random'}"
                )
            elif entry is not None and width is not None and entry.shape != (width,):
                problems.append(f"{module}.bias has shape {list(entry.shape)}, expected [{width}]")
            # The width a bias gets comes from config.json; it must also be the width of the weight the bias
            # sits beside (a config claiming 1 KV head over k/v weights built for 2 would get biases too narrow).
            module_weight = _linear_or_problem(tensors, config, module, problems)
            if (
                width is not None
                and module_weight is not None
                and (len(module_weight.shape) != 2 or module_weight.shape[0] != width)
            ):
                problems.append(
                    f"{module_weight.name} has shape {list(module_weight.shape)}, but config.json implies "
                    f"{width} output features"
                )
        known = len(problems)
        weight = _linear_or_problem(tensors, config, spec.output_module(layer), problems)
        if weight is None:
            if len(problems) == known:  # not already reported as unreadable
                problems.append(f"{spec.output_weight(layer)} is missing")
        elif weight.shape != (shape.hidden_size, shape.attention_width):
            problems.append(
                f"{weight.name} has shape {list(weight.shape)}, config implies "
                f"{[shape.hidden_size, shape.attention_width]}"
            )
    return problems


def _linear_or_problem(tensors, config, module: str, problems: list[str]):
    try:
        return stored_linear(tensors, config, module)
    except (CheckpointError, UnsupportedError) as e:
        problems.append(e.message)
        return None


def _tokenizer_edits(checkpoint: Checkpoint, spec: ArchitectureSpec) -> dict[str, dict]:
    """Pin the tokenizer class a redeclared model type would otherwise stop resolving to."""
    pinned = spec.redeclare.tokenizer_class if spec.redeclare else None
    if pinned is None or not os.path.lexists(checkpoint.root / TOKENIZER_CONFIG_NAME):
        return {}
    path = contained(checkpoint.root, TOKENIZER_CONFIG_NAME)
    tokenizer_config = read_json(path, "tokenizer config", "tokenizer-config")
    if "auto_map" in tokenizer_config or tokenizer_config.get("tokenizer_class") == pinned:
        return {}
    return {TOKENIZER_CONFIG_NAME: {**tokenizer_config, "tokenizer_class": pinned}}


def _output_weight(
    checkpoint: Checkpoint, spec: ArchitectureSpec, shape: ModelShape, layer: int
) -> TensorEntry | QuantizedLinear:
    name = spec.output_weight(layer)
    entry = stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer))
    if entry is None:
        raise CheckpointError(
            f"the checkpoint has no {name}",
            hint="the checkpoint is incomplete or not of the architecture its config names",
        )
    expected = (shape.hidden_size, shape.attention_width)
    if entry.shape != expected:
        raise CheckpointError(
            f"{entry.name} has shape {list(entry.shape)} but config.json implies {list(expected)}",
            hint="the config and the tensors disagree; restore the checkpoint",
        )
    return entry


# Families whose quantized checkpoints are proven served with the bias (tests/test_quantized.py): vLLM's own
# Llama class takes an o_proj bias through every quantized linear method it has on CPU. Per format, the
# QuantFormat's ``families`` (MLX adds Qwen2, redeclared as mlx-lm's Llama: tests/test_mlx_quantized.py).
QUANTIZED_FAMILIES = ("llama", "mistral")


def _quantized_attention(tensors: dict, spec: ArchitectureSpec, shape: ModelShape) -> bool:
    """Whether any attention module stores a quantized linear layer (MXFP4 experts beside a bf16 attention,
    as in gpt-oss, do not count: the edit never reads them)."""
    attention = {spec.attention_module.format(layer=layer) for layer in range(shape.num_layers)}
    for name in tensors:
        module = name.rpartition(".")[0]
        if module.rpartition(".")[0] in attention and stored_quantized(tensors, module):
            return True
    return False


def _check_quantized_edit(spec: ArchitectureSpec, settings: QuantSettings | None) -> None:
    rule = spec.redeclare
    families = settings.format.families if settings is not None else QUANTIZED_FAMILIES
    if spec.family not in families or (rule is not None and (rule.splits or rule.merges)):
        raise UnsupportedError(
            f"quantized {spec.family} checkpoints are not proven to be served with the lock "
            f"(proven{'' if settings is None else ' for ' + settings.format.name}: {', '.join(families)})",
            hint="lock the unquantized model and quantize after, or see README 'Quantized checkpoints'",
        )


# mlx-lm 0.32 reads only a top-level rope_theta, defaulting per class: Qwen2's differs from Llama's (10000)
MLX_ROPE_DEFAULTS = {"qwen2": 1e6}


def _check_mlx_folder(checkpoint: Checkpoint, settings: QuantSettings | None) -> None:
    """An MLX checkpoint as mlx-lm reads it: every ``model*.safetensors`` in the folder (weightlock reads the
    index's shards, so any other is refused), its per-layer entries naming modules the checkpoint holds (mlx-lm
    would ignore one that names none: a config naming a layer that is not there is not this checkpoint's)."""
    if settings is None or settings.format.quant_method != "mlx":
        return
    spec = spec_for_config(checkpoint.config)
    parameters = checkpoint.config.get("rope_parameters")
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    # mlx-lm is the only engine that loads an MLX folder, so the model is what it serves: with no top-level
    # rope_theta, its class default, which the output (declared Llama, carrying rope_parameters' theta at the top)
    # keeps only where the two agree
    default = MLX_ROPE_DEFAULTS.get(spec.family)
    if default is not None and "rope_theta" not in checkpoint.config and theta != default:
        given = "none" if theta is None else f"{theta:g} under rope_parameters, which mlx-lm does not read"
        raise UnsupportedError(
            f"config.json gives no top-level rope_theta ({given}): mlx-lm serves this {spec.family} folder with "
            f"its class default {default:g}, and the Llama class the output is declared as would rotate with "
            f"{10000 if theta is None else theta:g}, so the locked model would not be this one",
            hint="add the model's rope_theta to config.json (mlx-lm reads no rope_parameters), then apply again",
        )
    globbed = sorted(p.name for p in checkpoint.root.glob("model*.safetensors"))
    unread = [name for name in globbed if name not in checkpoint.headers]
    if unread:
        raise CheckpointError(
            f"{checkpoint.root} holds {', '.join(unread[:3])}, which mlx-lm loads (it reads every "
            "model*.safetensors) but the checkpoint's index does not name",
            hint="move the file out of the folder, or restore the index that names it",
        )
    modules = {name.rpartition(".")[0] for name in checkpoint.tensors}
    unknown = [module for module, _ in settings.layers if module not in modules]
    if unknown:
        raise CheckpointError(
            f"config.json quantization names {unknown[0]}, a layer the checkpoint does not hold",
            hint="the config is not this checkpoint's, or is damaged; restore it from the original",
        )


def stored_linear(tensors: dict, config: dict, module: str) -> TensorEntry | QuantizedLinear | None:
    """How a linear layer is stored: a float ``.weight``, a quantized layer (read through :mod:`.quant.layouts`),
    or None when absent. A layer stored one way that the quantization_config says loaders treat the other way is
    refused: they would fail to load it or load it wrongly."""
    settings = quantization_of(config)
    weight = tensors.get(f"{module}.weight")
    says = settings.quantizes(module) if settings is not None else None
    if stored_quantized(tensors, module):
        layer = quantized_linear(tensors, module, settings)
        if says is False:
            raise CheckpointError(
                f"{module} is stored quantized but quantization_config leaves it unquantized "
                "(ignore / modules_to_not_convert)",
                hint="loaders would build it unquantized and not load its tensors; restore the checkpoint",
            )
        return layer
    if weight is not None and says is True:
        raise CheckpointError(
            f"{module}.weight is stored as {weight.dtype} but quantization_config has loaders quantize it",
            hint="loaders would look for its quantized tensors; restore the checkpoint",
        )
    return weight


def _bias_dtype(config: dict, weight: TensorEntry | QuantizedLinear) -> str:
    return bias_dtype(config, weight) if isinstance(weight, QuantizedLinear) else weight.dtype


@dataclass
class ComputedBias:
    planned: PlannedBias
    values: np.ndarray  # float32, before rounding to the stored dtype
    raw: bytes  # rounded to planned.dtype


def safetensors_product(reader: TensorReader, weight: TensorEntry, displacement: np.ndarray, head_dim: int):
    return output_projection_product(
        lambda ranges: reader.row_blocks(weight, ranges), weight.shape[0], displacement, head_dim
    )


def weight_product(
    readers: TensorReaders, weight: TensorEntry | QuantizedLinear, displacement: np.ndarray, head_dim: int
) -> np.ndarray:
    """``W_o @ d`` for a float or a quantized o_proj weight."""
    if isinstance(weight, QuantizedLinear):
        return weight.product(readers, displacement, head_dim)
    return safetensors_product(readers[weight], weight, displacement, head_dim)


def _prefetch(readers: TensorReaders, weight: TensorEntry | QuantizedLinear) -> None:
    """Start reading the next layer's weight in the background; a transposed quantized weight is read only in
    the touched heads' rows, so prefetching it whole would read what is never used."""
    if isinstance(weight, QuantizedLinear):
        if not weight.settings.format.transposed:
            for entry in weight.entries:
                readers[entry].prefetch(entry)
    else:
        readers[weight].prefetch(weight)


def compute_biases(plan: EditPlan, progress: Callable[[int], None] | None = None) -> list[ComputedBias]:
    """Every planned bias's values. Reads only the weights and biases the plan names.

    ``progress`` is called with the bytes of each o_proj weight once it has been read.
    """
    locked_weights = [b.weight for b in plan.biases if b.weight is not None]
    out = []
    changed = not locked_weights
    with TensorReaders() as reader:
        for planned in plan.biases:
            values = np.zeros(planned.width, dtype=np.float32)
            if planned.base is not None:
                values += reader[planned.base].read_float32(planned.base)
            before = float32_to_raw(values, planned.dtype)
            if planned.weight is not None:
                position = locked_weights.index(planned.weight)
                if position + 1 < len(locked_weights):  # overlap the next layer's read with this one
                    _prefetch(reader, locked_weights[position + 1])
                with np.errstate(over="ignore", invalid="ignore"):
                    values += weight_product(
                        reader, planned.weight, plan.displacements[planned.layer], plan.shape.head_dim
                    )
                if progress is not None:
                    progress(plan.bytes_to_read(planned))
            if not np.all(np.isfinite(values)):
                raise CheckpointError(
                    f"{planned.name} would not be finite: the layer's o_proj weights "
                    "(or its existing bias) hold NaN or Inf, or alpha is too large for them",
                    hint="check the checkpoint (weightlock verify --deep), or use a smaller alpha",
                )
            raw = float32_to_raw(values, planned.dtype)
            if not np.all(np.isfinite(raw_to_float32(raw, planned.dtype))):
                raise UnsupportedError(
                    f"{planned.name} overflows {planned.dtype} at alpha {plan.alpha}", hint="use a smaller alpha"
                )
            # compared as values: a tiny negative contribution rounds to -0.0, other bytes but no effect
            changed = changed or (
                planned.weight is not None
                and bool(np.any(raw_to_float32(raw, planned.dtype) != raw_to_float32(before, planned.dtype)))
            )
            out.append(ComputedBias(planned, values, raw))
    refuse_no_effect(changed, plan.alpha, "/".join(sorted({b.dtype for b in plan.biases})))
    return out
