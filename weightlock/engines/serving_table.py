"""Which engine serves an attention-output bias, as data: one row per engine and per class, ``model_type`` or
GGUF architecture weightlock writes (and the family classes an output may still declare).

A lock lives only in the ``o_proj`` / ``attn_output`` biases, so what matters is what each engine does with a
bias tensor when it builds the model: it **applies** it; it **drops** it (loads the file and serves the model
*unlocked*, with no error: the worst outcome); it **refuses** the file (an error at load); or it
**misconverts** the file (loads and serves a *different* model, with no error). Each engine picks the code
that builds the model by one thing: the config's first ``architectures`` entry, its ``model_type``, or a GGUF
file's ``general.architecture``; the rows are keyed by that.

Every row names the engine version it was established for and its evidence: a test of this repository, or
the place in that version's source that was read. :mod:`weightlock.engines.serving` turns the rows into
``verify``'s per-engine checks and ``apply``'s warnings; README.md's engine tables are rendered from here
(:func:`readme_section`, ``scripts/serving_table.py``), and tests/test_serving_table.py holds the three
together (and this table with the family table and the GGUF architecture table).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from weightlock.errors import InvalidInputError
from weightlock.formats import GGUF, SAFETENSORS

if TYPE_CHECKING:
    from weightlock.core.families import ArchitectureSpec

APPLIES = "applies"
DROPS = "drops"  # loads the file, serves the model without the bias, no error
REFUSES = "refuses"  # an error at load
MISCONVERTS = "misconverts"  # loads the file and serves another model than the checkpoint, no error
VERDICTS = (APPLIES, DROPS, REFUSES, MISCONVERTS)
SILENT = (DROPS, MISCONVERTS)  # served wrong without an error: what verify fails

# how an engine picks the code that builds the model (the key of its rows)
BY_CLASS = "architectures"  # config.json "architectures"[0]
BY_MODEL_TYPE = "model_type"  # config.json "model_type"
BY_GGUF_ARCHITECTURE = "general.architecture"  # the GGUF metadata key

# Conditions of a row, evaluated on the checkpoint, under which the engine serves another model: the q/k biases
# are non-zero (a converter that permutes the rows of Q and K weights and not those of their biases), and a
# Granite-style logits_scaling other than 1 (a Transformers backend that scales logits by logit_scale only)
NONZERO_QK_BIAS = "nonzero q/k biases"
LOGITS_SCALING = "logits_scaling other than 1"
# and one under which it refuses the file: an output projection of its own (an engine whose class always ties
# the output projection to the embeddings has no parameter for a stored lm_head.weight)
UNTIED_LM_HEAD = "an lm_head of its own"
CONDITIONS = (NONZERO_QK_BIAS, LOGITS_SCALING, UNTIED_LM_HEAD)

# test evidence
VLLM_TEST = "tests/test_vllm.py::test_architecture_table_says_what_vllm_does (vLLM's own loader takes the output; a copy declaring the family's own class loses the bias)"  # noqa: E501
FAMILIES_TEST = (
    "tests/test_families.py::test_family_edit_equals_runtime_hooks (stock transformers equals the hooked model)"  # noqa: E501
)
LLAMA_CPP_TEST = "tests/test_gguf_llama_cpp.py::test_llama_cpp_logprobs_equal_hooked_transformers (llama.cpp itself)"
TRANSFORMERS_GGUF_TEST = "tests/test_serving_table.py::test_transformers_gguf_rows_are_what_transformers_builds"


@dataclass(frozen=True)
class Engine:
    name: str  # the --engines value
    title: str  # how messages name it
    version: str  # what the rows were established for
    picks: dict[str, str]  # format -> how it picks its code (BY_*), for the formats it loads
    not_read: dict[str, str] = field(default_factory=dict)  # format -> why it does not load that format
    runs: str | None = None  # an engine whose GGUF rows hold here: this one runs that one's code
    runs_evidence: str = ""  # how it is known to run it
    use: str = ""  # what the name covers


@dataclass(frozen=True)
class Row:
    engine: str
    format: str
    target: str  # an architectures name, a model_type or a GGUF general.architecture (by the engine's picks)
    verdict: str  # what the engine does with a present o_proj / attn_output bias
    why: str  # one phrase: the code that decides
    evidence: str  # a test here, or "read in the source at <file>:<line> (<symbol>)" of the version
    # the config flag the engine's class reads to create the bias: with the flag off the class has no bias
    # parameter, and the engine does ``off`` instead
    reads: str | None = None
    off: str = DROPS
    backend: bool = False  # the engine serves it through its Transformers backend (transformers' own class)
    fix: str | None = None  # an "architectures" value that makes this engine apply it (an exact declaration)
    misconverts_if: str | None = None  # a condition (CONDITIONS) under which the verdict is MISCONVERTS
    refuses_if: str | None = None  # a condition (CONDITIONS) under which the verdict is REFUSES
    note: str = ""  # what else a user should know
    version: str = ""  # the engine version the row holds for (the engine's when empty)


_ENGINES = (
    Engine(
        "transformers",
        "transformers",
        "5.23.0",
        {SAFETENSORS: BY_MODEL_TYPE, GGUF: BY_GGUF_ARCHITECTURE},
        use="AutoModelForCausalLM.from_pretrained(folder), or (folder, gguf_file=...) for a GGUF file",
    ),
    Engine(
        "vllm",
        "vLLM",
        "0.32.0",
        {SAFETENSORS: BY_CLASS},
        {GGUF: "vLLM 0.32 has no GGUF loader (vllm/model_executor/model_loader/__init__.py: no 'gguf' load format)"},
        use="vllm serve / vllm.LLM on a folder",
    ),
    Engine(
        "sglang",
        "SGLang",
        "0.5.23",
        {SAFETENSORS: BY_CLASS, GGUF: BY_GGUF_ARCHITECTURE},
        use="sglang.launch_server on a folder or a .gguf file",
    ),
    Engine(
        "tgi",
        "TGI",
        "3.3.7",
        {SAFETENSORS: BY_MODEL_TYPE},
        {GGUF: "TGI's default (CUDA) server loads safetensors; its llama.cpp backend runs GGUF files with llama.cpp"},
        use="text-generation-launcher on a folder (the flash-attention server)",
    ),
    Engine(
        "mlx-lm",
        "mlx-lm",
        "0.32.2",
        {SAFETENSORS: BY_MODEL_TYPE},
        {GGUF: "mlx-lm loads model*.safetensors only (mlx_lm/utils.py: load_model)"},
        use="mlx_lm.load, mlx_lm.generate, mlx_lm.convert, and mlx_lm.server or mlx_lm.chat on one machine",
    ),
    Engine(
        "mlx-lm-distributed",
        "mlx-lm distributed",
        "0.32.2",
        {SAFETENSORS: BY_MODEL_TYPE},
        {GGUF: "mlx-lm loads model*.safetensors only (mlx_lm/utils.py: load_model)"},
        use="mlx_lm.server, mlx_lm.chat or mlx_lm.benchmark across several machines (mlx_lm.utils.sharded_load)",
    ),
    Engine(
        "exllamav3",
        "exllamav3",
        "1.4.1",
        {SAFETENSORS: BY_CLASS},
        {GGUF: "exllamav3 loads safetensors folders (EXL3 or unquantized) only"},
        use="exllamav3's loader on a folder, and its converter to EXL3 (which keeps a bias it finds)",
    ),
    Engine(
        "ollama-create",
        "ollama create",
        "0.30.0",
        {SAFETENSORS: BY_CLASS},
        {GGUF: "a GGUF file is imported as it is: see the ollama engine"},
        use="ollama create from a safetensors folder (Ollama's own converter writes a GGUF; v0.30.0 to v0.32.15)",
    ),
    Engine(
        "llama.cpp",
        "llama.cpp",
        "0c1e57098",
        {GGUF: BY_GGUF_ARCHITECTURE},
        {
            SAFETENSORS: "llama.cpp loads GGUF files: lock the GGUF file; a locked folder that declares "
            "LlamaForCausalLM (Llama, Mistral, Qwen2, Phi-3 outputs) also converts with convert_hf_to_gguf.py, "
            "which keeps attn_output.bias (tests/test_gguf_llama_cpp.py and tests/test_gguf_qwen2_llama_cpp.py); "
            "the converter does not take TransformersForCausalLM outputs"
        },
        use="llama-cli, llama-server (the commit llama-cpp-python 0.3.36 vendors)",
    ),
    Engine(
        "llama-cpp-python",
        "llama-cpp-python",
        "0.3.36",
        {GGUF: BY_GGUF_ARCHITECTURE},
        {SAFETENSORS: "llama-cpp-python loads GGUF files"},
        runs="llama.cpp",
        use="llama_cpp.Llama(model_path=...), and its server",
        runs_evidence="llama-cpp-python 0.3.36 vendors llama.cpp 0c1e57098 (its CHANGELOG); the llama.cpp tests "
        "run through it",
    ),
    Engine(
        "ollama",
        "Ollama",
        "0.30.0",
        {GGUF: BY_GGUF_ARCHITECTURE},
        {SAFETENSORS: "Ollama serves GGUF files; `ollama create` imports a folder (the ollama-create engine)"},
        runs="llama.cpp",
        runs_evidence="read in the source at ollama v0.30.0 llm/server.go:107 (NewLlamaServer: every GGML model is "
        "served by the upstream llama-server, llama.cpp b9452 in v0.30.0, b10488 in v0.32.15); llama/compat only "
        "translates Ollama's own published files",
        use="ollama run / serve of a GGUF model (FROM ./file.gguf), from v0.30.0 on",
    ),
    Engine(
        "lm-studio",
        "LM Studio",
        "llama.cpp engine",
        {GGUF: BY_GGUF_ARCHITECTURE},
        {SAFETENSORS: "LM Studio's llama.cpp engine loads GGUF files"},
        runs="llama.cpp",
        runs_evidence="inferred: LM Studio's GGUF engine is a build of llama.cpp; its source is not public and "
        "was not read",
        use="LM Studio with a GGUF model",
    ),
)
ENGINES: dict[str, Engine] = {e.name: e for e in _ENGINES}


def _rows(engine: str, fmt: str, specs: list[tuple], **common) -> list[Row]:
    return [
        Row(engine, fmt, target, verdict, why, evidence, **{**common, **extra})
        for target, verdict, why, evidence, extra in specs
    ]


_TF = "read in the source at transformers 5.23.0"
_TF_GGUF_DROP = (
    "its GGUF reader builds the config from the file's metadata, which has no attention_bias (off), and "
    "skips a tensor its class has no parameter for"
)
_TRANSFORMERS = _rows(
    "transformers",
    SAFETENSORS,
    [
        (t, APPLIES, "its class creates the o_proj bias when the family's flag is on", FAMILIES_TEST, {"reads": flag})
        for t, flag in (
            ("llama", "attention_bias"),
            ("qwen3", "attention_bias"),
            ("qwen3_moe", "attention_bias"),
            ("gemma", "attention_bias"),
            ("gemma2", "attention_bias"),
            ("gemma3_text", "attention_bias"),
            ("olmo2", "attention_bias"),
            ("granite", "attention_bias"),
            ("cohere", "attention_bias"),
            ("starcoder2", "use_bias"),
            ("gpt_neox", "attention_bias"),
            ("phi", None),
            ("gpt_oss", "attention_bias"),
            ("granitemoe", "attention_bias"),
        )
    ],
) + _rows(
    "transformers",
    GGUF,
    [
        (
            "llama",
            DROPS,
            _TF_GGUF_DROP,
            f"{TRANSFORMERS_GGUF_TEST}; {_TF} modeling_gguf_pytorch_utils.py:803 (load_gguf_checkpoint: "
            "`if name not in tensor_key_mapping: continue`)",
            {"note": "this is why weightlock's eval refuses such a file"},
        ),
        (
            "starcoder2",
            APPLIES,
            "its config's use_bias defaults on, so attn_output.bias maps to o_proj.bias",
            TRANSFORMERS_GGUF_TEST,
            {},
        ),
        *(
            (
                arch,
                REFUSES,
                "its GGUF reader does not take this architecture",
                f"{TRANSFORMERS_GGUF_TEST}; {_TF} modeling_gguf_pytorch_utils.py:649 (GGUF_SUPPORTED_ARCHITECTURES)",
                {},
            )
            for arch in ("granite", "mistral3", "deci", "phi2", "gptneox")
        ),
    ],
)

# the families weightlock redeclares (their own classes have no o_proj bias: the reason it redeclares them), as a
# folder that still declares them would be served: a copy edited back, or another tool's output
_REDECLARED_DROP = (
    "its class has no o_proj bias, and from_pretrained drops an unexpected tensor with a warning, not an error"
)
_TRANSFORMERS += _rows(
    "transformers",
    SAFETENSORS,
    [
        (t, DROPS, _REDECLARED_DROP, f"{_TF} models/{t}/modeling_{t}.py:{line} (o_proj: bias=False)", {})
        for t, line in (("qwen2", 184), ("mistral", 136), ("mixtral", 286), ("phi3", 204))
    ],
    note="weightlock writes these families as Llama (or GraniteMoe), whose class has the bias",
)

_VLLM_DROP = "vLLM's own class has no o_proj bias and its load_weights skips the tensor"
_VLLM_BACKEND_NOTE = (
    "vLLM's Transformers backend scales logits by logit_scale and ignores Granite's logits_scaling (read in "
    "vllm 0.32.0 model_executor/models/transformers/causal.py:62): a granite or granitemoe model whose "
    "logits_scaling is not 1 is served with other probabilities"
)
_VLLM = _rows(
    "vllm",
    SAFETENSORS,
    [
        ("LlamaForCausalLM", APPLIES, "its own class creates the bias from attention_bias", VLLM_TEST, {}),
        *(
            (c, APPLIES, "its own class creates the bias from the family's flag", VLLM_TEST, {})
            for c in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "GptOssForCausalLM")
        ),
        *(
            (
                c,
                APPLIES,
                "served through its Transformers backend (transformers' class)",
                VLLM_TEST,
                {"backend": True, "note": _VLLM_BACKEND_NOTE, "misconverts_if": LOGITS_SCALING},
            )
            for c in ("TransformersForCausalLM", "TransformersMoEForCausalLM")
        ),
        *(
            (c, APPLIES, "served through its Transformers backend (transformers' class)", VLLM_TEST, {"backend": True})
            for c in (
                "Olmo2ForCausalLM",
                "Starcoder2ForCausalLM",
                "GPTNeoXForCausalLM",
                "PhiForCausalLM",
            )
        ),
        *(
            (
                c,
                DROPS,
                _VLLM_DROP,
                f"read in the source at vllm 0.32.0 model_executor/models/{module}.py:{line} (o_proj: bias=False)",
                {"note": "weightlock writes this family as Llama (or GraniteMoe), which vLLM serves with the bias"},
            )
            for c, module, line in (("Qwen2ForCausalLM", "qwen2", 169), ("MixtralForCausalLM", "mixtral", 192))
        ),
        *(
            (c, DROPS, _VLLM_DROP, VLLM_TEST, {"fix": fix})
            for c, fix in (
                ("Qwen3ForCausalLM", "TransformersForCausalLM"),
                ("Qwen3MoeForCausalLM", "TransformersMoEForCausalLM"),
                ("GemmaForCausalLM", "TransformersForCausalLM"),
                ("CohereForCausalLM", "TransformersForCausalLM"),
                ("GraniteMoeForCausalLM", "TransformersMoEForCausalLM"),
            )
        ),
    ],
    reads=None,
)
# vLLM's own classes read the family's flag; the Transformers backend creates what transformers' class does
_VLLM = [
    replace(r, reads="attention_bias")
    if r.verdict == APPLIES and not r.backend and r.target != "GptOssForCausalLM"
    else r
    for r in _VLLM
]

_SG = "read in the source at sglang 0.5.23 sglang/srt/"
_SG_SKIP = "its load_weights skips a .bias it has no parameter for"
_SG_BACKEND_NOTE = (
    "SGLang's Transformers backend scales logits by logit_scale and ignores Granite's logits_scaling "
    "(models/transformers.py:1123): a granite or granitemoe model whose logits_scaling is not 1 is served with "
    "other probabilities"
)
_SGLANG = _rows(
    "sglang",
    SAFETENSORS,
    [
        (
            "LlamaForCausalLM",
            APPLIES,
            "its own class creates the o_proj bias from attention_bias",
            f"{_SG}models/llama.py:339 (LlamaDecoderLayer: attention_bias or bias) and :219 (o_proj bias)",
            {"reads": "attention_bias"},
        ),
        *(
            (
                c,
                APPLIES,
                "served through its Transformers backend: transformers' class, picked by model_type, with its "
                "Linear layers replaced by SGLang's keeping their bias",
                f"{_SG}models/transformers.py:620 (AutoModel.from_config) and :221 (bias=linear.bias is not None)",
                {"backend": True, "note": _SG_BACKEND_NOTE, "misconverts_if": LOGITS_SCALING},
            )
            for c in ("TransformersForCausalLM", "TransformersMoEForCausalLM")
        ),
        (
            "GPTNeoXForCausalLM",
            APPLIES,
            "no SGLang class of that name: served through its Transformers backend",
            f"{_SG}model_loader/utils.py:230 (get_model_architecture: resolve_transformers_arch) and "
            "models/transformers.py:620",
            {"backend": True},
        ),
        *(
            (
                c,
                APPLIES,
                "its own class creates the o_proj bias from the family's flag",
                f"{_SG}{where}",
                {"reads": flag},
            )
            for c, flag, where in (
                ("Gemma2ForCausalLM", "attention_bias", "models/gemma2.py:146 (o_proj bias=config.attention_bias)"),
                (
                    "Gemma3ForCausalLM",
                    "attention_bias",
                    "models/gemma3_causal.py:180 (o_proj bias=config.attention_bias)",
                ),
                ("Olmo2ForCausalLM", "attention_bias", "models/olmo2.py:161 (o_proj bias=config.attention_bias)"),
                ("Starcoder2ForCausalLM", "use_bias", "models/starcoder2.py:99 (o_proj bias=self.use_bias)"),
                ("GptOssForCausalLM", "attention_bias", "models/gpt_oss.py:436 (o_proj bias=attention_bias)"),
                ("Qwen3ForCausalLM", "attention_bias", "models/qwen3.py:209 (o_proj bias=attention_bias)"),
                ("Qwen3MoeForCausalLM", "attention_bias", "models/qwen3_moe.py:539 (o_proj bias=attention_bias)"),
            )
        ),
        (
            "PhiForCausalLM",
            APPLIES,
            "its own class always has the dense bias",
            f"{_SG}models/phi.py:54 (dense = RowParallelLinear, bias defaults to True: layers/linear.py:1585)",
            {},
        ),
        (
            "GraniteForCausalLM",
            DROPS,
            f"its own Granite class has no o_proj bias and {_SG_SKIP}",
            f"{_SG}models/granite.py:179 (o_proj bias=False) and :467 (load_weights)",
            {
                "note": "no exact declaration fixes it: TransformersForCausalLM would serve the bias, but SGLang's "
                "Transformers backend (like vLLM's) ignores Granite's logits_scaling (models/transformers.py:1123 "
                "reads logit_scale), which changes the probabilities of every answer; serve Granite with another "
                "engine"
            },
        ),
        *(
            (c, DROPS, f"its own class has no o_proj bias and {_SG_SKIP}", f"{_SG}{where}", {"fix": fix})
            for c, fix, where in (
                ("GemmaForCausalLM", "TransformersForCausalLM", "models/gemma.py:125 (o_proj bias=False) and :401"),
                ("CohereForCausalLM", "TransformersForCausalLM", "models/commandr.py:190 (o_proj bias=False) and :416"),
                (
                    "GraniteMoeForCausalLM",
                    "TransformersMoEForCausalLM",
                    "models/granitemoe.py:259 (o_proj bias=False) and models/mixtral.py:464 (the load_weights it uses)",
                ),
            )
        ),
    ],
) + _rows(
    "sglang",
    GGUF,
    [
        (
            "llama",
            DROPS,
            "its GGUF loader builds the config with transformers' GGUF reader (attention_bias off) and maps only "
            "the tensors transformers' class has, skipping the rest",
            f"{_SG}utils/hf_transformers/config.py:360 (gguf_file), model_loader/loader.py:3083 "
            "(GGUFModelLoader._get_gguf_weights_map) and model_loader/weight_utils.py:1552 "
            "(gguf_quant_weights_iterator)",
            {"note": "a config.json beside the .gguf file overrides the file's metadata (not checked here)"},
        ),
        (
            "starcoder2",
            APPLIES,
            "transformers' Starcoder2 config has use_bias on by default, so attn_output.bias is mapped",
            f"{_SG}model_loader/loader.py:3083 and models/starcoder2.py:99",
            {},
        ),
        *(
            (
                arch,
                REFUSES,
                "its GGUF loader takes the config from transformers' GGUF reader, which refuses this architecture",
                f"{_SG}utils/hf_transformers/config.py:360; {TRANSFORMERS_GGUF_TEST}",
                {},
            )
            for arch in ("granite", "mistral3", "deci", "phi2", "gptneox")
        ),
    ],
)

_TGI = "read in the source at text-generation-inference v3.3.7 server/text_generation_server/models/"
_TGI_FALLBACK = (
    "no TGI class for this model type: get_model falls back to transformers' AutoModelForCausalLM (transformers "
    "4.51.3, server/requirements_cuda.txt), whose class creates the o_proj bias from attention_bias"
)
_TGI_DROP = "its own class has no o_proj bias, and TGI fetches tensors by name, so the stored one is never read"
_TGI_ROWS = _rows(
    "tgi",
    SAFETENSORS,
    [
        (
            "llama",
            APPLIES,
            "FlashLlamaForCausalLM creates the o_proj bias from attention_bias",
            f"{_TGI}__init__.py:993 and custom_modeling/flash_llama_modeling.py:191",
            {"reads": "attention_bias"},
        ),
        (
            "granite",
            APPLIES,
            "served by FlashLlamaForCausalLM, which creates the o_proj bias from attention_bias",
            f"{_TGI}__init__.py:993 and custom_modeling/flash_llama_modeling.py:191",
            {"reads": "attention_bias"},
        ),
        (
            "cohere",
            APPLIES,
            "FlashCohereForCausalLM creates the o_proj bias from attention_bias",
            f"{_TGI}custom_modeling/flash_cohere_modeling.py:255",
            {"reads": "attention_bias"},
        ),
        (
            "starcoder2",
            APPLIES,
            "FlashStarcoder2ForCausalLM creates the o_proj bias from use_bias",
            f"{_TGI}custom_modeling/flash_starcoder2_modeling.py:215",
            {"reads": "use_bias"},
        ),
        (
            "gpt_neox",
            APPLIES,
            "its own class always loads the dense bias",
            f"{_TGI}custom_modeling/flash_neox_modeling.py:136",
            {},
        ),
        (
            "phi",
            APPLIES,
            "its own class always loads the dense bias",
            f"{_TGI}custom_modeling/flash_phi_modeling.py:148",
            {},
        ),
        *(
            (
                t,
                APPLIES,
                _TGI_FALLBACK,
                f"{_TGI}__init__.py:1742 (the fallback); transformers 4.51.3 models/{path}",
                {"reads": "attention_bias", "backend": True},
            )
            for t, path in (
                ("qwen3", "qwen3/modeling_qwen3.py:192"),
                ("qwen3_moe", "qwen3_moe/modeling_qwen3_moe.py:159"),
                ("olmo2", "olmo2/modeling_olmo2.py:159"),
                ("granitemoe", "granitemoe/modeling_granitemoe.py:431"),
            )
        ),
        *(
            (t, DROPS, _TGI_DROP, f"{_TGI}{where}", {"note": "no declaration changes it: TGI picks by model_type"})
            for t, where in (
                ("gemma", "__init__.py:1071 and custom_modeling/flash_gemma_modeling.py:195 (bias=False)"),
                ("gemma2", "__init__.py:1106 and custom_modeling/flash_gemma2_modeling.py:216 (bias=False)"),
                ("gemma3_text", "__init__.py:1141 and custom_modeling/flash_gemma3_modeling.py:182 (bias=False)"),
            )
        ),
        (
            "gpt_oss",
            REFUSES,
            "no TGI class, and the transformers it pins (4.51.3) has no gpt_oss: 'Unsupported model type'",
            f"{_TGI}__init__.py:1797",
            {},
        ),
    ],
)

_MLX = "read in the source at mlx-lm 0.32.2 mlx_lm/"
_MLX_STRICT = (
    "utils.py:599 (load_model: load_weights strict) and mlx 0.32.2 mlx/nn/layers/base.py:186 "
    "('Received parameters not in model')"
)
_MLX_LENIENT = (
    "utils.py:803 (sharded_load: load_model(strict=False)) and mlx 0.32.2 mlx/nn/layers/base.py:339 "
    "(Module.update(strict=False) skips what the model lacks)"
)
_MLX_NO_SHARD = "utils.py:751 (sharded_load: 'The model does not support any sharding')"
# model_type -> (the flag its class reads: None when the bias is always there, "" when never; o_proj line;
# whether the class can be sharded across machines)
_MLX_CLASSES = {
    "llama": ("attention_bias", "models/llama.py:64", True),
    "qwen3": ("", "models/qwen3.py:58", True),
    "qwen3_moe": ("", "models/qwen3_moe.py:56", True),
    "gemma": ("", "models/gemma.py:51", False),
    "gemma2": ("", "models/gemma2.py:55", False),
    "gemma3_text": ("", "models/gemma3_text.py:51", False),
    "olmo2": ("attention_bias", "models/olmo2.py:57", False),
    "granite": ("attention_bias", "models/granite.py:51", False),
    "cohere": ("attention_bias", "models/cohere.py:58", False),
    "starcoder2": (None, "models/starcoder2.py:41", False),
    "gpt_neox": (None, "models/gpt_neox.py:57", False),
    "phi": (None, "models/phi.py:58", False),
    "gpt_oss": (None, "models/gpt_oss.py:71", True),
    "granitemoe": ("attention_bias", "models/granitemoe.py:52", False),
}
# classes that have no lm_head: the output is the embedding, whatever tie_word_embeddings says
_MLX_ALWAYS_TIED = {"cohere": "models/cohere.py:187 (embed_tokens.as_linear)"}


def _mlx_row(engine: str, model_type: str) -> Row:
    flag, where, shards = _MLX_CLASSES[model_type]
    if engine == "mlx-lm-distributed" and not shards:
        return Row(
            engine,
            SAFETENSORS,
            model_type,
            REFUSES,
            "its class has no shard or pipeline method, so sharded_load refuses it",
            f"{_MLX}{_MLX_NO_SHARD}",
        )
    strict = engine == "mlx-lm"
    if flag == "":
        return Row(
            engine,
            SAFETENSORS,
            model_type,
            REFUSES if strict else DROPS,
            "its class has no o_proj bias, "
            + ("and load is strict" if strict else "and sharded_load loads non-strictly, skipping the tensor"),
            f"{_MLX}{where} (bias=False); {_MLX_STRICT if strict else _MLX_LENIENT}",
        )
    tied = _MLX_ALWAYS_TIED.get(model_type)
    return Row(
        engine,
        SAFETENSORS,
        model_type,
        APPLIES,
        "its class creates the o_proj bias" + (f" from {flag}" if flag else " always"),
        f"{_MLX}{where}" + (f"; {_MLX}{tied} (the output is always the tied embedding)" if tied else ""),
        reads=flag,
        off=REFUSES if strict else DROPS,
        refuses_if=UNTIED_LM_HEAD if tied and strict else None,
        note="its class always ties the output to the embeddings, so a stored lm_head.weight is not in the model "
        "(the published Cohere models are tied)"
        if tied and strict
        else "",
    )


_MLX_ROWS = [_mlx_row(engine, t) for engine in ("mlx-lm", "mlx-lm-distributed") for t in _MLX_CLASSES]

# output classes for which neither exllamav3 nor ollama's converter has a class (both refuse them)
_NO_CLASS_IN_EXLLAMA_OR_OLLAMA = (
    "TransformersForCausalLM",
    "TransformersMoEForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "Starcoder2ForCausalLM",
    "GPTNeoXForCausalLM",
    "PhiForCausalLM",
)
_EXL = "read in the source at exllamav3 1.4.1 exllamav3/"
_EXL_APPLIES = (
    "modules/attn.py:300 (o_proj is a Linear), modules/linear.py:211 and :407 (a .bias is loaded when present, "
    "unquantized or EXL3), modules/quant/fp16.py:87 and exl3.py:217 (added)"
)
_EXLLAMA = _rows(
    "exllamav3",
    SAFETENSORS,
    [
        *(
            (
                c,
                APPLIES,
                "its class loads any o_proj .bias the folder holds",
                f"{_EXL}architecture/{f}; {_EXL_APPLIES}",
                {},
            )
            for c, f in (
                ("LlamaForCausalLM", "llama.py:11"),
                ("Gemma2ForCausalLM", "gemma2.py:11"),
                ("Gemma3ForCausalLM", "gemma3.py:151"),
                ("GptOssForCausalLM", "gpt_oss.py:12"),
            )
        ),
        *(
            (
                c,
                REFUSES,
                "not an exllamav3 architecture: 'Unknown architecture'",
                f"{_EXL}model/config.py:236 (architecture/architectures.py lists the classes)",
                {"note": "it has no Transformers backend"} if c.startswith("Transformers") else {},
            )
            for c in _NO_CLASS_IN_EXLLAMA_OR_OLLAMA
        ),
    ],
)

_OL = "read in the source at ollama v0.30.0 convert/"
_OLLAMA_CREATE = _rows(
    "ollama-create",
    SAFETENSORS,
    [
        (
            "LlamaForCausalLM",
            APPLIES,
            "its llama converter writes o_proj.bias as attn_output.bias, which llama.cpp's llama graph adds",
            f"{_OL}convert_llama.go:181 (Replacements) and llama.cpp src/models/llama.cpp:57",
            {
                "misconverts_if": NONZERO_QK_BIAS,
                "note": "it permutes the rows of the q/k weights for llama.cpp's RoPE but not those of the q/k "
                "biases (convert_llama.go:119): with non-zero q/k biases (a Qwen2 output) it serves another "
                "model; lock the GGUF file instead",
            },
        ),
        (
            "GptOssForCausalLM",
            APPLIES,
            "its gpt-oss converter writes o_proj.bias as attn_output.bias, which llama.cpp's gpt-oss graph requires",
            f"{_OL}convert_gptoss.go:168 (Replacements) and llama.cpp src/models/openai-moe.cpp:49",
            {},
        ),
        *(
            (
                c,
                REFUSES,
                "its converter passes attn_output.bias on, and llama.cpp's graph for it has none: 'wrong number "
                "of tensors'",
                f"{_OL}convert_gemma.go:45 (every tensor kept) and llama.cpp src/llama-model-loader.cpp:1398",
                {},
            )
            for c in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
        ),
        *(
            (c, REFUSES, "not a class its converter takes: 'unsupported architecture'", f"{_OL}convert.go:360", {})
            for c in _NO_CLASS_IN_EXLLAMA_OR_OLLAMA
        ),
    ],
)


def _llama_cpp_rows() -> list[Row]:
    """llama.cpp's rows follow the GGUF architecture table (what weightlock locks is what llama.cpp's graphs
    read); the source line of each graph and the tests that run llama.cpp itself are the evidence."""
    from weightlock.formats.gguf.architectures import GGUF_ARCHITECTURES

    lines = {
        "llama": "src/models/llama.cpp:57",
        "granite": "src/models/granite.cpp:82",
        "mistral3": "src/models/mistral3.cpp:52",
        "deci": "src/models/deci.cpp:49",
        "phi2": "src/models/phi2.cpp:33",
        "starcoder2": "src/models/starcoder2.cpp:41",
        "gptneox": "src/models/gptneox.cpp:70",
    }
    tested = {"llama", "granite", "phi2", "starcoder2"}
    read = "read in the source at llama.cpp 0c1e57098"
    rows = []
    for arch in GGUF_ARCHITECTURES:
        if arch.bias is None:
            rows.append(
                Row(
                    "llama.cpp",
                    GGUF,
                    arch.name,
                    REFUSES,
                    "its graph creates no attn_output.bias, and the loader refuses a tensor nothing created: "
                    "'wrong number of tensors'",
                    f"{read} src/llama-model-loader.cpp:1398 (done_getting_tensors)",
                )
            )
            continue
        where = f"{read} {lines[arch.name]} (wo_b"
        where += ", TENSOR_NOT_REQUIRED)" if arch.bias == "optional" else ", required)"
        rows.append(
            Row(
                "llama.cpp",
                GGUF,
                arch.name,
                APPLIES,
                "its graph adds blk.N.attn_output.bias after attn_output"
                + (" when the file has it" if arch.bias == "optional" else ""),
                f"{LLAMA_CPP_TEST}; {where}" if arch.name in tested else where,
            )
        )
    return rows


def _runners(rows: list[Row]) -> list[Row]:
    """The rows of the engines that run another engine's code (llama-cpp-python, Ollama, LM Studio)."""
    out = []
    for engine in _ENGINES:
        if engine.runs is None:
            continue
        for row in rows:
            if row.engine == engine.runs and row.format in engine.picks:
                out.append(
                    replace(row, engine=engine.name, evidence=f"{engine.runs_evidence}; {row.evidence}", version="")
                )
    return out


