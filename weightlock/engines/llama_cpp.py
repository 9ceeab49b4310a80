"""Running a GGUF model in llama.cpp itself (llama-cpp-python), for verify, eval and the tests.

llama.cpp runs in a child process (``python -m weightlock.engines.llama_cpp REQUEST``): a
model llama.cpp refuses can abort the process, its log goes to stderr rather than ours,
and its OpenMP runtime never meets torch's. Requests and results travel as JSON and
``.npy`` files (no pickle) in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightlock.core.report import FAIL, NOT_RUN, PASS
from weightlock.errors import CheckpointError, EngineCannotRunHere, MissingDependencyError, WeightlockError
from weightlock.io.scratch import ScratchBeside

INSTALL_HINT = "bash scripts/install_llama_cpp.sh (compiles llama-cpp-python 0.3.36, about 5 minutes)"
LOG_LINES = 12
IMPORT_FAILED = 75  # the worker's exit status when llama_cpp is installed but cannot be imported (EX_TEMPFAIL)


class LlamaCppUnavailable(MissingDependencyError):
    pass


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _run(request: dict, timeout: float = 3600) -> tuple[dict, Path]:
    if not available():
        raise LlamaCppUnavailable("llama-cpp-python is not installed", hint=INSTALL_HINT)
    work = Path(tempfile.mkdtemp(prefix="weightlock-llama-cpp-"))
    (work / "request.json").write_text(json.dumps(request))
    process = subprocess.run(
        [sys.executable, "-m", "weightlock.engines.llama_cpp", str(work)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result_path = work / "result.json"
    if process.returncode != 0 or not result_path.exists():
        shutil.rmtree(work, ignore_errors=True)
        log = [line for line in process.stderr.splitlines() if line.strip()]
        # the engine, not the file: a broken install, or a build for another processor
        if process.returncode == IMPORT_FAILED:
            raise LlamaCppUnavailable(
                "llama-cpp-python is installed but cannot be imported: " + " | ".join(log[-2:]), hint=INSTALL_HINT
            )
        if process.returncode == -signal.SIGILL:
            raise EngineCannotRunHere(
                "llama.cpp stopped on an illegal instruction: llama-cpp-python was compiled for a processor with "
                "instructions this one lacks",
                hint="rebuild it on this machine: " + INSTALL_HINT,
            )
        errors = [line for line in log if "error" in line.lower() or "failed" in line.lower()] or log
        raise CheckpointError(
            f"llama.cpp could not run {Path(request['model']).name}: " + " | ".join(errors[-LOG_LINES:]),
            hint="the file is not one llama.cpp accepts; run `weightlock verify` on it",
        )
    return json.loads(result_path.read_text()), work


def load_check(path: str | os.PathLike) -> str:
    """Load the model in llama.cpp (every tensor must be one its graph creates); a line saying so."""
    result, work = _run({"action": "load", "model": str(path)})
    shutil.rmtree(work, ignore_errors=True)
    return f"llama.cpp {result['version']} loads it: {result['n_params']:,} parameters, vocabulary {result['n_vocab']}"


def logits(path: str | os.PathLike, token_lists: list[list[int]]) -> list[np.ndarray]:
    """Logits [tokens, vocab] (float32) at every position of each token list, one sequence at a time."""
    result, work = _run({"action": "logits", "model": str(path), "tokens": token_lists})
    try:
        return [np.load(work / name, allow_pickle=False) for name in result["files"]]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def generate(path: str | os.PathLike, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, without the end-of-sequence token) of each prompt."""
    result, work = _run({"action": "generate", "model": str(path), "tokens": prompt_ids, "max_new": max_new_tokens})
    shutil.rmtree(work, ignore_errors=True)
    return result["generated"]


def quantize(source: str | os.PathLike, destination: str | os.PathLike, file_type: str) -> None:
    """llama.cpp's own quantizer (``llama-quantize``): ``file_type`` such as Q8_0 or Q4_K_M."""
    _, work = _run({"action": "quantize", "model": str(source), "out": str(destination), "type": file_type})
    shutil.rmtree(work, ignore_errors=True)


