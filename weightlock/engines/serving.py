"""Which engines apply an output's attention-output bias, as checks on an opened checkpoint: every engine of the
serving table (:mod:`weightlock.engines.serving_table`), for folders and GGUF files, and the loaders shown to
apply a bias on each quantized layout (the layout table, :mod:`weightlock.formats.safetensors.quant.layouts`).

The ``--engine`` values each format accepts, and the check each asks for, are here too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightlock.core.families import ModelShape
from weightlock.core.report import FAIL, PASS, WARN, Report
from weightlock.engines.serving_table import (
    APPLIES,
    ENGINES,
    GATED_MLP_ROWS,
    LOGITS_SCALING,
    MISCONVERTS,
    NONZERO_QK_BIAS,
    REFUSES,
    SILENT,
    UNTIED_LM_HEAD,
    Engine,
    Row,
    dispatch_key,
    row_for,
    verdict,
)
from weightlock.errors import WeightlockError
from weightlock.formats import GGUF, SAFETENSORS
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.plan import stored_linear
from weightlock.formats.safetensors.quant.layouts import QuantizedLinear, quantization_of
from weightlock.io.safetensors_file import TensorReaders

SERVING = "serving"  # the check of a checkpoint without any attention-output bias; per engine: "serving:<name>"
_FORMAT_WORDS = {SAFETENSORS: "safetensors folders", GGUF: "GGUF files"}
_OTHERS_HINT = "hint: serve it with an engine that applies it, or name the engines you deploy to with --engines"


@dataclass
class EngineVerdict:
    engine: Engine
    key: str | None  # what the engine picks its code by, as the checkpoint declares it
    row: Row | None  # None: the serving table has no row for it
    verdict: str | None
    flag_off: bool = False  # the row applies the bias only with a flag config.json has off
    through: Row | None = None  # the engine's backend row, when ``row`` is transformers' (what the backend builds)


@dataclass
class Assessment:
    """What every engine in scope does with a checkpoint's attention-output biases."""

    fmt: str
    present: bool  # the checkpoint has a non-zero attention-output bias
    verdicts: list[EngineVerdict]
    unread: list[Engine]  # engines named that do not load this format


def _engines(fmt: str, names: tuple[str, ...] | None) -> tuple[list[Engine], list[Engine]]:
    named = list(ENGINES.values()) if names is None else [ENGINES[n] for n in names]
    return [e for e in named if fmt in e.picks], [e for e in named if fmt not in e.picks and names is not None]


def _assess(fmt, names, present: bool, key_of, flag_on, holds, model_type: str | None = None, quant=None) -> Assessment:
    engines, unread = _engines(fmt, names)
    verdicts = []
    for engine in engines:
        key = key_of(engine)
        if quant is not None and quant.loaded_only_by is not None and engine.name not in quant.loaded_only_by:
            # a quantization format only some engines load (MLX's): the others refuse the folder at load
            why = quant.unproven.get(engine.name) or f"{engine.title} does not load {quant.name}-quantized folders"
            refusal = Row(
                engine.name,
                fmt,
                str(key),
                REFUSES,
                why,
                "the quantization table (QuantFormat.loaded_only_by)",
                version=engine.version,
            )
            verdicts.append(EngineVerdict(engine, key, refusal, REFUSES))
            continue
        row = row_for(engine.name, fmt, key)
        if row is None:
            verdicts.append(EngineVerdict(engine, key, None, None))
            continue
        if row.backend:
            # a Transformers backend builds transformers' own class for the config's model_type: it serves the
            # bias exactly when that class has one (the transformers row, with the flag it reads)
            built = row_for("transformers", fmt, model_type)
            if built is None:
                verdicts.append(EngineVerdict(engine, f"{key} ({model_type})", None, None))
                continue
            if built.verdict != APPLIES or (built.reads is not None and not flag_on(built.reads)):
                on = built.reads is None or flag_on(built.reads)
                verdicts.append(EngineVerdict(engine, key, built, verdict(built, flag_on=on), not on, through=row))
                continue
        on = True if row.reads is None else flag_on(row.reads)
        found = {c for c in (row.refuses_if, row.misconverts_if) if c is not None and holds(c)}
        verdicts.append(EngineVerdict(engine, key, row, verdict(row, flag_on=on, holds=found), not on))
    return Assessment(fmt, present, verdicts, unread)


