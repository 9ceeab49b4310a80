"""Quantized o_proj weights: which formats weightlock reads, how each stores a linear layer, and reading
the columns of the heads a lock touches back as float32.

The edit never quantizes anything: the bias is written unquantized (quantized linear layers in vLLM and
transformers take a float bias), so only reading ``W_o`` changes. Formats are data (``QUANT_FORMATS``):
tensor names, packing, and which loaders are proven (tests/test_quantized.py) to add a bias on such a layer.
``quantization_of`` reads a config's ``quantization_config`` and refuses, with the reason, every variant no
loader here can be shown to serve with the bias.

MLX (mlx-lm's own quantized folders) differs from the others: its settings are config.json ``quantization``
(mlx-lm writes the same object again as ``quantization_config``, with no ``quant_method``), and may be given
per layer; a layer the config does not name is read from its stored shapes, as mlx-lm's loader does
(``infer_quant_config``: group size = inputs / scale columns, bits = packed words * 32 / inputs, the inputs
taken from the model's shape). ``QuantSettings.for_module`` resolves a layer's settings that way.

The dequantizers themselves are in weightlock.formats.safetensors.quant.dequantize.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

import numpy as np

from weightlock.errors import CheckpointError, UnsupportedError
from weightlock.formats.safetensors.quant.dequantize import (
    bytes_read_by_product,
    fp8_scale_grid,
    layer_error,
    quantized_product,
)
from weightlock.io.safetensors_file import FLOAT_DTYPES, TensorEntry, TensorReaders
from weightlock.io.untrusted import BoundedMatcher

CONFIG_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
MAX_PATTERNS = 4096  # ignore / modules_to_not_convert entries read from a config
MAX_PATTERN_CHARS = 1024


@dataclass(frozen=True)
class QuantFormat:
    """How one quantization format stores a linear layer ``module``: ``module.<suffix>`` tensors."""

    name: str
    quant_method: str  # quantization_config.quant_method
    marker: str  # the suffix whose presence says a module is stored this way
    tensors: tuple[str, ...]  # suffixes every such module stores (marker first)
    optional: tuple[str, ...]  # suffixes it may store
    packing: str  # what the bytes are, for inspect and the README
    # loaders shown (tests/test_quantized.py) to load such a layer with its bias and add it
    bias_honoured_by: tuple[str, ...]
    # loaders that cannot be shown here, and why (verify reports these)
    unproven: dict[str, str] = field(default_factory=dict)
    # W stored transposed ([in, out]): a head's columns are contiguous rows, read alone (nothing to prefetch)
    transposed: bool = False
    # the families whose quantized checkpoints in this format are proven served with the lock
    families: tuple[str, ...] = ("llama", "mistral")
    # the engines (serving-table names) that load folders of this format at all; None: any engine that loads
    # the family (the others refuse such a folder at load, for the reasons in ``unproven`` where given)
    loaded_only_by: tuple[str, ...] | None = None


QUANT_FORMATS = {
    "awq": QuantFormat(
        "awq",
        "awq",
        "qweight",
        ("qweight", "qzeros", "scales"),
        (),
        "int4 GEMM: qweight [in, out/8] int32 (8 nibbles in AWQ order 0,2,4,6,1,3,5,7), qzeros [groups, out/8], "
        "scales [groups, out]; w = (q - z) * s",
        ("vllm",),
        {"transformers": "transformers loads AWQ only through gptqmodel, a compiled package not installed here"},
        transposed=True,
    ),
    "gptq": QuantFormat(
        "gptq",
        "gptq",
        "qweight",
        ("qweight", "qzeros", "scales"),
        ("g_idx",),
        "int4: qweight [in/8, out] int32 (8 nibbles along the input), qzeros [groups, out/8] (v1: stored z - 1), "
        "scales [groups, out], g_idx [in] (act-order); symmetric: w = (q - 8) * s",
        ("vllm",),
        {"transformers": "transformers loads GPTQ only through gptqmodel, a compiled package not installed here"},
        transposed=True,
    ),
    "compressed-tensors/pack-quantized": QuantFormat(
        "compressed-tensors/pack-quantized",
        "compressed-tensors",
        "weight_packed",
        ("weight_packed", "weight_scale", "weight_shape"),
        (),
        "int4: weight_packed [out, in/8] int32 (8 nibbles along the input, offset by 8), weight_scale "
        "[out, groups], weight_shape; symmetric: w = (q - 8) * s",
        ("vllm", "transformers"),  # transformers through the compressed-tensors library
    ),
    "compressed-tensors/float-quantized": QuantFormat(
        "compressed-tensors/float-quantized",
        "compressed-tensors",
        "weight_scale",
        ("weight", "weight_scale"),
        (),
        "FP8 e4m3 weight [out, in] with weight_scale per tensor [1], per channel [out, 1] or per block "
        "[out/bm, in/bn]; w = fp8(q) * s",
        ("transformers",),  # through the compressed-tensors library
        {"vllm": "vLLM's CPU build runs FP8 weights only with AMX (Sapphire Rapids), which this machine lacks"},
    ),
    "fp8": QuantFormat(
        "fp8",
        "fp8",
        "weight_scale_inv",
        ("weight", "weight_scale_inv"),
        (),
        "FP8 e4m3 weight [out, in] with weight_scale_inv per tensor [], per channel [out, 1] or per "
        "[block_m, block_n] block; w = fp8(q) * s",
        ("transformers",),
        {"vllm": "vLLM's CPU build runs FP8 weights only with AMX (Sapphire Rapids), which this machine lacks"},
    ),
    "mlx": QuantFormat(
        "mlx",
        "mlx",
        "scales",
        ("weight", "scales", "biases"),
        (),
        "MLX affine: weight [out, in*bits/32] uint32 (each row one bit stream, codes least significant bit "
        "first), scales and biases [out, in/group] in the model dtype; w = q * scale + bias",
        ("mlx-lm",),
        {
            "transformers": "transformers cannot load MLX-quantized folders: it reads quantization_config's "
            "quant_method, which mlx-lm's config.json (quantization, and its copy as quantization_config) lacks",
            "vllm": "vLLM cannot load MLX-quantized folders: its ModelConfig reads quantization_config's "
            "quant_method, which they lack (KeyError)",
            "ollama-create": "ollama create cannot import MLX-quantized folders: its safetensors reader knows no "
            "packed uint32 weights ('unknown data type: U32', convert/reader_safetensors.go:256 at v0.30.0)",
        },
        families=("llama", "mistral", "qwen2"),
        loaded_only_by=("mlx-lm", "mlx-lm-distributed"),
    ),
}
# What MLX (mlx 0.32) quantizes in its affine mode, and its other modes (read by mlx-lm, not by weightlock)
MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_AFFINE = "affine"
MLX_OTHER_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}  # mode -> mlx's default (group, bits)
MLX_LAYER_KEYS = ("group_size", "bits", "mode")


@dataclass(frozen=True)
class QuantSettings:
    """A checked ``quantization_config``: the format and the numbers its dequantizer needs."""

    format: QuantFormat
    bits: int = 4
    group_size: int = -1  # -1: one group over the whole input
    symmetric: bool = True
    act_order: bool = False  # GPTQ desc_act: groups follow g_idx
    block: tuple[int, int] | None = None  # FP8 weight_block_size / block_structure
    strategy: str | None = None  # compressed-tensors FP8 scales: "tensor", "channel" or "block"
    not_converted: tuple[str, ...] = ()  # substrings (AWQ, FP8) of module names left unquantized
    ignore: tuple[str, ...] = ()  # compressed-tensors: exact names or "re:" patterns
    targets: tuple[str, ...] = ("Linear",)  # compressed-tensors
    # the "re:" patterns above are matched within a time budget for this config (weightlock.io.untrusted)
    matcher: BoundedMatcher = field(
        default_factory=lambda: BoundedMatcher(_PATTERNS_WHERE, hint=_PATTERNS_HINT), compare=False, repr=False
    )
    mode: str | None = None  # MLX: "affine"
    # MLX per-layer entries of config.json quantization: module -> its settings, or None where it is false
    layers: tuple[tuple[str, QuantSettings | None], ...] = ()
    # MLX: the model's input width of each attention linear layer (mlx-lm infers a layer's settings from it)
    inputs: tuple[tuple[str, int], ...] = ()

    def quantizes(self, module: str) -> bool | None:
        """Whether a loader treats ``module`` (a linear layer) as quantized by this config; None: the config
        does not say (GPTQ: vLLM decides by the stored dtypes; MLX: mlx-lm by a stored ``scales``)."""
        if self.format.quant_method == "mlx":
            layers = dict(self.layers)
            return None if module not in layers else layers[module] is not None
        if self.format.quant_method in ("awq", "fp8"):
            return not any(entry in module for entry in self.not_converted)
        if self.format.quant_method == "compressed-tensors":
            return _matches_any(self.matcher, module, self.targets) and not _matches_any(
                self.matcher, module, self.ignore
            )
        return None

    def for_module(self, module: str, tensors: dict) -> QuantSettings:
        """The settings ``module`` is read with: the config's for it; for MLX, as mlx-lm's loader reads it."""
        return _mlx_module_settings(self, module, tensors) if self.format.quant_method == "mlx" else self

    def describe(self) -> str:
        if self.format.quant_method == "mlx":
            return f"mlx {self.mode} int{self.bits}, group {self.group_size}"
        if self.bits == 8:
            if self.block:
                scales = f"{self.block[0]}x{self.block[1]} blocks"
            else:
                scales = f"per {self.strategy}" if self.strategy else "per tensor or channel"
            return f"{self.format.name} e4m3, scales {scales}"
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        sym = "symmetric" if self.symmetric else "with zero points"
        return f"{self.format.name} int{self.bits}, {group}, {sym}" + (", act-order" if self.act_order else "")


def _matches_any(matcher: BoundedMatcher, module: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern == "Linear":
            return True
        if pattern.startswith("re:"):
            if matcher.match(pattern[3:], module):
                return True
        elif pattern == module:
            return True
    return False


_PATTERNS_WHERE = "config.json quantization_config"
_PATTERNS_HINT = (
    "weightlock matches 're:' patterns only in shapes whose matching time is bounded (no quantifier or "
    "alternatives inside a repeated group, no backreference); write the pattern without them, or list the "
    "module names; otherwise config.json is damaged: restore it from the original"
)


def _refuse(what: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"quantization_config {what}: {why}",
        hint="weightlock locks AWQ (GEMM, int4), GPTQ (int4, symmetric, no act-order), compressed-tensors "
        "(int4 pack-quantized and FP8 float-quantized, weight-only) and FP8 (e4m3) checkpoints; lock the "
        "unquantized model and quantize after, or see README 'Quantized checkpoints'",
    )


def _int(config: dict, keys: tuple[str, ...], default=None) -> int:
    for key in keys:
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(
                    f"quantization_config.{key} is {value!r}, not an integer",
                    hint="config.json is damaged; restore it from the original",
                )
            return value
    if default is None:
        raise CheckpointError(
            f"quantization_config has no {keys[0]}", hint="config.json is damaged; restore it from the original"
        )
    return default


def _bool(config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(
            f"quantization_config.{key} is {value!r}, not true or false",
            hint="config.json is damaged; restore it from the original",
        )
    return value


def _names(config: dict, key: str) -> tuple[str, ...]:
    value = config.get(key)
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_PATTERN_CHARS for v in value)
    ):
        raise CheckpointError(
            f"quantization_config.{key} must be a list of at most {MAX_PATTERNS} module names",
            hint="config.json is damaged; restore it from the original",
        )
    for v in value:
        if v.startswith("re:"):  # refused here, before any work, if invalid or unbounded
            BoundedMatcher(f"{_PATTERNS_WHERE}.{key}", hint=_PATTERNS_HINT).compiled(v[3:])
    return tuple(value)


def _group_size(value: int, what: str) -> int:
    if value == -1 or 2 <= value <= 1 << 20:
        return value
    raise CheckpointError(
        f"quantization_config {what} group_size {value} is neither -1 nor a size",
        hint="config.json is damaged; restore it from the original",
    )


def quantization_of(config: dict) -> QuantSettings | None:
    """The checked quantization settings a config declares, for the formats weightlock reads; None when it
    declares none or a method weightlock does not read (its o_proj must then be stored unquantized)."""
    if config.get("quantization") is not None:  # mlx-lm reads this first, whatever quantization_config says
        return _mlx_settings(config)
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(
            "config.json quantization_config is not an object", hint="config.json is damaged; restore it"
        )
    # asked for every linear layer the edit and verify touch: parsed (and its patterns checked) once per config
    return _parsed(json.dumps(quant, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _parsed(quant_json: str) -> QuantSettings | None:
    quant = json.loads(quant_json)
    method = quant.get("quant_method")
    method = method.lower() if isinstance(method, str) else method
    if method == "awq":
        return _awq_settings(quant)
    if method == "gptq":
        return _gptq_settings(quant)
    if method == "compressed-tensors":
        return _compressed_tensors_settings(quant)
    if method == "fp8":
        return _fp8_settings(quant)
    return None


# ---------------------------------------------------------------------------------------
# MLX: config.json quantization, read as mlx-lm 0.32's load_model reads it


def _mlx_damaged(what: str) -> CheckpointError:
    return CheckpointError(
        f"config.json quantization {what}",
        hint="mlx-lm writes it as {group_size, bits, mode, <module path>: {...} or false}; config.json is "
        "damaged: restore it from the original",
    )


def _mlx_refuse(what: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"config.json quantization {what}: {why}",
        hint="weightlock locks MLX affine checkpoints (bits "
        + ", ".join(map(str, MLX_BITS))
        + ", groups of "
        + ", ".join(map(str, MLX_GROUP_SIZES))
        + "); lock the unquantized model and quantize after (mlx_lm.convert -q), or see README 'Quantized "
        "checkpoints'",
    )


def _mlx_settings(config: dict) -> QuantSettings:
    quant = config["quantization"]
    if not isinstance(quant, dict):
        raise _mlx_damaged(f"is {type(quant).__name__}, not an object")
    stated = config.get("quantization_config")
    if stated is not None and stated != quant:  # mlx-lm's save_config writes the two equal
        raise CheckpointError(
            "config.json quantization and quantization_config differ: mlx-lm reads the first, other loaders "
            "the second, so which quantization is meant is ambiguous",
            hint="mlx-lm's save_config writes them equal; restore config.json from the original",
        )
    if config.get("quantize_activations"):
        raise _mlx_refuse(
            "with quantize_activations",
            "where activations are quantized, a displacement added to the o_proj input is quantized with it, so "
            "no bias reproduces the lock exactly",
        )
    return _mlx_parsed(json.dumps(quant, sort_keys=True), json.dumps(_mlx_inputs(config), sort_keys=True))


def _mlx_inputs(config: dict) -> dict[str, int]:
    """The input width of each attention linear layer the edit reads (o_proj: every head side by side; the
    query, key and value projections: the hidden size), from the model's shape."""
    from weightlock.core.families import shape_from_config, spec_for_config
    from weightlock.errors import WeightlockError

    try:
        spec = spec_for_config(config)
        shape = shape_from_config(config, spec)
    except WeightlockError:
        return {}
    attention = spec.attention_module
    out = {}
    for layer in range(shape.num_layers):
        out[spec.output_module(layer)] = shape.attention_width
        for companion in spec.bias_companions:
            if companion.module.startswith(attention + "."):
                out[spec.module(companion.module, layer)] = shape.hidden_size
    return out


