"""What weightlock knows about each model family, as data.

An entry says where a layer's attention-output projection lives, how the config
names the shape (and what the config class assumes when a key is absent), which
config flag switches the output bias on and which other biases that flag brings
into existence (they must be written as explicit zeros, or a loader initialises
them at random), which biases the class always has, and, where an engine that picks
its class by name (vLLM, SGLang) would drop the bias with the family's own class, the
``architectures`` value the output declares instead (``serve_as``: those engines'
Transformers backend). Which engine does what with each class is the serving table's
knowledge (:mod:`weightlock.engines.serving_table`), not this table's.

A family whose class cannot hold an o_proj bias but whose computation an equivalent
class reproduces exactly is *redeclared*: its config is rewritten for that class
(``Redeclaration``), and tensors the two classes store differently are split
(``FusedSplit``) or stacked (``TensorMerge``) as byte copies. A family with no exact
equivalent, or a config the equivalent does not reproduce, is *refused* with the
reason. Adding a family means adding a row here, plus its equivalence test; no other
module branches on the family. Facts were read from transformers 5.23.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weightlock.errors import CheckpointError, UnsupportedError

# The ``architectures`` values that make vLLM and SGLang build their Transformers backend around transformers'
# own class (picked by model_type), whatever the family: the way to serve a family whose own class there drops
# the bias. transformers itself picks its class by model_type and never reads the list.
BACKEND_ARCHITECTURES = ("TransformersForCausalLM", "TransformersMoEForCausalLM")


@dataclass(frozen=True)
class BiasCompanion:
    """A bias that the family's flag switches on together with the output bias."""

    module: str  # e.g. "model.layers.{layer}.self_attn.q_proj"
    width_from: str  # a ModelShape.width() key: heads, kv_heads, qkv, hidden, intermediate


@dataclass(frozen=True)
class FusedSplit:
    """A fused weight the target class stores as separate tensors: its row blocks, in order. A block of rows
    is a contiguous byte range, so the parts are copied, never computed."""

    fused: str  # e.g. "model.layers.{layer}.self_attn.qkv_proj" (its ".weight")
    parts: tuple[tuple[str, str], ...]  # (module, ModelShape.width() key of its rows), in row order


@dataclass(frozen=True)
class TensorMerge:
    """A target tensor whose bytes are source tensors' bytes one after another: for each expert in turn
    (``{expert}`` in the names; the experts are the leading dimension) the sources in order, or, without
    ``{expert}``, the one source renamed. Copied, never computed."""

    target: str  # e.g. "model.layers.{layer}.block_sparse_moe.input_linear.weight"
    sources: tuple[str, ...]  # e.g. ("...experts.{expert}.w1.weight", "...experts.{expert}.w3.weight")


@dataclass(frozen=True)
class Redeclaration:
    """Rewrite a config for an equivalent class that can hold the bias."""

    family: str  # the target row's family
    # keys whose defaults differ between the source and target config classes: when a
    # config omits one, the source default is written explicitly so nothing changes
    source_defaults: dict = field(default_factory=dict)
    # keys the target class does not read and that must not linger (vLLM applies a
    # Llama config's sliding_window to every layer)
    drop_keys: tuple[str, ...] = ()
    # the key that switches the sliding window on, when the family has one (Qwen2)
    sliding_window_switch: str | None = None
    # the tokenizer class the source model type resolves to, pinned in tokenizer_config.json
    # when it names none (AutoTokenizer would otherwise pick by the new model_type)
    tokenizer_class: str | None = None
    # fused weights split into the target's separate tensors
    splits: tuple[FusedSplit, ...] = ()
    # separate tensors the target stores stacked (per-expert weights), and the config key counting the experts
    merges: tuple[TensorMerge, ...] = ()
    experts_key: str = "num_local_experts"
    # the target key holding the attention scale, written as head_dim ** -0.5 (the source's implicit scale)
    attention_scale_key: str | None = None
    # target settings written with the values that make the target compute what the source does
    neutral_settings: dict = field(default_factory=dict)
    # the source class rotates only part of each head, or switches RoPE tables in ways the target does not
    # (Phi-3's LongRoPE resets the cache when a generation crosses original_max_position_embeddings): only a
    # plain RoPE over the whole head is exact
    plain_rope_only: bool = False


