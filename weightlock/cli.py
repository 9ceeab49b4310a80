"""The ``weightlock`` command: a thin layer over the API.

Errors a user can cause print one message and a hint, no traceback, and exit with
the error's code (3 bad input, 4 incompatible or unsupported, 5 output location,
6 written output failed verification, 7 missing extra). ``verify`` exits 1 when a
check fails. ``--json`` prints one JSON document on stdout, errors included.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__, commit
from .errors import InvalidInputError, OutputError, WeightlockError
from .text import printable
from .writer import failpoint, write_file_atomically

VERIFY_FAILED_EXIT = 1


# Text from a checkpoint, a lock or a record cannot forge terminal output: every line printed goes through
# printable (weightlock/text.py holds the one table of hidden characters it escapes).


def _echo_lines(lines: str | list[str]) -> None:
    """Text output, each line made printable on its own (a string is one line)."""
    click.echo("\n".join(printable(line) for line in ([lines] if isinstance(lines, str) else lines)))


def _emit(as_json: bool, data: dict, lines: str | list[str]) -> None:
    """One JSON document, or the text lines."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _echo_lines(lines)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


class Number(click.ParamType):
    """A numeric option: the row ``field`` of ``bounds.BOUNDS`` (shared with the API's settings objects). A
    value outside it (NaN, infinities, out of range, not a number) is bad input: exit 3, naming the option and
    its range. Every numeric option of every command is one of these (tests/test_cli_contract.py checks)."""

    def __init__(self, field: str):
        from .bounds import BOUNDS

        self.field = field
        self.bound = BOUNDS[field]
        self.name = "integer" if self.bound.kind is int else "number"

    def convert(self, value, param, ctx):
        from .bounds import check_number

        return check_number(self.field, value, param.opts[0] if param is not None and param.opts else None)


class NumberList(click.ParamType):
    """Comma-separated numbers, each a row ``field`` of ``bounds.BOUNDS`` (tune's --alphas)."""

    name = "numbers"

    def __init__(self, field: str):
        self.field = field

    def convert(self, value, param, ctx):
        from .bounds import check_number

        if isinstance(value, list | tuple):
            return list(value)
        option = param.opts[0] if param is not None and param.opts else "--" + self.field
        items = [item for item in str(value).split(",") if item.strip()]
        if not items:
            raise InvalidInputError(f"{option} is empty", hint=f"e.g. {option} 0,1,2,4,6")
        numbers = []
        for item in items:
            try:
                numbers.append(check_number(self.field, item, option))
            except InvalidInputError as e:
                raise InvalidInputError(
                    f"{option} {str(value)[:60]!r} is not a comma-separated list of finite numbers: {e.message}",
                    hint=f"e.g. {option} 0,1,2,4,6",
                ) from None
        return numbers


class OutputFile(click.Path):
    """A file weightlock writes. The command passes it through ``outputs.check_output_file`` with the inputs it
    reads before any work; tests/test_cli_contract.py finds every output option by this type."""

    def __init__(self, folder: bool = False):
        super().__init__(path_type=Path)  # what may be there is check_output_file's to say (exit 5), not click's
        self.folder = folder


def _local(location) -> list:
    """A MODEL/CHECKPOINT argument as an input path when it names something here (not only a Hub id)."""
    return [location] if location is not None else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightlock")
def cli() -> None:
    """Bake a SafetyLock into a checkpoint as o_proj biases, offline, and prove it loads."""


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
        from .gguf_format.file import is_gguf_path
        from .inplace import apply_in_place

        if is_gguf_path(checkpoint):
            raise InvalidInputError(
                "--in-place edits safetensors folders; a GGUF file is locked into a new file",
                hint="pass --out NAME-locked.gguf",
            )

        result = apply_in_place(
            checkpoint,
            lock_path,
            alpha=alpha,
            allow_architecture_mismatch=allow_architecture_mismatch,
            progress=not as_json,
            loader_check=not no_loader_check,
            eval_report=eval_report,
        )
    else:
        from .apply import apply_lock
        from .outputs import check_output_folder

        check_output_folder(out, inputs=[*_local(checkpoint), lock_path, eval_report])
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
        lines += [f"  warning: {warning}" for warning in s["warnings"]]
        _emit(as_json, {"ok": True, **s}, lines)
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
    lines += [f"  left out (weights without the lock): {item}" for item in s["left_out"]]
    lines += [f"  warning: {warning}" for warning in s["warnings"]]
    _emit(as_json, {"ok": True, **s}, lines)