@functools.lru_cache(maxsize=16)
def _mlx_parsed(quant_json: str, inputs_json: str) -> QuantSettings:
    quant = json.loads(quant_json)
    top = _mlx_layer_settings(quant, "", top=True)
    layers: list[tuple[str, QuantSettings | None]] = []
    for key, value in quant.items():
        if key in MLX_LAYER_KEYS:
            continue
        if len(layers) >= MAX_PATTERNS or not 0 < len(key) <= MAX_PATTERN_CHARS:
            raise _mlx_damaged(f"holds more than {MAX_PATTERNS} layer entries, or a key of over 1024 characters")
        if value is False:
            layers.append((key, None))
        elif value is True:  # nn.quantize: the top-level settings
            layers.append((key, top))
        elif isinstance(value, dict):
            layers.append((key, _mlx_layer_settings(value, f"{key}.")))
        else:
            raise _mlx_damaged(f"entry {key!r} is {value!r}, neither a layer's settings nor true or false")
    return dataclasses.replace(top, layers=tuple(layers), inputs=tuple(sorted(json.loads(inputs_json).items())))


def _mlx_layer_settings(values: dict, where: str, top: bool = False) -> QuantSettings:
    """One set of MLX settings: the top level (group_size and bits required, as mlx-lm reads them) or a layer's
    entry (passed to to_quantized: a missing group_size or bits is the mode's default)."""
    unknown = sorted(set(values) - set(MLX_LAYER_KEYS)) if not top else []
    if unknown:
        if "quantize_input" in unknown or "global_scale" in unknown:
            raise _mlx_refuse(f"{where}{unknown[0]}", "only weight-only affine layers are read")
        raise _mlx_damaged(f"{where.rstrip('.')} holds {unknown[0]!r}, which mlx's to_quantized does not take")
    mode = values.get("mode", MLX_AFFINE)
    if mode in MLX_OTHER_MODES:
        raise _mlx_refuse(f"{where}mode {mode!r}", "only the affine mode is read")
    if mode != MLX_AFFINE:
        raise _mlx_damaged(f"{where}mode is {mode!r}, not one of mlx's modes (affine, mxfp4, nvfp4, mxfp8)")
    numbers = {}
    for key, allowed, default in (("group_size", MLX_GROUP_SIZES, 64), ("bits", MLX_BITS, 4)):
        if key not in values and top:
            raise _mlx_damaged(f"has no {key}, which mlx-lm's loader requires")
        value = values.get(key)
        if value is None and not top:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mlx_damaged(f"{where}{key} is {value!r}, not an integer")
        if value not in allowed:
            raise _mlx_damaged(f"{where}{key} is {value}, which mlx does not quantize (it takes {list(allowed)})")
        numbers[key] = value
    return QuantSettings(QUANT_FORMATS["mlx"], numbers["bits"], numbers["group_size"], symmetric=False, mode=mode)