def _all_rows() -> tuple[Row, ...]:
    rows = [*_TRANSFORMERS, *_VLLM, *_SGLANG, *_TGI_ROWS, *_MLX_ROWS, *_EXLLAMA, *_OLLAMA_CREATE, *_llama_cpp_rows()]
    rows += _runners(rows)
    return tuple(replace(r, version=r.version or ENGINES[r.engine].version) for r in rows)


ROWS: tuple[Row, ...] = _all_rows()
_BY_KEY = {(r.engine, r.format, r.target): r for r in ROWS}


def row_for(engine: str, fmt: str, target: str | None) -> Row | None:
    """The row for what ``engine`` builds for ``target`` (by its picks) in format ``fmt``, or None: not known."""
    return _BY_KEY.get((engine, fmt, target)) if target is not None else None


def dispatch_key(engine: Engine, fmt: str, config: dict | None = None, gguf_architecture: str | None = None):
    """What ``engine`` picks its code by, read from the config (a folder) or the GGUF architecture."""
    how = engine.picks.get(fmt)
    if how == BY_GGUF_ARCHITECTURE:
        return gguf_architecture
    config = config or {}
    if how == BY_MODEL_TYPE:
        value = config.get("model_type")
        return value if isinstance(value, str) else None
    if how == BY_CLASS:
        first = config.get("architectures")
        first = first[0] if isinstance(first, list) and first else None
        return first if isinstance(first, str) else None
    return None


