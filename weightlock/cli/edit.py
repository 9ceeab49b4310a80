"""Commands that edit and check checkpoints: apply, verify, revert, inspect, import-legacy."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from weightlock.cli.common import (
    VERIFY_FAILED_EXIT,
    EngineList,
    Number,
    OutputFile,
    cli,
    echo_lines,
    emit,
    json_option,
    local_paths,
)
from weightlock.errors import InvalidInputError
from weightlock.io.outputs import write_file_atomically
from weightlock.io.text import printable


@cli.command()
@click.argument("checkpoint")
@click.option(
    "--lock", "lock_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Lock file (.wlock)."
)
@click.option(
    "--out", type=OutputFile(folder=True), help="Output folder, or .gguf file for a GGUF input (must not exist)."
)
@click.option(
    "--in-place", is_flag=True, help="Edit CHECKPOINT itself (no second copy); undo with `weightlock revert`."
)
@click.option(
    "--alpha",
    type=Number("alpha"),
    default=None,
    help="Lock strength; default: the lock's default_alpha. Negative takes a lock off again.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--link-mode",
    type=click.Choice(["auto", "hardlink", "copy"]),
    default="auto",
    show_default=True,
    help="How unchanged shards are reused: hardlink when possible (auto), always, or copy.",
)
@click.option(
    "--allow-architecture-mismatch", is_flag=True, help="Apply a lock made from another architecture of the same shape."
)
@click.option(
    "--no-loader-check",
    is_flag=True,
    help="Verify the output without building the transformers class (as `verify --no-loader-check`).",
)
@click.option(
    "--eval-report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A `weightlock eval --report` file whose measurements the output's model card quotes.",
)
@click.option(
    "--no-gate",
    is_flag=True,
    help="Bake a gated lock's heads as a constant lock (formats and families that cannot hold the gate).",
)
@json_option
def apply(
    checkpoint,
    lock_path,
    out,
    in_place,
    alpha,
    force,
    link_mode,
    allow_architecture_mismatch,
    no_loader_check,
    eval_report,
    no_gate,
    as_json,
):
    """Write a copy of CHECKPOINT (folder, cached Hub id or .gguf file) with the lock baked in, or edit a folder
    --in-place."""
    if (out is None) == (not in_place):
        raise InvalidInputError(
            "give exactly one of --out and --in-place",
            hint="--out DIR writes a new folder; --in-place edits CHECKPOINT itself",
        )
    if in_place:
        from weightlock.api import apply_in_place
        from weightlock.core.lock import read_lock

        lock = read_lock(lock_path)[0]
        result = apply_in_place(
            checkpoint,
            lock.without_gate() if no_gate and lock.gate is not None else lock_path,
            alpha=alpha,
            allow_architecture_mismatch=allow_architecture_mismatch,
            progress=not as_json,
            loader_check=not no_loader_check,
            eval_report=eval_report,
        )
    else:
        from weightlock.api import apply_lock
        from weightlock.io.outputs import check_output_folder

        check_output_folder(out, inputs=[*local_paths(checkpoint), lock_path, eval_report])
        result = apply_lock(
            checkpoint,
            lock_path,
            out=out,
            alpha=alpha,
            force=force,
            link_mode=link_mode,
            allow_architecture_mismatch=allow_architecture_mismatch,
            progress=not as_json,
            loader_check=not no_loader_check,
            eval_report=eval_report,
            gate=not no_gate,
        )
    s = result.summary()
    if s.get("format") == "gguf":
        lines = [
            f"locked {len(s['locked_layers'])} layers at alpha {s['alpha']:g} -> {', '.join(s['files'])}",
            f"  llama.cpp architecture {s['architecture']}: added {s['tensors_added']} attn_output.bias tensors, "
            f"replaced {s['tensors_replaced']}",
            f"  read {s['bytes_read_weights']:,} bytes of attn_output weights, wrote {s['bytes_written']:,} bytes, "
            f"{s['seconds']:.2f}s",
        ]
        if s["rewritten_from"]:
            lines.insert(
                1,
                f"  rewritten from llama.cpp {s['rewritten_from']} as {s['architecture']} (the same model, and a graph "
                f"that adds the bias): {s['tensors_permuted']} Q/K tensors' rows permuted for its RoPE, keys renamed",
            )
        lines += [f"  warning: {warning}" for warning in s["warnings"]]
        emit(as_json, {"ok": True, **s}, lines)
        return
    lines = [
        f"locked {len(s['locked_layers'])} layers at alpha {s['alpha']:g} -> {s['out']}",
        f"  added {s['tensors_added']} tensors, replaced {s['tensors_replaced']}, config sets "
        f"{s['config_changes']['set']}"
        + (f", removes {s['config_changes']['removed']}" if s["config_changes"]["removed"] else "")
        + (" (redeclared)" if s["redeclared"] else "")
        + (f"; split {s['tensors_split']} fused weights" if s["tensors_split"] else "")
        + (f"; stacked {s['tensors_stacked']} tensors from their pieces" if s["tensors_stacked"] else ""),
        f"  read {s['bytes_read_weights']:,} bytes of o_proj weights, wrote {s['bytes_written']:,} bytes, "
        f"{s['shards_linked']} files hardlinked, {s['files_copied']} copied, {s['seconds']:.2f}s",
    ]
    if s.get("gate"):
        gate = s["gate"]
        lines.insert(
            1,
            f"  gated (experimental): {len(gate['layers'])} gates; every MLP grown by {gate['added_neurons']} "
            f"neurons (intermediate_size {gate['original_intermediate_size']} -> "
            f"{gate['original_intermediate_size'] + gate['added_neurons']}, mlp_bias on); the o_proj biases carry "
            "no push",
        )
    lines += [f"  left out (weights without the lock): {item}" for item in s["left_out"]]
    lines += [f"  warning: {warning}" for warning in s["warnings"]]
    emit(as_json, {"ok": True, **s}, lines)


def _engine_names() -> str:
    from weightlock.engines.serving_table import ENGINES

    return ", ".join(ENGINES)


def _merged_engines(given: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """Every --engines option's names together (a name given twice is a usage error, as within one)."""
    if not given:
        return None
    from weightlock.engines.serving_table import parse_engines
    from weightlock.errors import WeightlockError

    try:
        return parse_engines([name for names in given for name in names])
    except WeightlockError as e:
        raise click.UsageError(printable(f"{e.message} ({e.hint})")) from None