def _mlx_module_settings(settings: QuantSettings, module: str, tensors: dict) -> QuantSettings:
    """A layer's settings as mlx-lm's loader builds the layer: its config entry, else inferred from the stored
    scales and packed weight over the model's input width; checked against that width."""
    layers, inputs = dict(settings.layers), dict(settings.inputs)
    width = inputs.get(module)
    if module in layers:
        layer = layers[module]
        if layer is None:
            raise CheckpointError(
                f"{module} is stored quantized but config.json quantization sets it false",
                hint="mlx-lm would build it unquantized and not load its tensors; restore the checkpoint",
            )
    else:
        if width is None:
            raise UnsupportedError(
                f"{module}: config.json quantization does not name it, and weightlock knows no input width to "
                "infer its settings from as mlx-lm does",
                hint="weightlock reads MLX attention layers of the families it locks quantized",
            )
        weight, scales = tensors.get(f"{module}.weight"), tensors[f"{module}.scales"]
        if weight is None or len(weight.shape) != 2 or len(scales.shape) != 2 or 0 in scales.shape:
            raise layer_error(module, "the packed weight or its scales are not 2-D")
        if scales.dtype == "U8":  # mlx-lm: uint8 scales are one of the floating-point modes
            raise _mlx_refuse(f"for {module}: uint8 scales (mxfp4, nvfp4 or mxfp8)", "only the affine mode is read")
        group, bits = width // scales.shape[1], weight.shape[1] * 32 // width
        if group not in MLX_GROUP_SIZES or bits not in MLX_BITS:
            raise layer_error(
                module, f"its stored shapes give {bits} bits in groups of {group}, which mlx does not quantize"
            )
        layer = dataclasses.replace(settings, bits=bits, group_size=group, layers=(), inputs=())
    return layer


