"""ArchSpec: everything moetune needs to know about one MoE architecture, written down as data.

transformers v5 already gives every supported model the same experts module contract
(`forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, weights as 3-D
parameters `gate_up_proj` / `down_proj`), so an architecture differs from another only in the
fields below: the router code stays the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..experts.activations import Activation, GeGLU, GptOssGLU, SwiGLU

__all__ = ["ArchSpec", "MLA_TARGETS", "glu_from_hidden_act", "gpt_oss_glu"]

# Multi-head latent attention's projections (DeepSeek-V3, GLM-4.7-Flash): q_proj where the queries have no low-rank
# step (q_lora_rank None), else q_a_proj and q_b_proj; the keys' and values' joint down- and up-projection; the output.
MLA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

WEIGHT_LAYOUTS = ("E_out_in", "E_in_out")
GATE_UP_PACKINGS = ("concat", "interleaved")


def glu_from_hidden_act(config, experts=None) -> Activation:
    """The gated activation `act(gate) * up` named by `config.hidden_act` (what ACT2FN would pick)."""
    act = getattr(config, "hidden_act", "silu")
    if act in ("silu", "swish"):
        return SwiGLU()
    if act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return GeGLU(approximate="none" if act == "gelu" else "tanh")
    raise ValueError(f"config.hidden_act: expected one of silu, swish, gelu, gelu_new, gelu_pytorch_tanh, got {act!r}")


def gpt_oss_glu(config, experts=None) -> Activation:
    """gpt-oss's clamped GLU with the alpha and limit its experts module actually uses.

    The module's own `alpha` / `limit` come first: transformers 5.17 hard-codes 1.702 / 7.0 there (and
    its config has no swiglu_alpha), later versions copy config.swiglu_alpha / swiglu_limit into them.
    """
    alpha = getattr(experts, "alpha", None) or getattr(config, "swiglu_alpha", 1.702)
    limit = getattr(experts, "limit", None) or getattr(config, "swiglu_limit", 7.0)
    return GptOssGLU(alpha=float(alpha), limit=float(limit))


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """One MoE architecture as transformers v5 implements it."""

    model_type: str
    """`config.model_type` of the checkpoint."""

    weight_layout: str = "E_out_in"
    """"E_out_in": gate_up [E, 2I, H], down [E, H, I] (transformers default). "E_in_out": [E, H, 2I], [E, I, H]."""

    gate_up_packing: str = "concat"
    """"concat": gate rows then up rows. "interleaved": gate = [..., 0::2], up = [..., 1::2]."""

    bias: bool = False
    """Experts carry `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H]."""

    activation: Callable[..., Activation] = glu_from_hidden_act
    """(config, experts module) -> the gated activation of the experts."""

    experts_module: str = "mlp.experts"
    """Name suffix of the experts modules (each holds gate_up_proj and down_proj)."""

    router_modules: tuple[str, ...] = ("mlp.gate",)
    """Name suffixes of the routing modules: frozen and never LoRA-adapted unless train_router=True."""

    attention_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """The attention's Linear projections, which the default targets' "q_proj", "k_proj", "v_proj", "o_proj"
    stand for (multi-head latent attention names them otherwise); those the model has get LoRA."""

    text_config: str | None = None
    """Attribute of the config holding the language model's config, for multimodal checkpoints."""

    auto_class: str = "AutoModelForCausalLM"
    """transformers auto class that builds the whole model from its config."""

    attn_implementations: tuple[str, ...] = ("sdpa", "eager")
    """Attention implementations that are correct for this model, preferred first."""

    def __post_init__(self):
        assert self.weight_layout in WEIGHT_LAYOUTS, self.weight_layout
        assert self.gate_up_packing in GATE_UP_PACKINGS, self.gate_up_packing

    @property
    def transposed(self) -> bool:
        return self.weight_layout == "E_in_out"

    @property
    def interleaved(self) -> bool:
        return self.gate_up_packing == "interleaved"

    def language_config(self, config):
        """The config of the language model (the config itself for text-only checkpoints)."""
        return getattr(config, self.text_config) if self.text_config else config
