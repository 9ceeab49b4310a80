"""Next-token log-probs over the whole vocabulary from vLLM (CPU build) for checkpoint folders, as JSON.

Run with the vLLM venv (scripts/install_vllm_cpu.sh). tests/test_vllm.py compares the output with
transformers' log-softmax on the same folders. Greedy decoding of one token from fixed token ids;
the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a 64 MiB KV cache: vLLM's
default claims most of the machine's memory for the cache, and touching it took 65 s on 2 cores.
vLLM's CPU attention supports head_dim 32/64/128-style sizes, not 16, so test models use head_dim 64.

    .venv-vllm/bin/python scripts/vllm_logprobs.py --prompts '[[1, 5, 9], [4, 4, 8]]' DIR [DIR ...]

Output: {"DIR": [[logprob of token 0, token 1, ...] for each prompt], ...}
"""

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    prompts = json.loads(args.prompts)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = {}
    for folder in args.folders:
        llm = LLM(
            model=folder,
            dtype=args.dtype,
            enforce_eager=True,
            max_model_len=64,
            skip_tokenizer_init=True,
            max_num_seqs=len(prompts),
            max_logprobs=-1,
            kv_cache_memory_bytes=64 << 20,
        )
        vocab = llm.llm_engine.model_config.get_vocab_size()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            SamplingParams(max_tokens=1, temperature=0, logprobs=-1),
            use_tqdm=False,
        )
        rows = []
        for output in outputs:
            by_token = output.outputs[0].logprobs[0]
            rows.append([by_token[t].logprob for t in range(vocab)])
        results[folder] = rows
        del llm
    print(json.dumps(results))


if __name__ == "__main__":  # vLLM may spawn helper processes; the guard keeps them from rerunning this
    main()