def _awq_settings(quant: dict) -> QuantSettings:
    bits = _int(quant, ("bits", "w_bit"))
    group = _group_size(_int(quant, ("group_size", "q_group_size")), "awq")
    version = quant.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise _refuse(f"version {version!r}", "only the GEMM packing is read (GEMV and others pack differently)")
    if bits != 4:
        raise _refuse(f"bits {bits}", "vLLM's CPU build serves 4-bit AWQ only, so no other width is proven")
    if not _bool(quant, "zero_point", True):
        raise _refuse("zero_point false", "vLLM serves AWQ with zero points only")
    return QuantSettings(
        QUANT_FORMATS["awq"], bits, group, symmetric=False, not_converted=_names(quant, "modules_to_not_convert")
    )


def _gptq_settings(quant: dict) -> QuantSettings:
    bits = _int(quant, ("bits",))
    group = _group_size(_int(quant, ("group_size",)), "gptq")
    sym = _bool(quant, "sym", True)
    act_order = _bool(quant, "desc_act", False) and group != -1
    checkpoint_format = quant.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", None):
        raise _refuse(f"checkpoint_format {checkpoint_format!r}", "only the v1 'gptq' layout is read")
    if quant.get("dynamic"):
        raise _refuse("dynamic", "per-module overrides are not read")
    if bits != 4:
        raise _refuse(f"bits {bits}", "vLLM's CPU build serves 4-bit GPTQ only, so no other width is proven")
    if not sym:
        raise _refuse("sym false", "vLLM 0.32 refuses asymmetric GPTQ and transformers needs gptqmodel")
    if act_order:
        raise _refuse("desc_act true", "vLLM 0.32 refuses GPTQ act-order and transformers needs gptqmodel")
    return QuantSettings(QUANT_FORMATS["gptq"], bits, group, symmetric=True)