@cli.command()
@click.argument("checkpoint")
@click.option("--deep", is_flag=True, help="Also scan every floating-point tensor for NaN/Inf (reads everything).")
@click.option("--no-loader-check", is_flag=True, help="Skip building the transformers class on the meta device.")
@click.option(
    "--engine",
    type=click.Choice(["vllm", "llama-cpp"]),
    default=None,
    help="Also load the checkpoint in this engine: vllm (a folder: the tensor names into vLLM's own model class) "
    "or llama-cpp (a GGUF file: loaded by llama.cpp). Needs the engine installed.",
)
@click.option(
    "--source",
    metavar="SOURCE",
    default=None,
    help="The model the lock was applied to (a folder or cached Hub id; a .gguf for a GGUF file): the originals "
    "the record claims for biases the source already had are compared with its stored biases byte for byte. "
    "Without it they are unverifiable (a family with o_proj biases: starcoder2, phi2, gpt-neox, ...).",
)
@json_option
def verify(checkpoint, deep, no_loader_check, engine, source, as_json):
    """Check that CHECKPOINT loads as written and holds the lock its record claims."""
    from .verify import report_json, verify_checkpoint

    report = verify_checkpoint(checkpoint, deep=deep, loader_check=not no_loader_check, engine=engine, source=source)
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
        _echo_lines(lines)
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
    from .inplace import revert as revert_in_place

    result = revert_in_place(checkpoint)
    _emit(
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
    from .describe import describe_checkpoint, describe_lock
    from .outputs import check_output_file

    path = Path(target)
    if heatmap is not None and not (path.is_file() and path.suffix.lower() != ".gguf"):
        raise InvalidInputError(
            f"--heatmap draws a lock's layer x head map; {target} is not a lock file",
            hint="pass a .wlock file (a locked folder's lock is weightlock/lock.wlock inside it)",
        )
    if heatmap is not None:
        check_output_file(heatmap, inputs=_local(target), force=force, option="--heatmap")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_format.file import open_gguf
        from .gguf_format.verify import describe_gguf

        data = describe_gguf(open_gguf(path))
        lines = _gguf_lines(data)
    elif path.is_file():
        from .lock import load_lock
        from .plot import check_can_draw, lock_heatmap

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
    else:
        from .checkpoint import open_checkpoint

        data = describe_checkpoint(open_checkpoint(target))
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
            + (f"; redeclared from {locked['redeclared_from']}" if locked["redeclared_from"] else "")
        )
    _emit(as_json, data, lines)


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
    return lines