@dataclass(frozen=True)
class GatedMlp:
    """Where a gated lock's neurons go (:mod:`weightlock.core.gate`): a SwiGLU MLP of three projections, whose
    class (the output's, after any redeclaration) gives all three a bias when ``bias_flag`` is set."""

    module: str = "model.layers.{layer}.mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    bias_flag: str = "mlp_bias"
    # the activation the gate's neurons compute with (core/gate.py is silu's arithmetic), as config.json names it
    # (hidden_act, absent: the class default silu); another activation would bake another gate
    activation_key: str = "hidden_act"
    activations: tuple[str, ...] = ("silu", "swish")
    activation_default: str = "silu"

    def activation_problem(self, config: dict) -> str | None:
        act = config.get(self.activation_key, self.activation_default)
        if act in self.activations:
            return None
        return (
            f"config.json gives {self.activation_key} {act!r}: the gate's neurons compute silu(z) (a SwiGLU MLP), "
            "so another activation would bake another gate"
        )

    def projection(self, which: str, layer: int) -> str:
        return f"{self.module.format(layer=layer)}.{getattr(self, which)}"


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]  # transformers class names in config "architectures"
    attention_module: str  # e.g. "model.layers.{layer}.self_attn"
    output_projection: str  # e.g. "o_proj"
    bias_flag: str | None  # config key switching the output bias on; None: always present
    bias_flag_default: bool = False  # what the config class assumes when the key is absent
    bias_companions: tuple[BiasCompanion, ...] = ()
    always_biased: tuple[str, ...] = ()  # modules ("...{layer}...") whose bias the class hard-codes
    # For a family whose own class in vLLM drops the bias (the serving table says which): the "architectures"
    # value the output declares instead (one of BACKEND_ARCHITECTURES), so that vLLM and SGLang serve it through
    # their Transformers backend (stock transformers picks its class by model_type and never reads this list).
    # Recorded in the config changes; revert restores the original.
    serve_as: str | None = None
    redeclare: Redeclaration | None = None
    refuse: str | None = None  # why no exact edit exists, and what to do
    # the MLP a gated lock grows (None: gated locks are not baked into this family; its output class, after any
    # redeclaration, must have one too, with a bias flag)
    gated_mlp: GatedMlp | None = None
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    hidden_key: str = "hidden_size"
    intermediate_key: str = "intermediate_size"
    head_dim_key: str = "head_dim"
    head_dim_default: int | None = None  # None: hidden_size // num_attention_heads

    def module(self, template: str, layer: int) -> str:
        return template.format(layer=layer)

    def decoder_layer(self, layer: int) -> str:
        """The decoder layer holding ``layer``'s attention (the attention path up to the layer's index)."""
        head, _, _ = self.attention_module.partition("{layer}")
        return f"{head}{layer}"

    def output_module(self, layer: int) -> str:
        return f"{self.attention_module.format(layer=layer)}.{self.output_projection}"

    def output_weight(self, layer: int) -> str:
        return f"{self.output_module(layer)}.weight"

    def output_bias(self, layer: int) -> str:
        return f"{self.output_module(layer)}.bias"

    def bias_on(self, config: dict) -> bool:
        return True if self.bias_flag is None else bool(config.get(self.bias_flag, self.bias_flag_default))


def _llama_like(family: str, model_types: tuple[str, ...], classes: tuple[str, ...], **kwargs) -> ArchitectureSpec:
    """The common shape: model.layers.N.self_attn.{q,k,v,o}_proj, all switched by attention_bias."""
    attention = "model.layers.{layer}.self_attn"
    return ArchitectureSpec(
        family=family,
        model_types=model_types,
        classes=classes,
        attention_module=attention,
        output_projection="o_proj",
        bias_flag=kwargs.pop("bias_flag", "attention_bias"),
        bias_companions=kwargs.pop(
            "bias_companions",
            (
                BiasCompanion(f"{attention}.q_proj", "heads"),
                BiasCompanion(f"{attention}.k_proj", "kv_heads"),
                BiasCompanion(f"{attention}.v_proj", "kv_heads"),
            ),
        ),
        **kwargs,
    )