def _compressed_tensors_settings(quant: dict) -> QuantSettings:
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _refuse("config_groups", "exactly one quantization group is read")
    (group,) = groups.values()
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise CheckpointError(
            "quantization_config.config_groups holds a group without weights settings",
            hint="config.json is damaged; restore it from the original",
        )
    weights = group["weights"]
    form = group.get("format") or quant.get("format")
    bits = _int(weights, ("num_bits",))
    kind = weights.get("type")
    if form == "pack-quantized" and (kind, bits) == ("int", 4):
        fmt = QUANT_FORMATS["compressed-tensors/pack-quantized"]
    elif form == "float-quantized" and (kind, bits) == ("float", 8):
        fmt = QUANT_FORMATS["compressed-tensors/float-quantized"]
    else:
        raise _refuse(
            f"format {form!r} with {kind!r} {bits}-bit weights",
            "only pack-quantized int4 (proven in vLLM and transformers) and float-quantized FP8 (proven in "
            "transformers) are read",
        )
    if group.get("input_activations") is not None:
        raise _refuse(
            "input_activations",
            "only weight-only quantization is read: where activations are quantized, a displacement added to the "
            "o_proj input at run time is quantized with it, so no bias reproduces the lock exactly",
        )
    if not _bool(weights, "symmetric", True):
        raise _refuse("symmetric false", "zero points are not proven in any loader here")
    if weights.get("actorder") not in (None, False):
        raise _refuse("actorder", "activation ordering (weight_g_idx) is not read")
    strategy = weights.get("strategy")
    block = None
    if strategy == "group" and fmt.marker == "weight_packed":
        size = _group_size(_int(weights, ("group_size",)), "compressed-tensors")
    elif strategy == "channel" or (strategy == "tensor" and fmt.marker == "weight_scale"):
        size = -1
    elif strategy == "block" and fmt.marker == "weight_scale":
        size, block = -1, _block(weights.get("block_structure"), "block_structure")
    else:
        raise _refuse(f"strategy {strategy!r}", "only group or channel int4 and tensor, channel or block FP8 are read")
    return QuantSettings(
        fmt,
        bits,
        size,
        symmetric=True,
        block=block,
        strategy=strategy if fmt.marker == "weight_scale" else None,
        ignore=_names(quant, "ignore"),
        targets=_names(group, "targets") or ("Linear",),
    )


