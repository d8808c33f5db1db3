"""gpt-oss (20b, 120b): transposed and interleaved expert weights with biases, clamped GLU.

Its attention adds learned sinks, which sdpa cannot express: eager, or flex attention on CUDA.
"""

from .spec import ArchSpec, gpt_oss_glu

SPEC = ArchSpec(
    model_type="gpt_oss",
    weight_layout="E_in_out",
    gate_up_packing="interleaved",
    bias=True,
    activation=gpt_oss_glu,
    router_modules=("mlp.router",),
    attn_implementations=("flex_attention", "eager"),
)