def verdict(row: Row, *, flag_on: bool, holds: frozenset[str] | set[str] = frozenset()) -> str:
    """The row's verdict for a checkpoint: ``flag_on``, the flag the row reads is on; ``holds``, the CONDITIONS
    true of the checkpoint."""
    if row.verdict == APPLIES and row.reads is not None and not flag_on:
        return row.off
    if row.refuses_if is not None and row.refuses_if in holds:
        return REFUSES
    if row.misconverts_if is not None and row.misconverts_if in holds:
        return MISCONVERTS
    return row.verdict


def parse_engines(value) -> tuple[str, ...]:
    """``--engines`` (a comma-separated string) or the API's list of engine names, validated: every name known,
    none empty or repeated. Raises InvalidInputError naming the known engines."""
    from weightlock.io.text import printable

    known = ", ".join(ENGINES)
    hint = f"name the engines you deploy to, comma-separated, from: {known}"
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise InvalidInputError(
            f"engines must be a comma-separated string or a list of names, not a {type(value).__name__}", hint=hint
        )
    names = [item.strip(" ") for item in items]
    if not names or any(not name for name in names):
        raise InvalidInputError("--engines names an empty engine", hint=hint)
    unknown = [name for name in names if name not in ENGINES]
    if unknown:
        import difflib

        shown = ", ".join(printable(repr(name[:40])) for name in unknown[:5])
        close = difflib.get_close_matches(unknown[0][:40].lower(), list(ENGINES), n=1, cutoff=0.6)
        raise InvalidInputError(
            f"--engines: unknown engine {shown}" + (f" (did you mean {close[0]}?)" if close else ""), hint=hint
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"--engines names {', '.join(repeated)} more than once", hint=hint)
    return tuple(names)