@cli.command()
@click.argument("model")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Safety preference pairs, JSON or JSONL (SafetyLock keys or prompt/chosen/rejected).",
)
@click.option("--out", required=True, type=OutputFile(), help="Lock file to write.")
@click.option(
    "--heads",
    type=Number("heads"),
    default=24,
    show_default=True,
    help="Heads to keep (48 is the other common choice).",
)
@click.option(
    "--last-tokens", type=Number("last_tokens"), default=5, show_default=True, help="Answer tokens sampled per text."
)
@click.option("--seed", type=Number("seed"), default=0, show_default=True)
@click.option("--holdout", type=Number("holdout"), default=0.25, show_default=True, help="Fraction of pairs held out.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--batch-size", type=Number("batch_size"), default=8, show_default=True)
@click.option("--device-map", default=None, help='"auto" to spread a model too big for one device.')
@click.option("--system-prompt", default=None)
@click.option("--plain-template", is_flag=True, help="User:/Assistant: text instead of the chat template.")
@click.option("--gguf-file", default=None, help="Load MODEL's folder's GGUF file of this name (dequantised).")
@click.option("--limit", type=Number("limit"), default=None, help="Use only the first N pairs.")
@click.option("--default-alpha", type=Number("default_alpha"), default=6.0, show_default=True)
@click.option(
    "--select",
    "selection",
    type=click.Choice(["accuracy", "effect", "effect-greedy"]),
    default="effect",
    show_default=True,
    help="Keep the best measured effect per unit of KL among the --shortlist, or the heads with the best probe "
    "accuracy (as published; --select accuracy --position answer is SafetyLock's method), or effect-greedy.",
)
@click.option(
    "--position",
    type=click.Choice(["answer", "prompt"]),
    default="prompt",
    show_default=True,
    help="Activations at the answer's last tokens, or at the prompt's (harmful prompts against --benign-prompts).",
)
@click.option(
    "--shortlist",
    type=Number("shortlist"),
    default=64,
    show_default=True,
    help="Effect selection: candidates (by accuracy).",
)
@click.option(
    "--benign-prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Benign prompts for --position prompt and effect costs (.txt/.csv/.json/.jsonl); default: forge's own set.",
)
@click.option(
    "--effect-alpha",
    type=Number("effect_alpha"),
    default=1.0,
    show_default=True,
    help="Strength each candidate is tried at.",
)
@click.option(
    "--effect-pairs",
    type=Number("effect_pairs"),
    default=16,
    show_default=True,
    help="Held-out pairs measuring the effect.",
)
@click.option(
    "--effect-benign",
    type=Number("effect_benign"),
    default=16,
    show_default=True,
    help="Benign prompts measuring the cost.",
)
@click.option(
    "--greedy-pool",
    type=Number("greedy_pool"),
    default=8,
    show_default=True,
    help="effect-greedy: candidates tried per step.",
)
@click.option("--force", is_flag=True, help="Replace an existing lock file.")
@json_option
def forge(
    model,
    data,
    out,
    heads,
    last_tokens,
    seed,
    holdout,
    device,
    dtype,
    batch_size,
    device_map,
    system_prompt,
    plain_template,
    gguf_file,
    limit,
    default_alpha,
    selection,
    position,
    shortlist,
    benign_prompts,
    effect_alpha,
    effect_pairs,
    effect_benign,
    greedy_pool,
    force,
    as_json,
):
    """Make a lock from base MODEL (folder or cached Hub id) and safety preference pairs."""
    import numpy as np

    from .forge import ForgeSettings, forge_lock
    from .lock import save_lock
    from .outputs import check_output_file

    check_output_file(out, inputs=[*_local(model), data, benign_prompts], force=force)
    settings = ForgeSettings(
        heads=heads,
        last_tokens=last_tokens,
        seed=seed,
        holdout=holdout,
        template="plain" if plain_template else "chat",
        system_prompt=system_prompt,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        device_map=device_map,
        gguf_file=gguf_file,
        default_alpha=default_alpha,
        limit=limit,
        selection=selection,
        position=position,
        shortlist=shortlist,
        benign_prompts=None if benign_prompts is None else str(benign_prompts),
        effect_alpha=effect_alpha,
        effect_pairs=effect_pairs,
        effect_benign=effect_benign,
        greedy_pool=greedy_pool,
    )
    lock = forge_lock(model, data, settings, progress=not as_json)
    digest = save_lock(lock, out, force=force, commit=f"{out} was written")
    details = lock.creation["details"]
    accuracy = np.asarray(details["probe_accuracy"])
    kept = sorted(accuracy[lock.layers, lock.heads].tolist(), reverse=True)
    chosen_by = details["selection"]["method"]
    line = (
        f"wrote {out}: {lock.num_heads_selected} heads in {len(lock.heads_by_layer())} layers, chosen by {chosen_by}"
        + (f" from {details['selection']['shortlist']} candidates" if chosen_by != "accuracy" else "")
        + f" ({position} tokens), held-out probe accuracy {min(kept):.3f}..{max(kept):.3f} (sha256 {digest[:16]}...)"
    )
    _emit(
        as_json,
        {
            "ok": True,
            "out": str(out),
            "sha256": digest,
            "heads_per_layer": {str(k): v for k, v in lock.heads_by_layer().items()},
            "selection": chosen_by,
            "position": position,
            "heldout_accuracy_of_kept": kept,
        },
        line,
    )


