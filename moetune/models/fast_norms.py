"""The fused Triton RMSNorm (moetune/kernels/rms_norm.py) on a transformers model, one module instance at a time.

`install_fast_norms(model)` gives each RMSNorm module whose forward it recognises an instance `forward` that
runs the fused kernel: no class is patched, parameters and state_dict keys stay as they are, and
`uninstall_fast_norms(model)` deletes the instance attributes again.

A module is recognised by the code of its class's forward, not by its name: the body (docstring, comments and
annotations aside) must be, statement for statement, one of the two forms transformers 5.17 - 5.23 write:

    "llama"    ... return self.weight * hidden_states.to(input_dtype)
               qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3, glm4_moe, glm4_moe_lite, qwen3_vl_moe (text)
    "gpt_oss"  ... return (self.weight * hidden_states).to(input_dtype)

and the module must hold exactly a 1-D `weight` parameter and a float `variance_epsilon`. OLMoE's q_norm /
k_norm normalise the whole projection ([B, T, heads * head_dim], not per head): that is still the "llama"
body over the last dim, which is exactly what the kernel computes, so they are fused too. Anything else keeps
transformers' forward: a Gemma-style `(1 + weight)` norm, a norm with a bias, a forward already replaced on the
instance (accelerate's offload hooks) or on the class (the kernels hub), rows wider than MAX_H.

At call time the fused forward falls back to the class's forward when the kernel cannot run on the input
(a CPU tensor outside Triton's interpreter, bf16 in the interpreter, a dtype or shape it does not take), so a
model moved between devices stays correct.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

from . import instance_forward
from .code_match import known_form, source_body_dump

__all__ = ["VARIANTS", "fast_norm_available", "install_fast_norms", "norm_variant", "uninstall_fast_norms"]

_VARIANT_ATTR = "_moetune_norm_variant"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_PROLOGUE = """
input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
"""
# variant -> (the forward body transformers writes, cast_before_weight for the kernel)
VARIANTS: dict[str, tuple[str, bool]] = {
    "llama": (_PROLOGUE + "return self.weight * hidden_states.to(input_dtype)\n", True),
    "gpt_oss": (_PROLOGUE + "return (self.weight * hidden_states).to(input_dtype)\n", False),
}


_KNOWN_BODIES = {source_body_dump(source): name for name, (source, _) in VARIANTS.items()}


@functools.cache
def _forward_variant(forward) -> str | None:
    """The VARIANTS name whose body `forward` (a function) has, or None."""
    return known_form(forward, _KNOWN_BODIES, ("self", "hidden_states"))


def norm_variant(module: nn.Module) -> str | None:
    """The VARIANTS name ("llama", "gpt_oss") when the fused kernel computes exactly what this module's forward does.

    None for any other module, and for a norm whose forward is already replaced on the instance (by moetune too).
    """
    from ..kernels.rms_norm import MAX_H

    forward = instance_forward.class_forward(module)
    if forward is None:
        return None
    weight = module._parameters.get("weight")
    if (
        weight is None
        or weight.dim() != 1
        or weight.shape[0] > MAX_H
        or set(module._parameters) != {"weight"}
        or module._modules
        or not isinstance(getattr(module, "variance_epsilon", None), (float, int))
    ):
        return None
    return _forward_variant(forward)


def fast_norm_available() -> bool:
    """True where the fused kernel can run at all: a CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    from ..experts.backends.triton import probe

    return (
        x.dtype in _DTYPES
        and weight.dtype in _DTYPES
        and x.device == weight.device
        and x.dim() > 0
        and x.shape[-1] == weight.shape[0]
        and probe(x.device.type, x.device.index, x.dtype) is None
    )


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _kernel_runs(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    from ..kernels.rms_norm import rms_norm

    cast_before_weight = VARIANTS[getattr(self, _VARIANT_ATTR)][1]
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, cast_before_weight=cast_before_weight)


def install_fast_norms(model: nn.Module) -> int:
    """Swap in the fused RMSNorm forward on every recognised norm of `model`. Idempotent.

    Returns how many norms now run fused (0 where no CUDA GPU and no Triton interpreter: nothing is changed).
    Warns once per class for modules named like an RMSNorm whose forward is not a known form.
    """
    if not fast_norm_available():
        return 0
    count, others = instance_forward.install(model, _VARIANT_ATTR, norm_variant, _fused_forward)
    unknown = {type(m).__name__ for m in others if "rmsnorm" in type(m).__name__.lower()}
    if unknown:
        warnings.warn(
            f"moetune: {', '.join(sorted(unknown))} keep transformers' RMSNorm forward: their code is not one of the "
            f"forms the fused kernel reproduces ({', '.join(VARIANTS)})",
            stacklevel=2,
        )
    return count


def uninstall_fast_norms(model: nn.Module) -> int:
    """Undo `install_fast_norms`: each norm gets its class's forward back. Returns how many were restored."""
    return instance_forward.uninstall(model, _VARIANT_ATTR, _fused_forward)