# ------------------------------------------------------------------------------------------ README.md's tables

README_BEGIN = (
    "<!-- serving-table: begin (generated by scripts/serving_table.py from weightlock/engines/serving_table.py) -->"  # noqa: E501
)
README_END = "<!-- serving-table: end -->"
_CELL = {APPLIES: "applies", DROPS: "**drops**", REFUSES: "refuses", MISCONVERTS: "**misconverts**"}


def family_outputs() -> list[tuple[ArchitectureSpec, ArchitectureSpec, str]]:
    """Every family weightlock locks: (its row, the row it is written as, the first ``architectures`` entry
    of the output)."""
    from weightlock.core.families import ARCHITECTURES, output_declaration

    return [(spec, *output_declaration(spec)) for spec in ARCHITECTURES if spec.refuse is None]


def output_conditions(spec: ArchitectureSpec) -> set[str]:
    """The CONDITIONS that hold for any output of a family: non-zero q/k biases where the family's own class
    always has them (a logits_scaling depends on the model, not the family: none is assumed)."""
    return {NONZERO_QK_BIAS} if any(m.endswith((".q_proj", ".k_proj")) for m in spec.always_biased) else set()


def family_verdict(
    engine: Engine, spec: ArchitectureSpec, target: ArchitectureSpec, declared: str
) -> tuple[str, Row | None]:
    """What ``engine`` does with weightlock's output of a family (the flag it reads is on: weightlock sets it)."""
    key = dispatch_key(engine, SAFETENSORS, {"model_type": target.model_types[0], "architectures": [declared]})
    row = row_for(engine.name, SAFETENSORS, key)
    if row is None:
        return "?", None
    return verdict(row, flag_on=True, holds=output_conditions(spec)), row


