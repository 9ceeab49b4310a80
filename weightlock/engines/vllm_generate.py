"""Greedy generation through vLLM for eval, when vLLM is installed (``--engine vllm``).

vLLM cannot run a lock by hooks, so each alpha is baked first: ``apply_lock`` writes a temporary
checkpoint (unchanged shards hardlinked, only the bias shard new) and vLLM serves that, which is also
exactly what a user deploys. Prompts arrive as token ids rendered by the same tokenizer and template as
the transformers path, so both engines see identical inputs; answers are decoded by the caller.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from weightlock.engines.vllm import AVX512_HINT, import_vllm, kernels_missing_here
from weightlock.errors import EngineCannotRunHere
from weightlock.io.scratch import ScratchBeside

CPU_KV_CACHE_BYTES = 256 << 20  # vLLM's CPU default claims most of the machine's memory for the cache


class VllmGenerator(ScratchBeside):
    def __init__(
        self,
        folder: str | os.PathLike,
        bake: Callable[..., object],
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        parallel: dict | None = None,
    ):
        """``bake``: :func:`weightlock.api.apply_lock` (passed in by the lab: engines sit below the dispatcher)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine starts in seconds
        import_vllm("eval --engine vllm", "use --engine transformers")
        self.folder, self.bake = Path(folder), bake
        self.dtype, self.max_model_len = dtype, max_model_len
        # tensor_parallel_size / pipeline_parallel_size, passed to vllm.LLM as given (1 and 1: one device)
        self.parallel = {k: v for k, v in (parallel or {}).items() if v != 1}
        super().__init__(self.folder)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, lock=None, alpha=None) -> list[list[int]]:
        """Greedy continuations (token ids) of each prompt, from the checkpoint with ``lock`` baked at ``alpha``."""
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        folder = self._baked(lock, alpha)
        kwargs = {}
        if not torch.cuda.is_available():
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        llm = LLM(
            model=str(folder),
            dtype=self.dtype,
            enforce_eager=True,
            skip_tokenizer_init=True,
            max_model_len=self.max_model_len,
            **self.parallel,
            **kwargs,
        )
        try:
            missing = _kernels_missing(llm)
            if missing:
                raise EngineCannotRunHere(
                    f"vLLM cannot serve {self.folder.name} on this machine: " + "; ".join(missing),
                    hint=f"{AVX512_HINT}; or use --engine transformers",
                )
            outputs = llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                SamplingParams(temperature=0, max_tokens=max_new_tokens),
                use_tqdm=False,
            )
            return [list(out.outputs[0].token_ids) for out in outputs]
        finally:
            del llm
            if folder != self.folder:
                shutil.rmtree(folder, ignore_errors=True)

    def _baked(self, lock, alpha) -> Path:
        if lock is None or alpha is None or alpha == 0:  # alpha 0: the model as it is
            return self.folder
        out = Path(tempfile.mkdtemp(prefix="alpha-", dir=self.scratch)) / "checkpoint"
        self.bake(self.folder, lock, out=out, alpha=alpha)
        return out


def _kernels_missing(llm) -> list[str]:
    """The kernels this machine's vLLM build lacks for the loaded model (engines.vllm.kernels_missing_here, run on
    the model in the engine): without this, vLLM fails in its first forward pass with an AttributeError."""
    try:
        results = llm.apply_model(kernels_missing_here)
    except Exception:  # the probe only explains; without it vLLM's own error stands (e.g. a multiprocess engine)
        return []
    return sorted({line for lines in results for line in lines})
