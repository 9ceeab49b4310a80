"""The stock transformers loader as a check: the model class for the output's config is built on the meta device
(no weights, so it is fast at any size) and its parameter names and shapes are compared with the stored tensors,
as ``from_pretrained`` would rename, quantize and tie them. This decides whether transformers would silently drop
the biases (an unexpected tensor) or initialise some at random (a missing one)."""

from __future__ import annotations

import contextlib
import io
import re

from weightlock.core.report import FAIL, PASS, SKIP, WARN, Report
from weightlock.errors import WeightlockError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.quant.layouts import quantization_of, quantized_linear


def check_loader_names(checkpoint: Checkpoint, report: Report) -> None:
    """The transformers class check, or its verdict remembered from an identical earlier one
    (:mod:`.class_check_cache`: keyed by the config, every tensor's name, dtype and shape, and the installed
    transformers and torch; only a pass or a warning is remembered). A hit costs milliseconds; the check itself
    imports torch and transformers (seconds) and builds the class on the meta device."""
    from weightlock.engines import class_check_cache

    only = _loaded_only_by(checkpoint)
    if only is not None and "transformers" not in only.loaded_only_by:  # nothing to build: transformers refuses it
        report.add(
            "transformers_names",
            SKIP,
            f"{only.unproven.get('transformers', 'transformers does not load ' + only.name + '-quantized folders')}"
            f"; {' and '.join(only.loaded_only_by)} load them (verify --engine mlx loads it in mlx-lm)",
        )
        return
    key = class_check_cache.key_for(checkpoint)
    remembered = class_check_cache.recall(key)
    if remembered is not None:
        status, message, details = remembered
        report.add("transformers_names", status, message, details)
        return
    ran = len(report.checks)
    run_loader_check(checkpoint, report)
    for check in report.checks[ran:]:
        if check.name == "transformers_names":
            class_check_cache.remember(key, check.status, check.message, check.details, checkpoint)


def _loaded_only_by(checkpoint: Checkpoint):
    """The checkpoint's quantization format when only some engines load it (QuantFormat.loaded_only_by)."""
    try:
        settings = quantization_of(checkpoint.config)
    except WeightlockError:  # the quantization check says why
        return None
    return settings.format if settings is not None and settings.format.loaded_only_by is not None else None


def run_loader_check(checkpoint: Checkpoint, report: Report) -> None:
    """The class check itself (what :func:`check_loader_names` remembers)."""
    try:
        import torch
        import transformers
    except ImportError:
        report.add(
            "transformers_names", SKIP, "transformers is not installed; install weightlock[forge] to check loader names"
        )
        return
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(str(checkpoint.root))
        unloadable = None
        try:
            quantizer, config = _quantizer_as_loaded(config)
        except ImportError as e:
            # a format weightlock reads that transformers cannot load here (AWQ and GPTQ need gptqmodel,
            # compressed-tensors its library): the names are checked with the layers unquantized
            unloadable = _known_quantization(checkpoint)
            if unloadable is None:
                raise
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            del config.quantization_config
            quantizer = None
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
            if quantizer is not None:  # from_pretrained swaps in quantized modules before loading, so do we
                with contextlib.redirect_stderr(io.StringIO()):  # compressed-tensors draws progress bars
                    quantizer.preprocess_model(
                        model=model, dtype=torch.bfloat16, device_map=None, checkpoint_files=None, use_kernels=False
                    )
    except Exception as e:  # an unknown or custom architecture, or a broken config
        report.add(
            "transformers_names", FAIL, f"transformers cannot build a model for this config: {type(e).__name__}: {e}"
        )
        return
    finally:
        transformers.logging.set_verbosity(previous)
    params = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored, converted = _names_as_loaded(model, params, checkpoint, quantizer)
    if unloadable is not None:
        stored = _quantized_as_unquantized(stored, checkpoint, unloadable)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = _patterns(getattr(model, "_keys_to_ignore_on_load_missing", None))
    ignore_unexpected = _patterns(getattr(model, "_keys_to_ignore_on_load_unexpected", None))

    extra = set(stored) - set(params)
    unexpected = sorted(n for n in extra if not ignore_unexpected(n))
    ignored = sorted(n for n in extra if ignore_unexpected(n))
    missing = []
    for name in sorted(set(params) - set(stored)):
        partner = tied.get(name) or next((t for t, s in tied.items() if s == name), None)
        if (partner is not None and partner in stored) or ignore_missing(name):
            continue
        missing.append(name)
    wrong_shape = sorted(
        f"{n}: checkpoint {list(stored[n])}, model {list(params[n])}"
        for n in set(stored) & set(params)
        if stored[n] != params[n] and n not in converted
    )
    details = (
        [f"unexpected (transformers would drop it): {n}" for n in unexpected]
        + [f"missing (transformers would initialise it at random): {n}" for n in missing]
        + [f"shape mismatch {s}" for s in wrong_shape]
    )
    cls = type(model).__name__
    if details:
        report.add(
            "transformers_names",
            FAIL,
            f"{cls} would not load this checkpoint as stored "
            f"({len(unexpected)} unexpected, {len(missing)} missing, "
            f"{len(wrong_shape)} wrong shape)",
            details,
        )
    elif ignored:
        report.add(
            "transformers_names",
            WARN,
            f"{cls} loads every tensor it has, but drops {len(ignored)} stored tensors its class lists as ignorable",
            ignored,
        )
    else:
        quantized = ""
        if unloadable is not None:
            quantized = f", its {unloadable.format.name} layers as their unquantized shapes (here: {why})"
        report.add(
            "transformers_names",
            PASS,
            f"the tensor names and shapes are exactly those {cls} (transformers {transformers.__version__}) "
            f"loads{quantized}",
        )