def eval_options(command):
    """Options shared by eval and tune."""
    options = [
        click.option(
            "--harmful",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Harmful prompts (.txt/.csv/.json/.jsonl); default: the shipped set.",
        ),
        click.option(
            "--benign",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Benign prompts that look risky, for over-refusal (XSTest's CSV works: rows labelled "
            "safe); default: the shipped set.",
        ),
        click.option(
            "--kl-text",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Benign passages for KL drift; default: the shipped set.",
        ),
        click.option(
            "--qa",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Questions with accepted answers (JSONL) for QA accuracy; default: the shipped set.",
        ),
        click.option("--limit", type=Number("limit"), default=None, help="Use only the first N items of each set."),
        click.option("--max-new-tokens", type=Number("max_new_tokens"), default=48, show_default=True),
        click.option(
            "--batch-size",
            type=Number("batch_size"),
            default=None,
            help="Prompts generated together (default: 128 on a GPU, 16 on the CPU).",
        ),
        click.option("--system-prompt", default=None),
        click.option("--plain-template", is_flag=True, help="User:/Assistant: text instead of the chat template."),
        click.option("--gguf-file", default=None, help="Load MODEL's folder's GGUF file of this name."),
        click.option("--judge-model", default=None, help="A chat model that judges refusals instead of phrases."),
        click.option(
            "--engine",
            type=click.Choice(["transformers", "vllm", "llama-cpp"]),
            default="transformers",
            show_default=True,
            help="Who generates the answers; vllm (a folder) and llama-cpp (a .gguf MODEL) bake each alpha "
            "into a temporary checkpoint and serve it (KL stays on transformers).",
        ),
        click.option("--device", default="cpu", show_default=True),
        click.option(
            "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])
        ),
        click.option(
            "--report",
            type=OutputFile(),
            help="Write the full report, every answer included, as JSON here.",
        ),
        click.option(
            "--plot",
            type=OutputFile(),
            help="Draw the metrics against alpha here (.png or .svg; needs weightlock[plot]).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing --report or --plot file."),
        json_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_evaluation(model, lock_path, alphas, reference, opts, bounds=None):
    from .evaluate import EvalSettings, choose_alpha, evaluate_model, report_json, results_table
    from .plot import check_can_draw, eval_curves

    settings = EvalSettings(
        max_new_tokens=opts["max_new_tokens"],
        batch_size=opts["batch_size"],
        template="plain" if opts["plain_template"] else "chat",
        system_prompt=opts["system_prompt"],
        engine=opts["engine"],
    )
    files = {
        k: opts[o]
        for k, o in (("harmful", "harmful"), ("benign", "benign"), ("kl", "kl_text"), ("qa", "qa"))
        if opts[o] is not None
    }
    from .outputs import check_output_file

    inputs = [*_local(model), lock_path, reference, opts["judge_model"], *files.values()]
    for option, path in (("--report", opts["report"]), ("--plot", opts["plot"])):
        if path is not None:
            check_output_file(path, inputs=inputs, force=opts["force"], option=option)
    if (
        opts["report"] is not None
        and opts["plot"] is not None
        and Path(opts["report"]).resolve() == Path(opts["plot"]).resolve()
    ):
        raise OutputError("--report and --plot name the same file", hint="give each its own file")
    plot_format = check_can_draw(opts["plot"]) if opts["plot"] is not None else None  # before minutes of work
    report = evaluate_model(
        model,
        lock=lock_path,
        alphas=alphas,
        prompt_files=files,
        limit=opts["limit"],
        settings=settings,
        gguf_file=opts["gguf_file"],
        reference=reference,
        judge_model=opts["judge_model"],
        dtype=opts["dtype"],
        device=opts["device"],
        progress=not opts["as_json"],
    )
    if bounds is not None:
        report.choice = choose_alpha(report.results, bounds)
    if opts["report"] is not None:
        write_file_atomically(
            opts["report"],
            (report_json(report, with_answers=True) + "\n").encode(),
            force=opts["force"],
            commit=f"{opts['report']} was written",
        )
    if opts["plot"] is not None:
        title = f"{'tune' if bounds else 'eval'}: {Path(model).name}"[:80]
        chosen = report.choice["alpha"] if report.choice else None
        write_file_atomically(
            opts["plot"],
            eval_curves(report.results, title, plot_format, chosen),
            force=opts["force"],
            commit=f"{opts['plot']} was written",
        )
    text = results_table(report.results)
    if report.choice is not None:
        chosen = report.choice["alpha"]
        text += (
            "\n\nchosen alpha: " + format(chosen, "g")
            if chosen is not None
            else "\n\nno alpha meets the bounds:\n"
            + "\n".join(f"  alpha {v['alpha']:g}: {'; '.join(v['problems'])}" for v in report.choice["verdicts"])
        )
    if opts["as_json"]:
        click.echo(report_json(report))
    else:
        _echo_lines(text.split("\n"))
    return report


@cli.command("eval")
@click.argument("model")
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run this lock at run time (hooks, equal to the baked biases); without it MODEL is run as it is.",
)
@click.option("--alpha", "alphas", type=Number("alpha"), multiple=True, help="Lock strength (repeat for several).")
@click.option(
    "--reference",
    default=None,
    help="Without --lock: the unlocked model to measure KL drift against (e.g. the source).",
)
@eval_options
def eval_command(model, lock_path, alphas, reference, **opts):
    """Measure MODEL's harmful compliance, over-refusal, QA accuracy and KL drift (greedy answers)."""
    _run_evaluation(model, lock_path, alphas, reference, opts)


@cli.command()
@click.argument("model")
@click.option("--lock", "lock_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--alphas",
    type=NumberList("alpha"),
    default="0,1,2,3,4,6,8",
    show_default=True,
    help="Comma-separated strengths to sweep.",
)
@click.option(
    "--target-refusal",
    type=Number("target_refusal"),
    default=0.8,
    show_default=True,
    help="Harmful prompts refused at least this often.",
)
@click.option(
    "--max-over-refusal",
    type=Number("max_over_refusal"),
    default=None,
    help="Benign prompts refused at most this often [0.2; off when --max-over-refusal-rise is given].",
)
@click.option("--max-kl", type=Number("max_kl"), default=0.5, show_default=True, help="Nats per token on benign text.")
@click.option("--max-degenerate", type=Number("max_degenerate"), default=0.1, show_default=True)
@click.option(
    "--max-qa-drop",
    type=Number("max_qa_drop"),
    default=None,
    help="QA accuracy at most this far below the model's own at alpha 0 (e.g. 0.05; alpha 0 is added to the sweep).",
)
@click.option(
    "--max-over-refusal-rise",
    type=Number("max_over_refusal_rise"),
    default=None,
    help="Over-refusal at most this far above the model's own at alpha 0 (e.g. 0.1; alpha 0 is added to the sweep).",
)
@eval_options
def tune(
    model,
    lock_path,
    alphas,
    target_refusal,
    max_over_refusal,
    max_kl,
    max_degenerate,
    max_qa_drop,
    max_over_refusal_rise,
    **opts,
):
    """Sweep the lock's alpha on MODEL and pick the smallest that meets the bounds (exit 1 if none does)."""
    from .evaluate import TuneBounds

    sweep = sorted(set(alphas))  # each a finite number (NumberList), at least one
    if max_over_refusal is None:
        max_over_refusal = 1.0 if max_over_refusal_rise is not None else 0.2
    bounds = TuneBounds(target_refusal, max_over_refusal, max_kl, max_degenerate, max_qa_drop, max_over_refusal_rise)
    if bounds.relative and 0.0 not in sweep:
        sweep = [0.0] + sweep  # the relative bounds' reference: the model without the lock
    report = _run_evaluation(model, lock_path, sweep, None, opts, bounds)
    if report.choice["alpha"] is None:
        sys.exit(VERIFY_FAILED_EXIT)


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
    from .legacy import LEGACY_DEFAULT_ALPHA, import_legacy
    from .lock import save_lock, source_model_from_config
    from .outputs import check_output_file

    check_output_file(out, inputs=[legacy, *_local(model)], force=force)
    source_model = None
    if model is not None:
        config_path = Path(model)
        if config_path.is_file():
            from .untrusted import read_json

            source_model = source_model_from_config(read_json(config_path, "config", "config"))
        else:
            from .checkpoint import open_checkpoint

            ckpt = open_checkpoint(model)
            source_model = source_model_from_config(ckpt.config, ckpt.name, ckpt.revision)
    lock = import_legacy(
        legacy, source_model, default_alpha=LEGACY_DEFAULT_ALPHA if default_alpha is None else default_alpha
    )
    digest = save_lock(lock, out, force=force, commit=f"{out} was written")
    src = lock.source_model
    _emit(
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


def _interrupted_advice() -> str:
    """What a Ctrl-C before the commit point left on disk, as the interrupted code recorded it on its way
    (weightlock.commit.set_interrupt_advice); never guessed from the command line."""
    return "interrupted; " + (commit.interrupt_advice() or "the command did not finish")


def main(argv: list[str] | None = None) -> None:
    """The CLI. A Ctrl-C before the command's commit point (weightlock.commit) exits 130 and says what the disk
    holds; one after it (the output is final) changes nothing: the command finishes, exits 0 and says on
    stderr that the interruption came too late to stop it."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    code: int | str | None = 0
    with commit.cli_guard():
        try:
            try:
                cli.main(args=args, prog_name="weightlock", standalone_mode=False)
            finally:
                commit.command_ended()  # from here a Ctrl-C is ignored: only reporting is left
                failpoint("command-ended")
        except WeightlockError as e:
            if as_json:
                click.echo(json.dumps({"ok": False, **e.to_dict()}, indent=2))
            click.echo(f"weightlock: error: {printable(e.message)}", err=True)
            click.echo(f"  hint: {printable(e.hint or 'see weightlock --help')}", err=True)
            code = e.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            if commit.committed():  # (the handler never raises after the commit point; kept truthful anyway)
                click.echo(f"weightlock: interrupted after {printable('; '.join(commit.committed()))}", err=True)
            else:
                click.echo(printable(_interrupted_advice()), err=True)
                code = 130
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except SystemExit as e:  # a command's own exit status (verify: 1)
            code = e.code
        if commit.interrupted_late() and code == 0:
            done = commit.committed()
            click.echo(
                "weightlock: Ctrl-C ignored: it came after "
                + (printable("; ".join(done)) if done else "the command had finished")
                + "; nothing was undone",
                err=True,
            )
    failpoint("exiting")  # (a Ctrl-C from here on meets the console entry point's SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