def _block(value, key: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 20 for b in value)
    ):
        raise CheckpointError(
            f"quantization_config {key} is {value!r}, not two block sizes",
            hint="config.json is damaged; restore it from the original",
        )
    return value[0], value[1]


def _fp8_settings(quant: dict) -> QuantSettings:
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(f"fmt {fmt!r}", "only e4m3 weights are read")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse("activation_scheme", "only dynamic activation scales are read")
    block = quant.get("weight_block_size")
    return QuantSettings(
        QUANT_FORMATS["fp8"],
        8,
        block=None if block is None else _block(block, "weight_block_size"),
        not_converted=_names(quant, "modules_to_not_convert"),
    )


# ---------------------------------------------------------------------------------------
# One quantized linear layer


@dataclass(frozen=True)
class QuantizedLinear:
    """A linear layer stored quantized: its logical (out, in) shape and the tensors that hold it."""

    module: str
    settings: QuantSettings
    shape: tuple[int, int]
    parts: dict[str, TensorEntry]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.settings.format.marker}"

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.parts.values())

    @property
    def dtype(self) -> str:
        return self.settings.describe()

    @property
    def entries(self) -> list[TensorEntry]:
        return list(self.parts.values())

    def product(self, readers: TensorReaders, displacement: np.ndarray, head_dim: int) -> np.ndarray:
        """``W @ displacement`` in float32, reading only the columns of the heads it touches."""

        return quantized_product(self, readers, displacement, head_dim)

    def bytes_to_read(self, displacement: np.ndarray, head_dim: int) -> int:
        """The bytes ``product`` reads: a transposed weight only the touched heads' rows (and their groups' zeros
        and scales), any other all of its tensors."""

        return bytes_read_by_product(self, displacement, head_dim)