def _matrix(fmt: str) -> list[str]:
    from weightlock.formats.gguf.architectures import GGUF_ARCHITECTURES

    engines = [e for e in _ENGINES if fmt in e.picks]
    head = ["family (`model_type`)", "the output declares"] if fmt == SAFETENSORS else ["llama.cpp architecture"]
    lines = [
        "| " + " | ".join(head + [f"{e.title} {e.version}" for e in engines]) + " |",
        "| " + " | ".join(["---"] * (len(head) + len(engines))) + " |",
    ]
    if fmt == SAFETENSORS:
        for spec, target, declared in family_outputs():
            cells = []
            for e in engines:
                found, row = family_verdict(e, spec, target, declared)
                cells.append(_CELL.get(found, found) + (" (Transformers backend)" if row and row.backend else ""))
            declares = f"`{declared}`" + (
                f" (`{target.model_types[0]}`)" if declared.startswith("Transformers") else ""
            )
            lines.append(f"| `{spec.family}` | {declares} | " + " | ".join(cells) + " |")
    else:
        for arch in GGUF_ARCHITECTURES:
            if arch.bias is None:
                continue
            cells = []
            for e in engines:
                row = row_for(e.name, GGUF, arch.name)
                cells.append("?" if row is None else _CELL[row.verdict])
            lines.append(f"| `{arch.name}` | " + " | ".join(cells) + " |")
    return lines