def _known_quantization(checkpoint: Checkpoint):
    """The quantization settings of a checkpoint in a format weightlock reads; None otherwise."""
    try:
        return quantization_of(checkpoint.config)
    except WeightlockError:
        return None


def _quantized_as_unquantized(stored: dict, checkpoint: Checkpoint, settings) -> dict:
    """Stored names with each quantized layer's tensors replaced by the ``.weight`` of its logical shape."""
    fmt = settings.format
    out = dict(stored)
    for name in [n for n in stored if n.endswith(f".{fmt.marker}")]:
        module = name.removesuffix(f".{fmt.marker}")
        try:
            layer = quantized_linear(checkpoint.tensors, module, settings)
        except WeightlockError:
            continue  # left as stored: reported as unexpected
        for suffix in fmt.tensors + fmt.optional:
            out.pop(f"{module}.{suffix}", None)
        out[f"{module}.weight"] = layer.shape
    return out


def _quantizer_as_loaded(config):
    """The quantizer from_pretrained would use for a config that declares its quantization (it decides, e.g.,
    that MXFP4 experts are dequantized on a machine without Triton), and the config as it adjusts it; none
    for an unquantized config. Internal API of transformers 5; without it names are compared unquantized."""
    if getattr(config, "quantization_config", None) is None:
        return None, config
    try:
        from transformers.quantizers.auto import get_hf_quantizer
    except ImportError:
        return None, config
    quantizer, config, _ = get_hf_quantizer(config, None, None, True, {})
    return quantizer, config


def _names_as_loaded(model, params: dict, checkpoint: Checkpoint, quantizer=None) -> tuple[dict, set]:
    """Checkpoint names as transformers renames them on load (v5 saves e.g. GPT-NeoX's lm_head as
    embed_out and renames it back), and the names a converter reshapes or dequantizes (their shapes are
    not compared)."""
    stored = {name: entry.shape for name, entry in checkpoint.tensors.items()}
    try:  # internal API of transformers 5; without it names are compared as stored
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    except (ImportError, AttributeError, TypeError):
        return stored, set()
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed, converted = {}, set()
    for name, shape in stored.items():
        new_name, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        renamed[new_name] = shape
        if converter is not None:
            converted.add(new_name)
    return renamed, converted


def _patterns(patterns):
    if not patterns:
        return lambda name: False
    regex = re.compile("|".join(f"({p})" for p in patterns))
    return lambda name: regex.search(name) is not None
