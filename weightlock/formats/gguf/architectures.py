"""What llama.cpp does with an attention-output bias, per GGUF architecture, as data.

Read from llama.cpp's model graphs (``src/models/*.cpp`` of the version llama-cpp-python
0.3.36 vendors): an architecture whose graph creates ``blk.N.attn_output.bias`` with
``TENSOR_NOT_REQUIRED`` adds it when the file has one (the bias is *created*); one that
requires it already carries it (the lock is *added* to it); one whose graph has no such
tensor refuses a file that holds it ("wrong number of tensors"), so it is refused here.

Which rows the equivalence test against stock transformers proves on llama.cpp itself
(tests/test_gguf_llama_cpp.py) is the README's GGUF table; the other supported rows follow
the same graph code but are not claimed there until a test proves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightlock.errors import UnsupportedError

BIAS_OPTIONAL = "optional"  # created when absent; llama.cpp adds it if present
BIAS_EXISTING = "existing"  # the architecture always has one: the lock is added to it

OUTPUT_WEIGHT = "blk.{layer}.attn_output.weight"
OUTPUT_BIAS = "blk.{layer}.attn_output.bias"


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture
    bias: str | None  # BIAS_OPTIONAL, BIAS_EXISTING, or None: refused
    # Hugging Face model types whose locks fit without --allow-architecture-mismatch (the
    # converter writes e.g. Mistral and SmolLM2 as "llama")
    model_types: tuple[str, ...] = ()
    refuse: str | None = None

    def key(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"


_NO_BIAS = "llama.cpp's {} graph has no attn_output.bias, so it would refuse the locked file"

GGUF_ARCHITECTURES: tuple[GGUFArchitecture, ...] = (
    GGUFArchitecture("llama", BIAS_OPTIONAL, ("llama", "mistral")),
    GGUFArchitecture("granite", BIAS_OPTIONAL, ("granite",)),
    GGUFArchitecture("mistral3", BIAS_OPTIONAL, ("mistral3", "mistral", "ministral")),
    GGUFArchitecture("deci", BIAS_OPTIONAL, ("deci", "nemotron-nas")),
    GGUFArchitecture("phi2", BIAS_EXISTING, ("phi",)),
    GGUFArchitecture("starcoder2", BIAS_EXISTING, ("starcoder2",)),
    GGUFArchitecture("gptneox", BIAS_EXISTING, ("gpt_neox",)),
    *(
        GGUFArchitecture(name, None, refuse=_NO_BIAS.format(name))
        for name in ("qwen2", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "command-r", "olmo2", "cohere2")
    ),
)

RUNTIME_HINT = (
    "lock it as safetensors with weightlock and serve it with transformers or vLLM, "
    "or use an architecture from `weightlock inspect`'s GGUF table"
)


def gguf_architecture(name: object) -> GGUFArchitecture:
    for row in GGUF_ARCHITECTURES:
        if row.name == name:
            if row.refuse is not None:
                raise UnsupportedError(f"GGUF architecture {name} cannot be locked: {row.refuse}", hint=RUNTIME_HINT)
            return row
    raise UnsupportedError(
        f"GGUF architecture {name!r} is not one weightlock knows how llama.cpp treats",
        hint="supported: " + ", ".join(r.name for r in GGUF_ARCHITECTURES if r.bias is not None),
    )