def _any_nonzero(entries) -> bool:
    """Whether any of these bias tensors holds a non-zero value: all-zero biases (a lock taken off with -alpha,
    or a model that never had one) give an engine nothing to lose by dropping them."""
    try:
        with TensorReaders() as readers:
            return any(bool(np.any(readers[e].read_float32(e) != 0)) for e in entries)
    except WeightlockError:  # unreadable (other checks say why): not shown to be zero
        return bool(entries)


def assess_folder(checkpoint: Checkpoint, spec, shape: ModelShape, names: tuple[str, ...] | None) -> Assessment:
    """The serving table's verdicts for a folder: each engine's row for what config.json declares, the flag the
    row reads, and the row's condition for serving another model (a logits_scaling in config.json; non-zero q/k
    biases, read from the tensors: small)."""
    config = checkpoint.config
    entries = [checkpoint.tensors[n] for n in map(spec.output_bias, range(shape.num_layers)) if n in checkpoint.tensors]
    present = _any_nonzero(entries)

    def flag_on(flag: str) -> bool:
        return spec.bias_on(config) if flag == spec.bias_flag else bool(config.get(flag, False))

    def holds(condition: str) -> bool:
        if condition == LOGITS_SCALING:
            return config.get("logits_scaling", 1) not in (1, 1.0, None)
        if condition == UNTIED_LM_HEAD:
            return "lm_head.weight" in checkpoint.tensors
        assert condition == NONZERO_QK_BIAS, condition
        names = [
            f"{spec.attention_module.format(layer=layer)}.{projection}.bias"
            for layer in range(shape.num_layers)
            for projection in ("q_proj", "k_proj")
        ]
        return _any_nonzero([checkpoint.tensors[n] for n in names if n in checkpoint.tensors])

    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    try:
        settings = quantization_of(config)
    except WeightlockError:  # the quantization check says why
        settings = None
    quant = settings.format if settings is not None else None
    return _assess(
        SAFETENSORS, names, present, lambda e: dispatch_key(e, SAFETENSORS, config), flag_on, holds, model_type, quant
    )


def assess_gguf(model, architecture, names: tuple[str, ...] | None) -> Assessment:
    """The serving table's verdicts for a GGUF model of llama.cpp architecture ``architecture``."""
    from weightlock.formats.gguf.file import tensor_readers

    biases = [t for name, t in model.tensors.items() if name.endswith(".attn_output.bias")]
    try:
        with tensor_readers(model) as readers:
            present = any(bool(np.any(readers[t.file_index].read_vector(t) != 0)) for t in biases)
    except WeightlockError:  # unreadable (the bias checks say why): not shown to be zero
        present = bool(biases)
    return _assess(
        GGUF,
        names,
        present,
        lambda e: dispatch_key(e, GGUF, gguf_architecture=architecture.name),
        lambda flag: True,
        lambda condition: False,
    )


