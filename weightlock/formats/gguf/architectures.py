"""What llama.cpp does with an attention-output bias, per GGUF architecture, as data.

Read from llama.cpp's model graphs (``src/models/*.cpp`` of the version llama-cpp-python
0.3.36 vendors): an architecture whose graph creates ``blk.N.attn_output.bias`` with
``TENSOR_NOT_REQUIRED`` adds it when the file has one (the bias is *created*); one that
requires it already carries it (the lock is *added* to it); one whose graph has no such
tensor refuses a file that holds it ("wrong number of tensors"), so it is refused here.

Which rows the equivalence test against stock transformers proves on llama.cpp itself
(tests/test_gguf_llama_cpp.py) is the README's GGUF table; the other supported rows follow
the same graph code but are not claimed there until a test proves them.

A ``qwen2`` file is locked by rewriting it as a ``llama`` file (:data:`QWEN2_AS_LLAMA`): llama.cpp's two
graphs differ, for a dense Qwen2 file, only in the RoPE mode and in what the ``llama`` graph would read that
``qwen2`` ignores; both are settled below, from the same sources:

- ``src/models/qwen2.cpp`` and ``src/models/llama.cpp``: the same norm, q/k/v (with optional biases,
  ``llama_model_base::create_tensor_qkv``), attention (scale 1/sqrt(head_dim): llama's ``f_attention_scale`` is
  never read for llama), SwiGLU MLP and tied-or-not output. ``qwen2`` alone adds an optional ``output.bias``;
  ``llama`` alone adds an optional ``attn_output.bias`` (what the lock needs), optional MLP biases (absent in a
  qwen2 file: qwen2 refuses them), ``rope_freqs`` (absent likewise), and MoE layers when ``expert_count`` > 0.
- ``src/llama-model.cpp: llama_model_rope_type``: ``llama`` rotates adjacent pairs (NORM), ``qwen2`` values
  half a head apart (NEOX). llama.cpp's converter (``conversion/llama.py: LlamaModel.permute``) permutes the
  rows of Q and K, weights and biases, within each head (K with the KV-head count) so that NORM computes what
  NEOX computes on the unpermuted rows; the rewrite applies the same permutation to the stored rows.
  A quantized row is whole quantization blocks, so rows move as byte spans, nothing is requantized.
- ``load_hparams``: ``llama`` requires ``rope.dimension_count`` to equal the head size (qwen2's graph asserts
  the same). Every other key is read by both from the architecture's prefix, so ``qwen2.*`` becomes ``llama.*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightlock.errors import UnsupportedError

BIAS_OPTIONAL = "optional"  # created when absent; llama.cpp adds it if present
BIAS_EXISTING = "existing"  # the architecture always has one: the lock is added to it

OUTPUT_WEIGHT = "blk.{layer}.attn_output.weight"
OUTPUT_BIAS = "blk.{layer}.attn_output.bias"


def layer_tensor_pattern(name: str) -> re.Pattern:
    """A tensor name with ``{layer}`` as a regular expression whose group 1 is the layer number (canonical
    decimal, at most 9 digits: what ggml's names hold)."""
    return re.compile(re.escape(name).replace(re.escape("{layer}"), "(0|[1-9][0-9]{0,8})"), re.ASCII)


@dataclass(frozen=True)
class GraphRewrite:
    """How a file of one llama.cpp architecture becomes an exactly equivalent file of another that has an
    optional attn_output.bias: metadata keys renamed from ``source``'s prefix to ``target``'s, rows permuted,
    and what ``target``'s graph would compute differently refused by name."""

    source: str
    target: str
    # (tensor name with {layer}, the head count its rows are grouped by: "heads" or "kv_heads")
    permuted: tuple[tuple[str, str], ...]
    # (regular expression over tensor names, why the target graph cannot reproduce it)
    refused_tensors: tuple[tuple[str, str], ...]
    # (key suffix, why): a positive value changes the target graph; absent or 0 is what the source graph does
    refused_counts: tuple[tuple[str, str], ...]


_PERMUTED_QK = (
    ("blk.{layer}.attn_q.weight", "heads"),
    ("blk.{layer}.attn_q.bias", "heads"),
    ("blk.{layer}.attn_k.weight", "kv_heads"),
    ("blk.{layer}.attn_k.bias", "kv_heads"),
)

QWEN2_AS_LLAMA = GraphRewrite(
    "qwen2",
    "llama",
    permuted=_PERMUTED_QK,
    refused_tensors=(
        (r"output\.bias", "llama.cpp's llama graph has no output bias (qwen2's adds one to the logits)"),
        (
            r"blk\.\d+\.attn_qkv\.(weight|bias)",
            "a fused QKV tensor: its Q and K rows would need the RoPE permutation inside the fused rows",
        ),
        (r"rope_freqs\.weight", "qwen2's graph ignores RoPE frequency factors; llama's would apply them"),
        (r"blk\.\d+\.ffn_(gate|up|down)\.bias", "qwen2's graph has no MLP biases; llama's would add them"),
        (r"blk\.\d+\.ffn_\w+_exps\.weight", "expert tensors: not a dense Qwen2 model"),
    ),
    refused_counts=(("expert_count", "llama's graph would build mixture-of-experts layers; qwen2's has none"),),
)


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture
    bias: str | None  # BIAS_OPTIONAL, BIAS_EXISTING, or None: refused
    # Hugging Face model types whose locks fit without --allow-architecture-mismatch (the
    # converter writes e.g. Mistral and SmolLM2 as "llama")
    model_types: tuple[str, ...] = ()
    refuse: str | None = None
    # apply rewrites such a file as another architecture that llama.cpp serves with the bias, exactly
    rewrite: GraphRewrite | None = None

    def key(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"


_NO_BIAS = (
    "llama.cpp's {} graph has no attn_output.bias, so it would refuse the locked file, and no llama.cpp "
    "architecture that has one computes the same graph (upstream llama.cpp would need an optional `bo`, "
    "attn_output.bias created with TENSOR_NOT_REQUIRED, in that architecture's loader)"
)

GGUF_ARCHITECTURES: tuple[GGUFArchitecture, ...] = (
    GGUFArchitecture("llama", BIAS_OPTIONAL, ("llama", "mistral")),
    GGUFArchitecture("granite", BIAS_OPTIONAL, ("granite",)),
    GGUFArchitecture("mistral3", BIAS_OPTIONAL, ("mistral3", "mistral", "ministral")),
    GGUFArchitecture("deci", BIAS_OPTIONAL, ("deci", "nemotron-nas")),
    GGUFArchitecture("phi2", BIAS_EXISTING, ("phi",)),
    GGUFArchitecture("starcoder2", BIAS_EXISTING, ("starcoder2",)),
    GGUFArchitecture("gptneox", BIAS_EXISTING, ("gpt_neox",)),
    GGUFArchitecture(
        "qwen2",
        None,
        ("qwen2",),
        refuse="llama.cpp's qwen2 graph has no attn_output.bias, so it would refuse the locked file; "
        "`weightlock apply` rewrites a qwen2 file as an exactly equivalent llama file, whose graph has one",
        rewrite=QWEN2_AS_LLAMA,
    ),
    *(
        GGUFArchitecture(name, None, refuse=_NO_BIAS.format(name))
        for name in ("qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "command-r", "olmo2", "cohere2")
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


def gguf_edit_architectures(name: object) -> tuple[GGUFArchitecture, GGUFArchitecture]:
    """(the file's own architecture, the architecture of the locked output): the same row, or for a file that
    apply rewrites (``rewrite``), its row and the rewrite target's."""
    row = architecture_row(name)
    if row is not None and row.rewrite is not None:
        return row, gguf_architecture(row.rewrite.target)
    row = gguf_architecture(name)
    return row, row


def architecture_row(name: object) -> GGUFArchitecture | None:
    """The table's row for ``name`` whatever it says (refused rows included); None when it has none."""
    return next((row for row in GGUF_ARCHITECTURES if row.name == name), None)