class LlamaCppGenerator(ScratchBeside):
    """``eval --engine llama-cpp``: each alpha baked into a temporary GGUF beside the model, then served
    by llama.cpp, which is what a GGUF user deploys. Prompts arrive as token ids (the caller's tokenizer
    and template), answers leave as token ids."""

    def __init__(self, gguf_path: str | os.PathLike, bake: Callable[..., object]):
        """``bake``: :func:`weightlock.api.apply_lock` (passed in by the lab: engines sit below the dispatcher)."""
        if not available():
            raise LlamaCppUnavailable("--engine llama-cpp needs llama-cpp-python", hint=INSTALL_HINT)
        self.path, self.bake = Path(gguf_path), bake
        super().__init__(self.path)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, lock=None, alpha=None) -> list[list[int]]:
        if lock is None or alpha is None or alpha == 0:  # alpha 0: the model as it is
            return generate(self.path, prompt_ids, max_new_tokens)
        baked = self.scratch / f"alpha-{alpha:g}.gguf"
        self.bake(self.path, lock, out=baked, alpha=alpha, force=True)
        try:
            return generate(baked, prompt_ids, max_new_tokens)
        finally:
            baked.unlink(missing_ok=True)


def _worker(work: Path) -> None:
    try:
        import llama_cpp
    except Exception as e:  # a broken install (a missing shared library, a half-removed package)
        print(f"cannot import llama_cpp: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(IMPORT_FAILED) from None

    request = json.loads((work / "request.json").read_text())
    if request["action"] == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{request['type']}")
        status = llama_cpp.llama_model_quantize(request["model"].encode(), request["out"].encode(), params)
        if status != 0:
            raise SystemExit(f"error: llama_model_quantize failed with {status}")
        (work / "result.json").write_text(json.dumps({"version": llama_cpp.__version__}))
        return
    tokens: list[list[int]] = request.get("tokens", [])
    longest = max((len(t) for t in tokens), default=0) + int(request.get("max_new", 0))
    model = llama_cpp.Llama(
        model_path=request["model"],
        n_ctx=max(32, longest + 8),
        n_batch=max(32, longest + 8),
        logits_all=request["action"] == "logits",
        n_threads=os.cpu_count() or 1,
        seed=0,
        verbose=True,  # llama.cpp's log goes to stderr, which the parent reads on failure
    )
    result: dict = {"version": llama_cpp.__version__}
    if request["action"] == "load":
        result.update(n_params=llama_cpp.llama_model_n_params(model.model), n_vocab=model.n_vocab())
    elif request["action"] == "logits":
        files = []
        for i, sequence in enumerate(tokens):
            model.reset()
            model.eval(sequence)
            name = f"logits-{i}.npy"
            np.save(work / name, np.array(model.scores[: len(sequence)], dtype=np.float32), allow_pickle=False)
            files.append(name)
        result["files"] = files
    elif request["action"] == "generate":
        eos = model.token_eos()
        generated = []
        for sequence in tokens:
            model.reset()
            new: list[int] = []
            for token in model.generate(sequence, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                if token == eos or len(new) >= request["max_new"]:
                    break
                new.append(int(token))
            generated.append(new)
        result["generated"] = generated
    (work / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def check_loads_report(model, report) -> None:
    """``--engine llama-cpp``. Without llama-cpp-python the check cannot be done: exit 7, as for --engine vllm
    (a requested check never passes by not running); a build that cannot run on this processor: not run."""
    from weightlock.engines.llama_cpp import INSTALL_HINT, LlamaCppUnavailable, load_check
    from weightlock.errors import EngineCannotRunHere, MissingDependencyError

    try:
        message = load_check(model.path)
    except LlamaCppUnavailable as e:
        raise MissingDependencyError(
            f"verify --engine llama-cpp needs llama.cpp: {e.message}",
            hint=f"install it ({INSTALL_HINT}), or leave out --engine",
        ) from None
    except EngineCannotRunHere as e:
        report.add("llama.cpp", NOT_RUN, f"cannot run on this machine: {e.message}; {e.hint}")
        return
    except WeightlockError as e:
        report.add("llama.cpp", FAIL, e.message)
        return
    report.add("llama.cpp", PASS, message)