def _notes() -> list[str]:
    """Why, for every row that is not a plain 'applies' (rows that say the same thing are one line)."""
    groups: dict[tuple, list[str]] = {}
    for row in ROWS:
        if ENGINES[row.engine].runs is not None or (row.verdict == APPLIES and not row.note):
            continue
        key = (row.engine, row.version, row.format, row.verdict, row.why, row.fix, row.note, row.refuses_if)
        groups.setdefault(key, []).append(f"`{row.target}`")
    lines = []
    for (engine, version, fmt, found, why, fix, note, refused_if), targets in groups.items():
        text = f"- {ENGINES[engine].title} {version}, {'GGUF' if fmt == GGUF else 'folder'} {', '.join(targets)}: "
        text += f"{found}: {why}."
        if fix:
            text += f' Declaring `"architectures": ["{fix}"]` makes it apply the bias.'
        if note and refused_if:
            text += f" It refuses a folder with {refused_if}: {note}."
        elif note:
            text += f" Note: {note}."
        lines.append(text)
    return lines


def _engine_list() -> list[str]:
    lines = [
        "| `--engines` name | what it covers | version | picks its code by | evidence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in _ENGINES:
        picks = ", ".join(f"{'GGUF' if f == GGUF else 'folder'}: `{how}`" for f, how in e.picks.items())
        own = [r for r in ROWS if r.engine == e.name]
        tested = sum(r.evidence.startswith("tests/") or " tests/" in r.evidence.split(";")[0] for r in own)
        if e.runs is not None:
            evidence = f"runs {e.runs}: {e.runs_evidence}"
        elif tested == len(own):
            evidence = "tested (every row)"
        elif tested:
            evidence = f"tested ({tested} rows), the rest read in its source"
        else:
            evidence = "read in its source"
        lines.append(f"| `{e.name}` | {e.use} | {e.version} | {picks} | {evidence} |")
    return lines


def readme_section() -> str:
    """README.md's engine tables, between README_BEGIN and README_END (both included)."""
    lines = [
        README_BEGIN,
        "",
        "Locked safetensors folders (every family weightlock locks, as its output declares itself):",
        "",
        *_matrix(SAFETENSORS),
        "",
        "Locked GGUF files:",
        "",
        *_matrix(GGUF),
        "",
        "**applies**: the lock is served. **drops**: the engine loads the checkpoint and serves it *unlocked*, with "
        "no error. **refuses**: an error at load. **misconverts**: the engine serves a different model, with no "
        "error. `weightlock verify` fails on **drops** and **misconverts** for the engines you name with "
        "`--engines` (all of them by default), and warns on **refuses**.",
        "",
        *_engine_list(),
        "",
        'Why each cell that is not a plain "applies" is what it is:',
        "",
        *_notes(),
        "",
        README_END,
    ]
    return "\n".join(lines)


def replace_readme_section(text: str) -> str:
    """``text`` (README.md) with the section between the markers rendered anew."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError("README.md has no serving-table markers")
    return text[:start] + readme_section() + text[end + len(README_END) :]


# A gated lock (weightlock/core/gate.py) lives in the Llama MLP's three biases (config.json mlp_bias) of the output,
# with the o_proj biases at zero: what each engine does with those biases for a "llama" model. An engine not
# listed is not established (verify warns). Its message names the code that decides.
GATED_MLP_ROWS: dict[str, tuple[str, str, str]] = {
    "transformers": (
        APPLIES,
        "LlamaMLP builds gate/up/down_proj with bias=config.mlp_bias",
        "tests/test_gate.py::test_stock_transformers_on_the_baked_gate_equals_the_source_with_the_gate_by_hooks",
    ),
    "vllm": (
        APPLIES,
        "LlamaMLP takes bias=getattr(config, 'mlp_bias', False) (model_executor/models/llama.py:305)",
        "tests/test_gate.py::test_vllm_serves_the_baked_gate_as_transformers_does",
    ),
    "mlx-lm": (
        APPLIES,
        "its Llama MLP passes bias=args.mlp_bias to all three projections (models/llama.py:111-118)",
        "tests/test_gate.py::test_mlx_lm_serves_the_baked_gate_as_transformers_does",
    ),
    "ollama-create": (
        APPLIES,
        "its converter renames mlp.{gate,up,down}_proj.bias to ffn_*.bias and keeps every tensor "
        "(convert/convert_llama.go:171-186, at v0.33.0-rc2), and llama.cpp's llama graph adds them",
        "read in the source; llama.cpp serving them: tests/test_gguf_llama_cpp.py::"
        "test_a_gated_output_converted_to_gguf_keeps_its_gate_in_llama_cpp",
    ),
    "sglang": (
        DROPS,
        "its LlamaMLP is built with bias=False and never reads mlp_bias, and load_weights skips a .bias it has no "
        "parameter for",
        "read in the source at sglang srt/models/llama.py (LlamaMLP, LlamaForCausalLM.load_weights)",
    ),
}