def _message(v: EngineVerdict, fmt: str) -> str:
    engine, row = v.engine, v.row
    who = f"{engine.title} {v.through.version if v.through else row.version if row else engine.version}"
    if row is None or v.verdict is None:
        return (
            f"{who}: not established for {engine.picks[fmt]} {v.key!r} (weightlock's serving table has no row "
            "for it): check that it applies the attention-output biases before serving it there"
        )
    why = f"its class creates the bias only with {row.reads} on, and it is off" if v.flag_off else row.why
    if v.through is not None:  # the engine's Transformers backend, building transformers' class
        why = f"served through its Transformers backend, which builds transformers' {row.target} class: {why}"
    where = f"{v.key}: {why}"
    if v.verdict == APPLIES:
        return f"{who} applies the attention-output biases ({v.key}" + (
            ", through its Transformers backend)" if row.backend else ")"
        )
    if v.verdict == REFUSES:
        if row.verdict != REFUSES and row.refuses_if is not None and row.note:  # refused by the row's condition
            where = f"{v.key}: {row.note}"
        return f"{who} refuses it with an error at load ({where})"
    if v.verdict == MISCONVERTS:
        return f"{who} would serve another model, with no error ({v.key}: {row.note})"
    text = f"{who} would serve it WITHOUT its attention-output biases (unlocked), with no error ({where})"
    if row.fix:
        text += f'; declaring "architectures": ["{row.fix}"] in config.json makes it apply them'
    if row.note:
        text += f"; {row.note}"
    return text


def add_to_report(assessment: Assessment, report: Report, enforce: bool) -> None:
    """One check per engine (``serving:<name>``): pass where it applies the bias, warn where it refuses the
    file (or does not load the format), fail where it would serve it unlocked or another model without an error
    (a warning when ``enforce`` is off: apply's own check). Without any bias there is nothing to lose: one pass."""
    for engine in assessment.unread:
        report.add(
            f"{SERVING}:{engine.name}",
            WARN,
            f"{engine.title} {engine.version} does not load {_FORMAT_WORDS[assessment.fmt]}: "
            f"{engine.not_read[assessment.fmt]}",
        )
    if not assessment.present:
        names = ", ".join(v.engine.name for v in assessment.verdicts)
        report.add(
            SERVING, PASS, f"no non-zero attention-output bias: nothing an engine could serve without it ({names})"
        )
        return
    for v in assessment.verdicts:
        if v.verdict == APPLIES:
            status = PASS
        elif v.verdict in SILENT:
            status = FAIL if enforce else WARN
        else:
            status = WARN
        details = [f"evidence: {v.row.evidence}"] if v.row is not None and status != PASS else []
        if status == FAIL:
            details.append(_OTHERS_HINT)
        report.add(f"{SERVING}:{v.engine.name}", status, _message(v, assessment.fmt), details)


def silent(assessment: Assessment) -> list[EngineVerdict]:
    """The engines that would serve the checkpoint unlocked (or as another model) without an error."""
    return [v for v in assessment.verdicts if v.verdict in SILENT] if assessment.present else []


def check_folder_serving(
    checkpoint: Checkpoint, spec, shape: ModelShape, report: Report, *, names=None, enforce: bool = True
) -> None:
    """``verify``'s serving checks for a folder (``names``: the engines deployed to; None: all)."""
    add_to_report(assess_folder(checkpoint, spec, shape, names), report, enforce)
    if gated_mlp_biases(checkpoint, spec, shape):
        for engine, status, message in gated_verdicts(names):
            report.add(f"{SERVING}-gate:{engine}", WARN if status == FAIL and not enforce else status, message)


def gated_mlp_biases(checkpoint: Checkpoint, spec, shape: ModelShape) -> bool:
    """Whether the folder holds a gated lock's neurons: a Llama MLP with mlp_bias on and a non-zero up_proj bias
    (the gate's constant input), which an engine dropping the MLP's biases would lose."""
    mlp = spec.gated_mlp
    if mlp is None or not checkpoint.config.get(mlp.bias_flag):
        return False
    names = [f"{mlp.projection('up', layer)}.bias" for layer in range(shape.num_layers)]
    return _any_nonzero([checkpoint.tensors[n] for n in names if n in checkpoint.tensors])