def stored_quantized(tensors: dict, module: str) -> bool:
    """Whether ``module`` is stored in some quantized layout (any format's marker beside it)."""
    return any(f"{module}.{f.marker}" in tensors for f in QUANT_FORMATS.values()) or (
        f"{module}.weight" in tensors and tensors[f"{module}.weight"].dtype not in FLOAT_DTYPES
    )


def quantized_linear(tensors: dict, module: str, settings: QuantSettings | None) -> QuantizedLinear:
    """The quantized layer ``module`` as ``settings`` says it is stored, its tensors checked against each other."""
    if settings is None:
        found = next((f.marker for f in QUANT_FORMATS.values() if f"{module}.{f.marker}" in tensors), None)
        dtype = tensors[f"{module}.weight"].dtype if f"{module}.weight" in tensors else None
        raise UnsupportedError(
            f"{module} is stored quantized ({found or dtype}) under a quantization_config weightlock does not read",
            hint="weightlock locks AWQ, GPTQ, compressed-tensors pack-quantized and FP8 checkpoints; lock the "
            "unquantized model and quantize after",
        )
    fmt = settings.format
    parts = {}
    for suffix in fmt.tensors + fmt.optional:
        entry = tensors.get(f"{module}.{suffix}")
        if entry is None and suffix in fmt.tensors:
            raise CheckpointError(
                f"{module}.{suffix} is missing, which the {fmt.name} format stores for every quantized layer",
                hint="the checkpoint is incomplete or not in the format its quantization_config names",
            )
        if entry is not None:
            parts[suffix] = entry
    layer_settings = settings.for_module(module, tensors)
    shape = _SHAPES[fmt.name](module, layer_settings, parts)
    width = dict(settings.inputs).get(module)
    if width is not None and shape[1] != width:  # mlx-lm builds the layer at the model's width: it would not load
        raise layer_error(module, f"holds {shape[1]} inputs as {layer_settings.describe()}; the model has {width}")
    return QuantizedLinear(module, layer_settings, shape, parts)