@cli.command()
@click.argument("checkpoint")
@click.option("--deep", is_flag=True, help="Also scan every floating-point tensor for NaN/Inf (reads everything).")
@click.option("--no-loader-check", is_flag=True, help="Skip building the transformers class on the meta device.")
@click.option(
    "--engine",
    type=click.Choice(["vllm", "mlx", "llama-cpp"]),
    default=None,
    help="Also load the checkpoint in this engine: vllm (a folder: the tensor names into vLLM's own model class), "
    "mlx (a folder, loaded by mlx-lm as mlx_lm.load does: its attention-output biases must be in the model as "
    "stored) or llama-cpp (a GGUF file: loaded by llama.cpp). Needs the engine installed.",
)
@click.option(
    "--source",
    metavar="SOURCE",
    default=None,
    help="The model the lock was applied to (a folder or cached Hub id; a .gguf for a GGUF file): the originals "
    "the record claims for biases the source already had are compared with its stored biases byte for byte. "
    "Without it they are unverifiable (a family with o_proj biases: starcoder2, phi2, gpt-neox, ...).",
)
@click.option(
    "--engines",
    type=EngineList(),
    multiple=True,
    help="The engines you deploy to, comma-separated, or the option given again (default: all in weightlock's "
    "serving table): verify fails "
    "where one of them would serve the checkpoint without its attention-output biases, with no error, and warns "
    "where one refuses it. Nothing is loaded: the verdicts are data. Names: " + _engine_names() + ".",
)
@json_option
def verify(checkpoint, deep, no_loader_check, engine, source, engines, as_json):
    """Check that CHECKPOINT loads as written, holds the lock its record claims, and which engines serve it."""
    from weightlock.api import verify_checkpoint
    from weightlock.core.report import report_json

    report = verify_checkpoint(
        checkpoint,
        deep=deep,
        loader_check=not no_loader_check,
        engine=engine,
        source=source,
        engines=_merged_engines(engines),
    )
    if as_json:
        click.echo(report_json(report))
    else:
        marks = {"pass": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip", "not-run": "NOT RUN"}
        lines = []
        for check in report.checks:
            lines.append(f"[{marks[check.status]}] {check.name}: {check.message}")
            lines += [f"         {detail}" for detail in check.details]
        if not report.ok:
            lines.append("NOT verified: see the FAIL and NOT RUN lines above")
        elif report.locked is None:  # nothing failed, and no record: no lock was verified
            lines.append("verified: loads as written; not locked by weightlock (no record)")
        elif report.locked["net_alpha"] == 0:  # an undo: the chain holds, and no lock is in effect
            lines.append("verified: the edits hold, and they net to alpha 0: the lock is off, the model is not locked")
        else:
            lines.append("verified: all checks hold")
        echo_lines(lines)
    if not report.ok:
        sys.exit(VERIFY_FAILED_EXIT)


def _alpha_words(locked: dict) -> str:
    """The alpha a record names: the newest edit's, and for a relock chain what its lock nets to (in effect)."""
    if isinstance(locked.get("edits"), int) and locked["edits"] > 1 and locked.get("net_alpha") is not None:
        return f"net alpha {locked['net_alpha']} over {locked['edits']} edits (the newest at alpha {locked['alpha']})"
    return f"alpha {locked['alpha']}"


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@json_option
def revert(checkpoint, as_json):
    """Undo an in-place apply of CHECKPOINT, finished or interrupted, restoring the original bytes."""
    from weightlock.api import revert as revert_in_place

    result = revert_in_place(checkpoint)
    emit(
        as_json,
        {"ok": True, **result},
        [f"reverted {result['path']}" if result["reverted"] else f"tidied {result['path']}"]
        + [f"  {action}" for action in result["actions"]],
    )


@cli.command("inspect")
@click.argument("target")
@click.option(
    "--heatmap",
    type=OutputFile(),
    default=None,
    help="For a lock: also draw its layer x head map (probe accuracy, kept heads marked), .png or .svg "
    "(needs weightlock[plot]).",
)
@click.option("--force", is_flag=True, help="Replace an existing --heatmap file.")
@json_option
def inspect_command(target, heatmap, force, as_json):
    """Describe a lock file, a checkpoint folder (or cached Hub id), or a GGUF file."""
    from weightlock.api import describe
    from weightlock.core.describe import describe_lock
    from weightlock.formats import GGUF, detect
    from weightlock.io.outputs import check_output_file

    path = Path(target)
    if heatmap is not None and not (path.is_file() and path.suffix.lower() != ".gguf"):
        raise InvalidInputError(
            f"--heatmap draws a lock's layer x head map; {target} is not a lock file",
            hint="pass a .wlock file (a locked folder's lock is weightlock/lock.wlock inside it)",
        )
    if heatmap is not None:
        check_output_file(heatmap, inputs=local_paths(target), force=force, option="--heatmap")
    if detect(target) == GGUF:  # the one place that decides a location's format
        data = describe(path)
        lines = _gguf_lines(data)
    elif path.is_file():
        from weightlock.core.lock import load_lock
        from weightlock.lab.plot import check_can_draw, lock_heatmap

        fmt = check_can_draw(heatmap) if heatmap is not None else None
        lock = load_lock(path)
        data = describe_lock(lock)
        if heatmap is not None:
            write_file_atomically(heatmap, lock_heatmap(lock, fmt), force=force, commit=f"{heatmap} was written")
            data["heatmap"] = str(heatmap)
        m = data["manifest"]
        src = m["source_model"]
        lines = [
            f"lock {path.name} (sha256 {data['sha256'][:16]}...)",
            f"  source model: {src.get('name') or '?'} {src['architecture']}, {src['num_hidden_layers']} "
            f"layers x {src['num_attention_heads']} heads of {src['head_dim']}, hidden {src['hidden_size']}",
            f"  made by: {m['creation']['method']} ({m['creation']['tool']}); default alpha "
            f"{m['default_alpha']:g}; {m['num_heads_selected']} heads",
            f"  scales: min {data['scales']['min']:.4g}, median {data['scales']['median']:.4g}, "
            f"max {data['scales']['max']:.4g}",
        ]
        lines += _selection_lines(data["selection"])
        lines.append("  heads per layer:")
        lines += [f"    layer {layer:>3}: {heads}" for layer, heads in data["heads_per_layer"].items()]
        if lock.gate is not None:
            from weightlock.cli.lab import gate_lines

            lines += ["  " + line for line in gate_lines(lock)]
    else:
        data = describe(target)
        model = data["model"]
        lines = [
            f"checkpoint {data['path']}" + (f" ({data['name']}@{data['revision']})" if data["name"] else ""),
            f"  model: {model.get('architecture')}"
            + (
                f", {model['num_layers']} layers x {model['num_heads']} heads of {model['head_dim']}, "
                f"hidden {model['hidden_size']}, {model['bias_flag']}"
                if "num_layers" in model
                else f" (not supported: {model.get('reason')})"
            ),
            f"  layout: {data['layout']}, {data['tensors']} tensors, dtypes {data['dtypes']}",
        ]
        lines += [f"    {s['file']}: {s['bytes']:,} bytes, {s['tensors']} tensors" for s in data["shards"]]
        lines += _quantization_lines(data["quantization"])
        locked = data["locked"]
        lines.append(
            _no_record(data["edit_traces"])
            if locked is None
            else f"  locked: recorded, not verified (run `weightlock verify`): {_alpha_words(locked)}, "
            f"lock {str(locked['lock_sha256'])[:16]}..., "
            f"layers {sorted(int(k) for k in (locked['locked_layers'] or {}))}, "
            f"{locked['edits']} edit(s) recorded"
            + (
                f"; gated: every MLP grown by {locked['gate'].get('added_neurons')} neurons"
                if isinstance(locked.get("gate"), dict)
                else ""
            )
            + (f"; redeclared from {locked['redeclared_from']}" if locked["redeclared_from"] else "")
        )
    emit(as_json, data, lines)


SHOWN_SCORED_HEADS = 12


def _no_record(traces: list[str]) -> str:
    if not traces:
        return "  locked: no"
    shown = ", ".join(traces[:4]) + (f" and {len(traces) - 4} more" if len(traces) > 4 else "")
    return (
        f"  locked: no record, but traces of a weightlock edit ({shown}): the record was removed or never written; "
        "verify fails it where attention-output biases could hold a lock"
    )


def _quantization_lines(quantization: dict | None) -> list[str]:
    if quantization is None:
        return []
    if not quantization["readable"]:
        return [f"  quantization: {quantization['method']}, not read by weightlock: {quantization['reason']}"]
    stored = ", ".join(f"{n} x {how}" for how, n in quantization["output_projections"].items())
    lines = [f"  quantization: {quantization['method']}; o_proj weights: {stored}"]
    if quantization["bias_dtypes"]:
        lines.append(f"    o_proj biases stored unquantized as {', '.join(quantization['bias_dtypes'])}")
    if "format" in quantization:
        lines.append(f"    layout: {quantization['packing']}")
        lines.append(f"    a bias on these layers is applied by: {', '.join(quantization['bias_applied_by'])}")
        lines += [f"    not shown for {loader}: {why}" for loader, why in quantization["not_shown"].items()]
    return lines


def _selection_lines(selection: dict | None) -> list[str]:
    if selection is None:
        return ["  heads chosen by: not recorded"]
    where = f", activations at the {selection['position']}'s last tokens" if selection["position"] else ""
    if selection["method"] == "accuracy":
        return [f"  heads chosen by: held-out probe accuracy{where}"]
    if "kept" not in selection:
        return [f"  heads chosen by: {selection['method']}{where} (scores unreadable)"]
    lines = [
        f"  heads chosen by: {selection['method']}: effect / sqrt(KL), each head alone at alpha "
        f"{selection['alpha']}, from {selection['candidates']} candidates ({selection['negative_effect_candidates']} "
        f"pushed towards the unsafe answer){where}",
        "    layer.head      score     effect         KL  probe accuracy",
    ]
    for r in selection["kept"][:SHOWN_SCORED_HEADS]:
        lines.append(
            f"    {r['layer']:>5}.{r['head']:<4} {r['score']:>8.3f} {r['effect']:>10.4f} {r['kl']:>10.2e} "
            f"{r['probe_accuracy']:>15.3f}"
        )
    if len(selection["kept"]) > SHOWN_SCORED_HEADS:
        lines.append(f"    ... {len(selection['kept']) - SHOWN_SCORED_HEADS} more (--json has all)")
    return lines


def _gguf_lines(data: dict) -> list[str]:
    shape = data["shape"]
    lines = [
        f"GGUF {data['path']} ({len(data['files'])} file(s), {data['bytes']:,} bytes, GGUF v{data['gguf_version']})",
        f"  llama.cpp architecture: {data['architecture']}"
        + (f" ({data['model_name']})" if data["model_name"] else "")
        + f"; attention-output bias: {data['llama_cpp_output_bias'] or 'unknown architecture'}",
    ]
    if data.get("locked_as"):
        lines.append(
            f"  apply writes it as llama.cpp {data['locked_as']}: Q/K rows permuted for that graph's RoPE, keys renamed"
        )
    if shape:
        lines.append(
            f"  {shape['layers']} layers x {shape['heads']} heads of {shape['head_dim']} ({shape['kv_heads']} KV), "
            f"hidden {shape['hidden_size']}; attn_output stored as {data['attn_output_types']}"
        )
    elif data.get("problem"):
        lines.append(f"  not lockable: {data['problem']}")
    locked = data["locked"]
    lines.append(
        f"  {data['tensors']} tensors, {data['attn_output_biases']} attn_output.bias; locked: "
        + (
            _no_record(data["edit_traces"]).removeprefix("  locked: ")
            if locked is None
            else f"recorded, not verified (run `weightlock verify`): {_alpha_words(locked)}, "
            f"lock {locked['lock_sha256'][:16]}..., layers "
            f"{sorted(int(k) for k in locked['locked_layers'])}, {locked['tensors_added']} biases added, "
            f"{locked['tensors_replaced']} changed, {locked['edits']} edit(s) recorded"
        )
    )
    rewritten = (locked or {}).get("rewritten_from")
    if rewritten:
        lines.append(
            f"  rewritten from llama.cpp {rewritten['architecture']}: {rewritten['permuted_tensors']} Q/K tensors' "
            f"rows permuted, {rewritten['renamed_keys']} keys renamed (verify --source checks them)"
        )
    return lines


@cli.command("import-legacy")
@click.argument("legacy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=OutputFile(), help="Lock file to write.")
@click.option(
    "--model",
    "model",
    default=None,
    help="Source model's config.json, checkpoint folder or cached Hub id "
    "(needed unless the file is one of the published SafetyLock locks).",
)
@click.option(
    "--default-alpha", type=Number("default_alpha"), default=None, help="Strength recorded as the lock's default [6]."
)
@click.option("--force", is_flag=True, help="Replace an existing lock file.")
@json_option
def import_legacy_command(legacy, out, model, default_alpha, force, as_json):
    """Convert a SafetyLock .safelock file (a pickle, read safely) to a .wlock lock."""
    from weightlock.core.legacy import LEGACY_DEFAULT_ALPHA, import_legacy
    from weightlock.core.lock import save_lock, source_model_from_config
    from weightlock.io.outputs import check_output_file

    check_output_file(out, inputs=[legacy, *local_paths(model)], force=force)
    source_model = None
    if model is not None:
        config_path = Path(model)
        if config_path.is_file():
            from weightlock.io.untrusted import read_json

            source_model = source_model_from_config(read_json(config_path, "config", "config"))
        else:
            from weightlock.formats.safetensors.folder import open_checkpoint

            ckpt = open_checkpoint(model)
            source_model = source_model_from_config(ckpt.config, ckpt.name, ckpt.revision)
    lock = import_legacy(
        legacy, source_model, default_alpha=LEGACY_DEFAULT_ALPHA if default_alpha is None else default_alpha
    )
    digest = save_lock(lock, out, force=force, commit=f"{out} was written")
    src = lock.source_model
    emit(
        as_json,
        {
            "ok": True,
            "out": str(out),
            "sha256": digest,
            "heads": lock.num_heads_selected,
            "layers": sorted(lock.heads_by_layer()),
            "source_model": src.to_dict(),
        },
        f"wrote {out}: {lock.num_heads_selected} heads in {len(lock.heads_by_layer())} layers of "
        f"{src.name or src.architecture} (sha256 {digest[:16]}...)",
    )
