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

from . import __version__
from .errors import InvalidInputError, OutputError, WeightlockError

VERIFY_FAILED_EXIT = 1


def _emit(as_json: bool, data: dict, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightlock")
def cli() -> None:
    """Bake a SafetyLock into a checkpoint as o_proj biases, offline, and prove it loads."""


@cli.command()
@click.argument("checkpoint")
@click.option("--lock", "lock_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Lock file (.wlock).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--in-place", is_flag=True, help="Edit CHECKPOINT itself (no second copy); undo with `weightlock revert`.")
@click.option("--alpha", type=float, default=None, help="Lock strength; default: the lock's default_alpha. "
                                                        "Negative takes a lock off again.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--link-mode", type=click.Choice(["auto", "hardlink", "copy"]), default="auto", show_default=True,
              help="How unchanged shards are reused: hardlink when possible (auto), always, or copy.")
@click.option("--allow-architecture-mismatch", is_flag=True,
              help="Apply a lock made from another architecture of the same shape.")
@json_option
def apply(checkpoint, lock_path, out, in_place, alpha, force, link_mode, allow_architecture_mismatch, as_json):
    """Write a copy of CHECKPOINT (folder or cached Hub id) with the lock baked in, or edit it --in-place."""
    if (out is None) == (not in_place):
        raise InvalidInputError("give exactly one of --out and --in-place",
                                hint="--out DIR writes a new folder; --in-place edits CHECKPOINT itself")
    if in_place:
        from .inplace import apply_in_place
        result = apply_in_place(checkpoint, lock_path, alpha=alpha,
                                allow_architecture_mismatch=allow_architecture_mismatch, progress=not as_json)
    else:
        from .apply import apply_lock
        result = apply_lock(checkpoint, lock_path, out=out, alpha=alpha, force=force, link_mode=link_mode,
                            allow_architecture_mismatch=allow_architecture_mismatch, progress=not as_json)
    s = result.summary()
    text = (f"locked {len(s['locked_layers'])} layers at alpha {s['alpha']:g} -> {s['out']}\n"
            f"  added {s['tensors_added']} tensors, replaced {s['tensors_replaced']}, config sets {s['config_changes']['set']}"
            + (f", removes {s['config_changes']['removed']}" if s['config_changes']['removed'] else "")
            + (" (redeclared)" if s['redeclared'] else "") + "\n"
            f"  read {s['bytes_read_weights']:,} bytes of o_proj weights, wrote {s['bytes_written']:,} bytes, "
            f"{s['shards_linked']} files hardlinked, {s['files_copied']} copied, {s['seconds']:.2f}s")
    for item in s["left_out"]:
        text += f"\n  left out (weights without the lock): {item}"
    for warning in s["warnings"]:
        text += f"\n  warning: {warning}"
    _emit(as_json, {"ok": True, **s}, text)


@cli.command()
@click.argument("checkpoint")
@click.option("--deep", is_flag=True, help="Also scan every floating-point tensor for NaN/Inf (reads everything).")
@click.option("--no-loader-check", is_flag=True, help="Skip building the transformers class on the meta device.")
@click.option("--engine", type=click.Choice(["vllm"]), default=None,
              help="Also load the tensor names into this engine's own model class (vllm: needs vLLM installed).")
@json_option
def verify(checkpoint, deep, no_loader_check, engine, as_json):
    """Check that CHECKPOINT loads as written and holds the lock its record claims."""
    from .verify import report_json, verify_checkpoint

    report = verify_checkpoint(checkpoint, deep=deep, loader_check=not no_loader_check, engine=engine)
    if as_json:
        click.echo(report_json(report))
    else:
        marks = {"pass": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip"}
        for check in report.checks:
            click.echo(f"[{marks[check.status]}] {check.name}: {check.message}")
            for detail in check.details:
                click.echo(f"         {detail}")
        click.echo("verified: all checks hold" if report.ok else "NOT verified: see FAIL lines above")
    if not report.ok:
        sys.exit(VERIFY_FAILED_EXIT)


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@json_option
def revert(checkpoint, as_json):
    """Undo an in-place apply of CHECKPOINT, finished or interrupted, restoring the original bytes."""
    from .inplace import revert as revert_in_place

    result = revert_in_place(checkpoint)
    _emit(as_json, {"ok": True, **result},
          "\n".join([f"reverted {result['path']}" if result["reverted"] else f"tidied {result['path']}"]
                    + [f"  {action}" for action in result["actions"]]))


@cli.command("inspect")
@click.argument("target")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="For a lock: also draw its layer x head map (probe accuracy, kept heads outlined) as PNG.")
@json_option
def inspect_command(target, heatmap, as_json):
    """Describe a lock file or a checkpoint folder (or cached Hub id)."""
    from .describe import describe_checkpoint, describe_lock

    path = Path(target)
    if path.is_file():
        from .describe import heatmap_png
        from .lock import load_lock
        lock = load_lock(path)
        data = describe_lock(lock)
        if heatmap is not None:
            heatmap.write_bytes(heatmap_png(lock))
            data["heatmap"] = str(heatmap)
        m = data["manifest"]
        src = m["source_model"]
        lines = [f"lock {path.name} (sha256 {data['sha256'][:16]}...)",
                 f"  source model: {src.get('name') or '?'} {src['architecture']}, {src['num_hidden_layers']} "
                 f"layers x {src['num_attention_heads']} heads of {src['head_dim']}, hidden {src['hidden_size']}",
                 f"  made by: {m['creation']['method']} ({m['creation']['tool']}); default alpha "
                 f"{m['default_alpha']:g}; {m['num_heads_selected']} heads",
                 f"  scales: min {data['scales']['min']:.4g}, median {data['scales']['median']:.4g}, "
                 f"max {data['scales']['max']:.4g}",
                 "  heads per layer:"]
        lines += [f"    layer {layer:>3}: {heads}" for layer, heads in data["heads_per_layer"].items()]
    else:
        from .checkpoint import open_checkpoint
        data = describe_checkpoint(open_checkpoint(target))
        model = data["model"]
        lines = [f"checkpoint {data['path']}" + (f" ({data['name']}@{data['revision']})" if data["name"] else ""),
                 f"  model: {model.get('architecture')}"
                 + (f", {model['num_layers']} layers x {model['num_heads']} heads of {model['head_dim']}, "
                    f"hidden {model['hidden_size']}, {model['bias_flag']}" if "num_layers" in model
                    else f" (not supported: {model.get('reason')})"),
                 f"  layout: {data['layout']}, {data['tensors']} tensors, dtypes {data['dtypes']}"]
        lines += [f"    {s['file']}: {s['bytes']:,} bytes, {s['tensors']} tensors" for s in data["shards"]]
        locked = data["locked"]
        lines.append("  locked: no" if locked is None else
                     f"  locked: yes, alpha {locked['alpha']}, lock {str(locked['lock_sha256'])[:16]}..., "
                     f"layers {sorted(int(k) for k in (locked['locked_layers'] or {}))}, "
                     f"{locked['edits']} edit(s) recorded"
                     + (f"; redeclared from {locked['redeclared_from']}" if locked["redeclared_from"] else ""))
    _emit(as_json, data, "\n".join(lines))


@cli.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Safety preference pairs, JSON or JSONL (SafetyLock keys or prompt/chosen/rejected).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Lock file to write.")
@click.option("--heads", type=int, default=24, show_default=True, help="Heads to keep (48 is the other common choice).")
@click.option("--last-tokens", type=int, default=5, show_default=True, help="Answer tokens sampled per text.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=float, default=0.25, show_default=True, help="Fraction of pairs held out.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device-map", default=None, help='"auto" to spread a model too big for one device.')
@click.option("--system-prompt", default=None)
@click.option("--plain-template", is_flag=True, help="User:/Assistant: text instead of the chat template.")
@click.option("--gguf-file", default=None, help="Load MODEL's folder's GGUF file of this name (dequantised).")
@click.option("--limit", type=int, default=None, help="Use only the first N pairs.")
@click.option("--default-alpha", type=float, default=6.0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing lock file.")
@json_option
def forge(model, data, out, heads, last_tokens, seed, holdout, device, dtype, batch_size, device_map,
          system_prompt, plain_template, gguf_file, limit, default_alpha, force, as_json):
    """Make a lock from base MODEL (folder or cached Hub id) and safety preference pairs."""
    from .forge import ForgeSettings, forge_lock
    from .lock import save_lock

    if out.exists() and not force:
        raise OutputError(f"{out} already exists", hint="choose another --out, or pass --force to replace it")
    settings = ForgeSettings(heads=heads, last_tokens=last_tokens, seed=seed, holdout=holdout,
                             template="plain" if plain_template else "chat", system_prompt=system_prompt,
                             batch_size=batch_size, device=device, dtype=dtype, device_map=device_map,
                             gguf_file=gguf_file, default_alpha=default_alpha, limit=limit)
    lock = forge_lock(model, data, settings, progress=not as_json)
    digest = save_lock(lock, out)
    accuracy = lock.creation["details"]["probe_accuracy"]
    best = sorted((acc for row in accuracy for acc in row), reverse=True)[:heads]
    _emit(as_json, {"ok": True, "out": str(out), "sha256": digest, "heads_per_layer": {
        str(k): v for k, v in lock.heads_by_layer().items()}, "heldout_accuracy_of_kept": best},
          f"wrote {out}: {lock.num_heads_selected} heads in {len(lock.heads_by_layer())} layers, held-out probe "
          f"accuracy {min(best):.3f}..{max(best):.3f} (sha256 {digest[:16]}...)")


@cli.command("import-legacy")
@click.argument("legacy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Lock file to write.")
@click.option("--model", "model", default=None,
              help="Source model's config.json, checkpoint folder or cached Hub id "
                   "(needed unless the file is one of the published SafetyLock locks).")
@click.option("--default-alpha", type=float, default=None, help="Strength recorded as the lock's default [6].")
@click.option("--force", is_flag=True, help="Replace an existing lock file.")
@json_option
def import_legacy_command(legacy, out, model, default_alpha, force, as_json):
    """Convert a SafetyLock .safelock file (a pickle, read safely) to a .wlock lock."""
    from .legacy import LEGACY_DEFAULT_ALPHA, import_legacy
    from .lock import save_lock, source_model_from_config

    if out.exists() and not force:
        raise OutputError(f"{out} already exists", hint="choose another --out, or pass --force to replace it")
    source_model = None
    if model is not None:
        config_path = Path(model)
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text("utf-8"))
            except (OSError, ValueError) as e:
                raise InvalidInputError(f"{config_path} is not a readable JSON config ({e})") from None
            source_model = source_model_from_config(config)
        else:
            from .checkpoint import open_checkpoint
            ckpt = open_checkpoint(model)
            source_model = source_model_from_config(ckpt.config, ckpt.name, ckpt.revision)
    lock = import_legacy(legacy, source_model,
                         default_alpha=LEGACY_DEFAULT_ALPHA if default_alpha is None else default_alpha)
    digest = save_lock(lock, out)
    src = lock.source_model
    _emit(as_json, {"ok": True, "out": str(out), "sha256": digest, "heads": lock.num_heads_selected,
                    "layers": sorted(lock.heads_by_layer()), "source_model": src.to_dict()},
          f"wrote {out}: {lock.num_heads_selected} heads in {len(lock.heads_by_layer())} layers of "
          f"{src.name or src.architecture} (sha256 {digest[:16]}...)")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        cli.main(args=args, prog_name="weightlock", standalone_mode=False)
    except WeightlockError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, **e.to_dict()}, indent=2))
        click.echo(f"weightlock: error: {e.message}", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; no output was published", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