def _expect(module: str, entry: TensorEntry, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
    if entry.dtype not in dtypes or entry.shape != shape:
        raise layer_error(
            module, f"{entry.name} is {entry.dtype} {list(entry.shape)}, expected {dtypes[0]} {list(shape)}"
        )


def _groups(module: str, settings: QuantSettings, inputs: int) -> int:
    if settings.group_size == -1:
        return 1
    if inputs % settings.group_size:
        raise layer_error(module, f"{inputs} inputs are not a whole number of groups of {settings.group_size}")
    return inputs // settings.group_size


def _awq_shape(module: str, settings: QuantSettings, parts: dict) -> tuple[int, int]:
    qweight = parts["qweight"]
    if qweight.dtype != "I32" or len(qweight.shape) != 2:
        raise layer_error(module, f"qweight is {qweight.dtype} {list(qweight.shape)}, expected a 2-D I32 tensor")
    inputs, outputs = qweight.shape[0], qweight.shape[1] * 8
    groups = _groups(module, settings, inputs)
    _expect(module, parts["qzeros"], ("I32",), (groups, outputs // 8))
    _expect(module, parts["scales"], FLOAT_DTYPES, (groups, outputs))
    return outputs, inputs


def _gptq_shape(module: str, settings: QuantSettings, parts: dict) -> tuple[int, int]:
    qweight = parts["qweight"]
    if qweight.dtype != "I32" or len(qweight.shape) != 2:
        raise layer_error(module, f"qweight is {qweight.dtype} {list(qweight.shape)}, expected a 2-D I32 tensor")
    inputs, outputs = qweight.shape[0] * 8, qweight.shape[1]
    if outputs % 8:
        raise layer_error(module, f"{outputs} outputs do not pack into qzeros")
    groups = math.ceil(inputs / settings.group_size) if settings.act_order else _groups(module, settings, inputs)
    _expect(module, parts["qzeros"], ("I32",), (groups, outputs // 8))
    _expect(module, parts["scales"], FLOAT_DTYPES, (groups, outputs))
    if "g_idx" in parts:
        _expect(module, parts["g_idx"], ("I32",), (inputs,))
    elif settings.act_order:
        raise layer_error(module, "desc_act is true but g_idx is missing")
    return outputs, inputs


def _compressed_tensors_shape(module: str, settings: QuantSettings, parts: dict) -> tuple[int, int]:
    packed = parts["weight_packed"]
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise layer_error(module, f"weight_packed is {packed.dtype} {list(packed.shape)}, expected a 2-D I32 tensor")
    outputs, inputs = packed.shape[0], packed.shape[1] * 8
    _expect(module, parts["weight_scale"], FLOAT_DTYPES, (outputs, _groups(module, settings, inputs)))
    _expect(module, parts["weight_shape"], ("I64", "I32"), (2,))
    return outputs, inputs


def _fp8_shape(module: str, settings: QuantSettings, parts: dict) -> tuple[int, int]:
    scale_name = settings.format.tensors[1]
    weight, scale = parts["weight"], parts[scale_name]
    if weight.dtype != "F8_E4M3" or len(weight.shape) != 2:
        raise layer_error(module, f"weight is {weight.dtype} {list(weight.shape)}, expected 2-D F8_E4M3")
    outputs, inputs = weight.shape
    if scale.dtype not in FLOAT_DTYPES:
        raise layer_error(module, f"{scale_name} is {scale.dtype}, expected a float")
    try:
        grid = fp8_scale_grid(scale.shape, outputs, inputs)
    except CheckpointError as e:
        raise layer_error(module, e.message) from None
    allowed = {"tensor": [(1, 1)], "channel": [(outputs, 1)]}.get(settings.strategy or "", [grid])
    if settings.block is not None:
        allowed = [(outputs // settings.block[0], inputs // settings.block[1])]
        if settings.strategy is None:  # transformers reads the grid from the scale's shape; one scale is a grid too
            allowed.append((1, 1))
        if outputs % settings.block[0] or inputs % settings.block[1]:
            raise layer_error(module, f"[{outputs}, {inputs}] is not a whole number of {list(settings.block)} blocks")
    if grid not in allowed:
        raise layer_error(module, f"{scale_name} {list(scale.shape)} does not match the {settings.describe()} scales")
    return outputs, inputs


def _mlx_shape(module: str, settings: QuantSettings, parts: dict) -> tuple[int, int]:
    weight, scales = parts["weight"], parts["scales"]
    if weight.dtype != "U32" or len(weight.shape) != 2:
        raise layer_error(module, f"weight is {weight.dtype} {list(weight.shape)}, expected a 2-D U32 tensor")
    outputs, bits = weight.shape[0], settings.bits
    if weight.shape[1] * 32 % bits:
        raise layer_error(module, f"{weight.shape[1]} packed words are not a whole number of {bits}-bit codes")
    inputs = weight.shape[1] * 32 // bits
    if scales.dtype not in FLOAT_DTYPES:
        raise layer_error(module, f"scales are {scales.dtype}, but the affine mode keeps them in the model dtype")
    groups = _groups(module, settings, inputs)
    _expect(module, scales, FLOAT_DTYPES, (outputs, groups))
    _expect(module, parts["biases"], (scales.dtype,), (outputs, groups))
    return outputs, inputs


_SHAPES = {
    "awq": _awq_shape,
    "gptq": _gptq_shape,
    "compressed-tensors/pack-quantized": _compressed_tensors_shape,
    "compressed-tensors/float-quantized": _fp8_shape,
    "fp8": _fp8_shape,
    "mlx": _mlx_shape,
}


def bias_dtype(config: dict, layer: QuantizedLinear) -> str:
    """The dtype a bias beside a quantized layer is written in: the model's activation dtype (config
    ``torch_dtype`` / ``dtype``), which both vLLM and transformers build the bias parameter in; without one,
    the dtype of the layer's float scales. MLX: the dtype of its scales, which is the dtype mlx-lm computes in
    (a float32 bias would promote the layer's output, and all that follows, to float32)."""
    if layer.settings.format.quant_method == "mlx":
        return layer.parts["scales"].dtype
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value in CONFIG_DTYPES:
            return CONFIG_DTYPES[value]
    for entry in layer.entries:
        if entry.dtype in ("F16", "BF16"):
            return entry.dtype
    return "BF16"