def gated_verdicts(names: tuple[str, ...] | None) -> list[tuple[str, str, str]]:
    """Per engine (those named, or all that load folders), what it does with a gated lock's MLP biases."""
    engines = [
        e for e in (ENGINES.values() if names is None else [ENGINES[n] for n in names]) if SAFETENSORS in e.picks
    ]
    out = []
    for engine in engines:
        row = GATED_MLP_ROWS.get(engine.name)
        who = f"{engine.title} {engine.version}"
        if row is None:
            out.append(
                (
                    engine.name,
                    WARN,
                    f"{who}: not established whether it builds a Llama MLP's biases (mlp_bias), where this gated "
                    "lock lives; check it before serving the model there",
                )
            )
        elif row[0] == APPLIES:
            out.append((engine.name, PASS, f"{who} applies the gate's MLP biases ({row[1]}; {row[2]})"))
        else:
            out.append(
                (
                    engine.name,
                    FAIL,
                    f"{who} would serve it WITHOUT the gate's MLP biases (unlocked), with no error ({row[1]}; "
                    f"{row[2]})",
                )
            )
    return out


def check_gguf_serving(model, architecture, shape, report: Report, *, names=None, enforce: bool = True) -> None:
    """``verify``'s serving checks for a GGUF model (``names``: the engines deployed to; None: all)."""
    add_to_report(assess_gguf(model, architecture, names), report, enforce)


def serving_warnings(location) -> list[str]:
    """apply's warning for a published output that some engine would serve without its lock, with no error: the
    output itself is right, so it is published, and where it is served is the user's choice."""
    from weightlock.core.families import shape_from_config, spec_for_config
    from weightlock.formats import detect

    if detect(location) == GGUF:
        from weightlock.formats.gguf.architectures import gguf_architecture
        from weightlock.formats.gguf.file import open_gguf

        model = open_gguf(location)
        assessment = assess_gguf(model, gguf_architecture(model.text("general.architecture")), None)
    else:
        from weightlock.formats.safetensors.folder import open_checkpoint

        checkpoint = open_checkpoint(location)
        spec = spec_for_config(checkpoint.config)
        assessment = assess_folder(checkpoint, spec, shape_from_config(checkpoint.config, spec), None)
    found = silent(assessment)
    gate_lost = []
    if detect(location) != GGUF and gated_mlp_biases(checkpoint, spec, shape_from_config(checkpoint.config, spec)):
        gate_lost = [
            f"engines that would serve this gated output without its gate (unlocked), with no error: {message}. "
            "Serve it with transformers, vllm or mlx-lm"
            for _, status, message in gated_verdicts(None)
            if status == FAIL
        ]
    if not found:
        return gate_lost
    listed = "; ".join(
        f"{v.engine.title} {v.row.version} ("
        + (f"another model: {v.row.note}" if v.verdict == MISCONVERTS else f"{v.key}: {v.row.why}")
        + ")"
        for v in found
        if v.row is not None
    )
    applying = [v.engine.name for v in assessment.verdicts if v.verdict == APPLIES]
    return [
        f"engines that would serve this output unlocked (or as another model), with no error: {listed}. "
        + (f"Serve it with {', '.join(applying)}; " if applying else "Serve it with another engine; ")
        + "`weightlock verify OUT --engines NAME,...` checks the engines you deploy to"
    ] + gate_lost


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
    # a loader that does not load the format at all refuses it (its serving check says so): nothing unshown
    unshown = {k: v for k, v in fmt.unproven.items() if fmt.loaded_only_by is None or k in fmt.loaded_only_by}
    if fmt.loaded_only_by is not None:
        proven += f"; only {' and '.join(fmt.loaded_only_by)} load {fmt.name}-quantized folders"
    if unshown:
        report.add(
            "quantization",
            WARN,
            proven + "; not shown for " + "; ".join(f"{loader} ({why})" for loader, why in unshown.items()),
        )
    else:
        report.add("quantization", PASS, proven)


# the --engine values of `verify` per format, and the check each asks for (it must run and pass)
ENGINE_CHECKS = {"safetensors": {"vllm": "vllm_load", "mlx": "mlx_load"}, "gguf": {"llama-cpp": "llama.cpp"}}