_QWEN2_SOURCE_DEFAULTS = {
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "bos_token_id": None,
    "eos_token_id": None,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
_MISTRAL_SOURCE_DEFAULTS = {
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
_PHI3_SOURCE_DEFAULTS = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
_PHI3_SPLITS = (
    FusedSplit(
        "model.layers.{layer}.self_attn.qkv_proj",
        (
            ("model.layers.{layer}.self_attn.q_proj", "heads"),
            ("model.layers.{layer}.self_attn.k_proj", "kv_heads"),
            ("model.layers.{layer}.self_attn.v_proj", "kv_heads"),
        ),
    ),
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2): the gate is the first half
    FusedSplit(
        "model.layers.{layer}.mlp.gate_up_proj",
        (("model.layers.{layer}.mlp.gate_proj", "intermediate"), ("model.layers.{layer}.mlp.up_proj", "intermediate")),
    ),
)
_MIXTRAL_SOURCE_DEFAULTS = {
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}
_MIXTRAL_MOE = "model.layers.{layer}.block_sparse_moe"
_MIXTRAL_MERGES = (
    # GraniteMoe's experts: gate, up = input_linear[e](x).chunk(2) (Mixtral's w1 then w3); output_linear[e] is w2
    TensorMerge(
        f"{_MIXTRAL_MOE}.input_linear.weight",
        (f"{_MIXTRAL_MOE}.experts.{{expert}}.w1.weight", f"{_MIXTRAL_MOE}.experts.{{expert}}.w3.weight"),
    ),
    TensorMerge(f"{_MIXTRAL_MOE}.output_linear.weight", (f"{_MIXTRAL_MOE}.experts.{{expert}}.w2.weight",)),
    TensorMerge(f"{_MIXTRAL_MOE}.router.layer.weight", (f"{_MIXTRAL_MOE}.gate.weight",)),
)

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    _llama_like("llama", ("llama",), ("LlamaForCausalLM",), gated_mlp=GatedMlp()),
    _llama_like(
        "mistral",
        ("mistral",),
        ("MistralForCausalLM",),
        gated_mlp=GatedMlp(),
        # Without mistral_common, AutoTokenizer gives a mistral model type TokenizersBackend
        # whatever tokenizer_config.json declares; a llama model type would honour the declaration.
        redeclare=Redeclaration(
            "llama", _MISTRAL_SOURCE_DEFAULTS, drop_keys=("sliding_window",), tokenizer_class="TokenizersBackend"
        ),
    ),
    _llama_like(
        "qwen2",
        ("qwen2",),
        ("Qwen2ForCausalLM",),
        gated_mlp=GatedMlp(),
        always_biased=(
            "model.layers.{layer}.self_attn.q_proj",
            "model.layers.{layer}.self_attn.k_proj",
            "model.layers.{layer}.self_attn.v_proj",
        ),
        redeclare=Redeclaration(
            "llama",
            _QWEN2_SOURCE_DEFAULTS,
            drop_keys=("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
            sliding_window_switch="use_sliding_window",
            tokenizer_class="Qwen2Tokenizer",
        ),
    ),
    _llama_like(
        "qwen3",
        ("qwen3",),
        ("Qwen3ForCausalLM",),
        head_dim_default=128,
        serve_as="TransformersForCausalLM",
    ),
    _llama_like(
        "qwen3_moe",
        ("qwen3_moe",),
        ("Qwen3MoeForCausalLM",),
        head_dim_default=128,
        serve_as="TransformersMoEForCausalLM",
    ),
    _llama_like(
        "gemma",
        ("gemma",),
        ("GemmaForCausalLM",),
        head_dim_default=256,
        serve_as="TransformersForCausalLM",
    ),
    _llama_like("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), head_dim_default=256),
    _llama_like("gemma3_text", ("gemma3_text",), ("Gemma3ForCausalLM",), head_dim_default=256),
    _llama_like("olmo2", ("olmo2",), ("Olmo2ForCausalLM",)),
    _llama_like("granite", ("granite",), ("GraniteForCausalLM",)),
    _llama_like(
        "cohere",
        ("cohere",),
        ("CohereForCausalLM",),
        serve_as="TransformersForCausalLM",
    ),
    _llama_like(
        "starcoder2",
        ("starcoder2",),
        ("Starcoder2ForCausalLM",),
        bias_flag="use_bias",
        bias_flag_default=True,
        bias_companions=(
            BiasCompanion("model.layers.{layer}.self_attn.q_proj", "heads"),
            BiasCompanion("model.layers.{layer}.self_attn.k_proj", "kv_heads"),
            BiasCompanion("model.layers.{layer}.self_attn.v_proj", "kv_heads"),
            BiasCompanion("model.layers.{layer}.mlp.c_fc", "intermediate"),
            BiasCompanion("model.layers.{layer}.mlp.c_proj", "hidden"),
        ),
    ),
    ArchitectureSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        classes=("GPTNeoXForCausalLM",),
        attention_module="gpt_neox.layers.{layer}.attention",
        output_projection="dense",
        bias_flag="attention_bias",
        bias_flag_default=True,
        bias_companions=(BiasCompanion("gpt_neox.layers.{layer}.attention.query_key_value", "qkv"),),
        kv_heads_key=None,
    ),
    ArchitectureSpec(
        family="phi",
        model_types=("phi",),
        classes=("PhiForCausalLM",),
        attention_module="model.layers.{layer}.self_attn",
        output_projection="dense",
        bias_flag=None,
    ),
    # o_proj always carries a bias (attention_bias defaults on); the lock adds to it. The experts (bf16 or
    # MXFP4 blocks and scales) are never read or rewritten: only the shards holding o_proj biases are.
    _llama_like("gpt_oss", ("gpt_oss",), ("GptOssForCausalLM",), bias_flag_default=True),
    # GraniteMoe computes Mixtral's model exactly once its multipliers are neutral (embedding, residual and
    # logits 1.0, attention scale head_dim ** -0.5): its router takes the softmax of the top-k logits, which is
    # Mixtral's softmax renormalised over the top k. vLLM's own GraniteMoe class has no o_proj bias.
    _llama_like(
        "granitemoe",
        ("granitemoe",),
        ("GraniteMoeForCausalLM",),
        serve_as="TransformersMoEForCausalLM",
    ),
    _llama_like(
        "mixtral",
        ("mixtral",),
        ("MixtralForCausalLM",),
        redeclare=Redeclaration(
            "granitemoe",
            _MIXTRAL_SOURCE_DEFAULTS,
            drop_keys=("sliding_window", "router_jitter_noise"),
            merges=_MIXTRAL_MERGES,
            attention_scale_key="attention_multiplier",
            neutral_settings={"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0},
        ),
    ),
    # Phi-3 / Phi-4: Llama's computation with fused q/k/v and gate/up weights and no attention bias at all.
    _llama_like(
        "phi3",
        ("phi3",),
        ("Phi3ForCausalLM",),
        bias_companions=(),
        redeclare=Redeclaration(
            "llama",
            _PHI3_SOURCE_DEFAULTS,
            # auto_map points transformers at Phi-3's remote code; vLLM applies a Llama config's window everywhere
            drop_keys=("sliding_window", "auto_map"),
            # transformers lists phi3 among the types whose hub tokenizer class it overrides: TokenizersBackend
            tokenizer_class="TokenizersBackend",
            splits=_PHI3_SPLITS,
            plain_rope_only=True,
        ),
    ),
)

RUNTIME_HINT = (
    "apply the lock at run time instead (weightlock.engines.hooks.lock_hooks), or convert the checkpoint to "
    "a supported family first"
)
SUPPORTED_MODEL_TYPES = tuple(t for spec in ARCHITECTURES if spec.refuse is None for t in spec.model_types)


def family(name: str) -> ArchitectureSpec:
    return next(spec for spec in ARCHITECTURES if spec.family == name)


@dataclass(frozen=True)
class ModelShape:
    """The shape facts a lock depends on, read from a config."""

    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None = None

    @property
    def attention_width(self) -> int:
        """Width of the o_proj input: all heads side by side."""
        return self.num_heads * self.head_dim

    def width(self, width_from: str) -> int:
        widths = {
            "heads": self.num_heads * self.head_dim,
            "kv_heads": self.num_kv_heads * self.head_dim,
            "qkv": (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            "hidden": self.hidden_size,
            "intermediate": self.intermediate_size,
        }
        width = widths.get(width_from)
        if width is None:
            raise CheckpointError(
                f"config.json lacks what the {width_from} width is computed from",
                hint="the config is incomplete; restore it from the original",
            )
        return width


def spec_for_config(config: dict, *, allow_refused: bool = False) -> ArchitectureSpec:
    model_type = config.get("model_type")
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            if spec.refuse is not None and not allow_refused:
                raise UnsupportedError(f"{model_type} cannot be locked offline: {spec.refuse}", hint=RUNTIME_HINT)
            return spec
    raise UnsupportedError(
        f"architecture {model_type!r} ({', '.join(config.get('architectures') or ['?'])}) is not supported",
        hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )


def shape_from_config(config: dict, spec: ArchitectureSpec) -> ModelShape:
    def positive_int(key: str, value=None) -> int:
        value = config.get(key) if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"config.json: {key} must be a positive integer, found {value!r}",
                hint="the config is damaged; restore it from the original",
            )
        return value

    heads = positive_int(spec.heads_key)
    hidden = positive_int(spec.hidden_key)
    # config.head_dim wins when present: Mistral-Nemo has 128 where hidden/heads is 160.
    head_dim = config.get(spec.head_dim_key)
    if head_dim is None:
        head_dim = spec.head_dim_default
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(
                f"config.json: hidden_size {hidden} is not divisible by "
                f"{heads} attention heads and no head_dim is given",
                hint="add the model's head_dim to config.json, or restore the original config",
            )
        head_dim = hidden // heads
    kv_heads = config.get(spec.kv_heads_key) if spec.kv_heads_key else None
    if kv_heads is None and spec.redeclare is not None:
        kv_heads = spec.redeclare.source_defaults.get(spec.kv_heads_key)
    intermediate = config.get(spec.intermediate_key)
    return ModelShape(
        architecture=declared_class(config, spec),
        model_type=str(config.get("model_type")),
        num_layers=positive_int(spec.layers_key),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else positive_int(spec.kv_heads_key or "num_key_value_heads", kv_heads),
        head_dim=positive_int(spec.head_dim_key, head_dim),
        hidden_size=hidden,
        intermediate_size=intermediate if isinstance(intermediate, int) else None,
    )


def _first_architecture(config: dict):
    """The first ``architectures`` entry (what vLLM picks its class by), or None."""
    architectures = config.get("architectures")
    return architectures[0] if isinstance(architectures, list) and architectures else None


def output_declaration(spec: ArchitectureSpec) -> tuple[ArchitectureSpec, str]:
    """What weightlock's output of a family declares: the family it is written as (a redeclared family's
    equivalent) and its first ``architectures`` entry (``serve_as`` where the family has one)."""
    target = family(spec.redeclare.family) if spec.redeclare is not None else spec
    return target, target.serve_as or target.classes[0]


def declared_class(config: dict, spec: ArchitectureSpec) -> str:
    """The model class the config stands for: its first ``architectures`` entry, or the family's class when
    that entry only routes vLLM to its Transformers backend (a lock made from a Qwen3 fits a locked Qwen3)."""
    first = _first_architecture(config)
    if first is None or first in BACKEND_ARCHITECTURES:
        return spec.classes[0]
    return str(first)


def redeclared_config(config: dict, spec: ArchitectureSpec, shape: ModelShape) -> dict:
    """The config for the equivalent class, or a refusal naming the field that would change results."""
    rule = spec.redeclare
    assert rule is not None, "only called for families the table redeclares"
    target = family(rule.family)
    effective = {**rule.source_defaults, **config}
    window = effective.get("sliding_window")
    switch_on = effective.get(rule.sliding_window_switch, True) if rule.sliding_window_switch else True
    layer_types = effective.get("layer_types") or []
    sliding_layers = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if rule.sliding_window_switch and switch_on and window is not None:
        first_sliding = effective.get("max_window_layers", 0)
        if first_sliding < shape.num_layers:
            sliding_layers = sliding_layers or list(range(first_sliding, shape.num_layers))
    elif not rule.sliding_window_switch and window is not None and window < effective["max_position_embeddings"]:
        sliding_layers = sliding_layers or list(range(shape.num_layers))
    if sliding_layers:
        raise UnsupportedError(
            f"{shape.architecture} attends through a sliding window of {window} tokens (layers "
            f"{sliding_layers[0]}..{sliding_layers[-1]}), which {target.classes[0]} does not do; redeclaring it "
            "would change results on contexts longer than the window",
            hint=RUNTIME_HINT,
        )
    if rule.plain_rope_only:
        difference = _rope_difference(effective)
        if difference:
            raise UnsupportedError(
                f"{shape.architecture} {difference}, which {target.classes[0]} does not reproduce exactly; "
                "redeclaring it would change results",
                hint=RUNTIME_HINT,
            )
    new = {key: value for key, value in effective.items() if key not in rule.drop_keys}
    new.update(
        model_type=target.model_types[0],
        architectures=[target.classes[0]],
        head_dim=shape.head_dim,
        num_key_value_heads=shape.num_kv_heads,
    )
    new.update(rule.neutral_settings)
    # mlx-lm (0.32) reads rope_theta only at the top of config.json, where transformers 5 no longer writes it,
    # and defaults it per class (Qwen2's 1e6, Llama's 1e4): written there too, the redeclared class rotates as
    # the source model does in every engine (transformers reads the same value from rope_parameters)
    theta = new.get("rope_parameters", {}).get("rope_theta") if isinstance(new.get("rope_parameters"), dict) else None
    if "rope_theta" not in new and theta is not None:
        new["rope_theta"] = theta
    if rule.attention_scale_key:
        new[rule.attention_scale_key] = shape.head_dim**-0.5
    new[target.bias_flag] = True
    return new


def _rope_difference(config: dict) -> str | None:
    """What in a config's RoPE settings goes beyond a plain RoPE over the whole head, or None."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict):
        parameters = {}
    factor = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        return f"rotates only part of each head (partial_rotary_factor {factor})"
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in (None, "default"):
                return f"uses {kind!r} RoPE scaling ({key})"
        elif scaling is not None:
            return f"has a {key} that is not an object"
    return None
