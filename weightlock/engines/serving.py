"""Which engines apply an output's ``o_proj`` bias, as checks on an opened checkpoint: vLLM per family (the
family table's ``vllm`` column, :mod:`weightlock.core.families`) and the loaders shown to apply a bias on each
quantized layout (the layout table, :mod:`weightlock.formats.safetensors.quant.layouts`).

The ``--engine`` values each format accepts, and the check each asks for, are here too."""

from __future__ import annotations

from weightlock.core.families import ModelShape
from weightlock.core.report import FAIL, PASS, WARN, Report
from weightlock.errors import WeightlockError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.plan import stored_linear
from weightlock.formats.safetensors.quant.layouts import QuantizedLinear, quantization_of


def check_vllm_support(checkpoint: Checkpoint, spec, shape: ModelShape, report: Report) -> None:
    """Whether vLLM would apply the biases: its classes differ from transformers' per family, and one that
    hard-codes no o_proj bias skips the tensor without an error, so a locked checkpoint it would serve
    unlocked fails here."""
    from weightlock.core.families import VLLM_INACTIVE, vllm_serving

    serving, why = vllm_serving(checkpoint.config, spec)
    if serving != VLLM_INACTIVE:
        report.add("vllm_support", PASS, f"{why}; the biases are applied")
        return
    if not spec.bias_on(checkpoint.config):
        report.add("vllm_support", PASS, f"no attention-output bias to lose ({why})")
        return
    fix = f'set "architectures" in config.json to ["{spec.vllm_serve_as}"]' if spec.vllm_serve_as else ""
    report.add(
        "vllm_support",
        FAIL,
        f"vLLM would serve this checkpoint without its o_proj biases: {why}"
        + (
            f"; {fix} (or apply the lock again with this weightlock, which does it) to serve it through "
            "vLLM's Transformers backend, which applies them"
            if fix
            else ""
        ),
    )


def check_quantized_loaders(checkpoint: Checkpoint, spec, shape: ModelShape, report: Report) -> None:
    """Which loaders are shown (tests/test_quantized.py) to apply a bias on the checkpoint's quantized o_proj
    layers, and which are not: a loader not shown may load the layer without its bias."""
    try:
        settings = quantization_of(checkpoint.config)
    except WeightlockError as e:
        report.add("quantization", WARN, f"weightlock cannot read this quantization: {e.message}")
        return
    if settings is None:
        return
    quantized = 0
    for layer in range(shape.num_layers):
        try:
            quantized += isinstance(
                stored_linear(checkpoint.tensors, checkpoint.config, spec.output_module(layer)), QuantizedLinear
            )
        except WeightlockError:
            pass  # config_agrees reports it
    fmt = settings.format
    where = f"o_proj of {quantized}/{shape.num_layers} layers stored {settings.describe()}"
    if not spec.bias_on(checkpoint.config) or quantized == 0:
        report.add("quantization", PASS, f"{where}; no bias on them to lose")
        return
    proven = f"{where}; a bias on them is applied by {' and '.join(fmt.bias_honoured_by)} (shown by weightlock's tests)"
    if fmt.unproven:
        report.add(
            "quantization",
            WARN,
            proven + "; not shown for " + "; ".join(f"{loader} ({why})" for loader, why in fmt.unproven.items()),
        )
    else:
        report.add("quantization", PASS, proven)


# the --engine values of `verify` per format, and the check each asks for (it must run and pass)
ENGINE_CHECKS = {"safetensors": {"vllm": "vllm_load"}, "gguf": {"llama-cpp": "llama.cpp"}}
