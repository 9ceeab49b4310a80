"""What weightlock knows about each model family, as data.

An entry says where a layer's attention-output projection lives, how the config
names the shape, how the config switches the o_proj bias on, and which other bias
tensors that switch brings into existence (they must be written as explicit zeros,
or a loader initialises them at random). Adding a family means adding a row here,
plus its equivalence test; no other module branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError, UnsupportedError


@dataclass(frozen=True)
class BiasCompanion:
    """A projection whose bias the config flag also switches on, and its width."""

    projection: str
    # "heads" -> num_attention_heads * head_dim; "kv_heads" -> num_key_value_heads * head_dim
    width_from: str


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    # transformers class names that this family's configs name in "architectures"
    classes: tuple[str, ...]
    # per-layer module holding the projections, e.g. "model.layers.{layer}.self_attn"
    attention_module: str
    output_projection: str
    # config key that switches the output projection's bias on (with the companions)
    bias_flag: str
    bias_companions: tuple[BiasCompanion, ...]
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    hidden_key: str = "hidden_size"
    head_dim_key: str = "head_dim"

    def projection_name(self, layer: int, projection: str, param: str) -> str:
        return f"{self.attention_module.format(layer=layer)}.{projection}.{param}"

    def output_weight(self, layer: int) -> str:
        return self.projection_name(layer, self.output_projection, "weight")

    def output_bias(self, layer: int) -> str:
        return self.projection_name(layer, self.output_projection, "bias")

    def output_module(self, layer: int) -> str:
        return f"{self.attention_module.format(layer=layer)}.{self.output_projection}"


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        family="llama",
        model_types=("llama",),
        classes=("LlamaForCausalLM",),
        attention_module="model.layers.{layer}.self_attn",
        output_projection="o_proj",
        bias_flag="attention_bias",
        bias_companions=(BiasCompanion("q_proj", "heads"), BiasCompanion("k_proj", "kv_heads"),
                         BiasCompanion("v_proj", "kv_heads")),
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for spec in ARCHITECTURES for t in spec.model_types)


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

    @property
    def attention_width(self) -> int:
        """Width of the o_proj input: all heads side by side."""
        return self.num_heads * self.head_dim

    def width(self, width_from: str) -> int:
        return {"heads": self.num_heads, "kv_heads": self.num_kv_heads}[width_from] * self.head_dim


def spec_for_config(config: dict) -> ArchitectureSpec:
    model_type = config.get("model_type")
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedError(
        f"architecture {model_type!r} ({', '.join(config.get('architectures') or ['?'])}) is not supported",
        hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def shape_from_config(config: dict, spec: ArchitectureSpec) -> ModelShape:
    def positive_int(key: str, value=None) -> int:
        value = config.get(key) if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"config.json: {key} must be a positive integer, found {value!r}")
        return value

    heads = positive_int(spec.heads_key)
    hidden = positive_int(spec.hidden_key)
    # config.head_dim wins when present: Mistral-Nemo has 128 where hidden/heads is 160.
    head_dim = config.get(spec.head_dim_key)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"config.json: hidden_size {hidden} is not divisible by "
                                  f"{heads} attention heads and no head_dim is given")
        head_dim = hidden // heads
    kv_heads = config.get(spec.kv_heads_key)
    architectures = config.get("architectures") or [spec.classes[0]]
    return ModelShape(
        architecture=str(architectures[0]),
        model_type=str(config.get("model_type")),
        num_layers=positive_int(spec.layers_key),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else positive_int(spec.kv_heads_key),
        head_dim=positive_int(spec.head_dim_key, head_dim),
        hidden_size=hidden,
    )
