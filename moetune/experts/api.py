"""moe_experts: one MoE experts block (grouped expert GEMMs + split LoRA), any backend."""

from __future__ import annotations

import torch

from .activations import Activation, get_activation
from .backends import get_backend, select_backend
from .lora import ExpertLoRA
from .routing import plan_routing
from .validation import check_inputs

__all__ = ["moe_experts"]

_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    lora: ExpertLoRA | None = None,
    activation: str | Activation = "swiglu",
    interleaved: bool = False,
    backend: str | None = None,
    only_for_backward: bool = False,
) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    x [T, H]; topk_ids, topk_weights [T, k]; gate_up [E, 2I, H]; down [E, H, I]
    (gpt-oss stores gate_up as [E, H, 2I]: pass `.transpose(1, 2)`, a view, and interleaved=True).
    Biases [E, 2I] and [E, H]. `lora` adds split LoRA on either or both projections; its
    factors may be kept in a wider dtype than x (they are cast for the compute, their
    gradients come back in their own dtype).

    Gradients flow to x, topk_weights and the LoRA factors; base weights must be frozen.
    Returns [T, H] in x's dtype, computed in it (also under autocast). Differentiable once on grouped_mm and triton
    (create_graph is refused), any order on native. Under torch.compile it runs eagerly (a graph break).

    only_for_backward=True: the caller discards the output values and runs this call only for what backward
    saves (a checkpoint's recompute, where only additions follow). The grouped_mm and triton backends then
    skip the down projection and the sum over k and return zeros; the gradients are the same.
    """
    if topk_ids.dtype in _WIDE_UNSIGNED:  # torch has no min/max (the id check) for these: ids are small anyway
        topk_ids = topk_ids.long()
    if torch.compiler.is_compiling():
        return _eager_moe_experts(x, topk_ids, topk_weights, gate_up, down, gate_up_bias=gate_up_bias,
                                  down_bias=down_bias, lora=lora, activation=activation, interleaved=interleaved,
                                  backend=backend, only_for_backward=only_for_backward)
    check_inputs(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, lora, interleaved)
    act = get_activation(activation)
    gemm_size = topk_ids.numel() * x.shape[1] * down.shape[2]  # routed rows x hidden x expert width
    name = select_backend(x.device, x.dtype, backend=backend, gemm_size=gemm_size)
    if x.shape[0] == 0:  # no token: an empty output that still depends on every input (zero gradients, as nn.Linear)
        out = x * 0
        for t in (topk_weights, *(lora.factors() if lora is not None else ())):
            if t is not None and t.requires_grad:
                out = out + t.sum() * 0
        return out
    plan = plan_routing(topk_ids, gate_up.shape[0])
    args = (x, topk_weights, plan, gate_up, down, gate_up_bias, down_bias, lora, act, interleaved, only_for_backward)
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type  # (x.device.type: 0.3 us a call)
    if torch.is_autocast_enabled(device_type):  # every backend computes in x's dtype, as documented
        with torch.autocast(device_type, enabled=False):
            return get_backend(name).run(*args)
    return get_backend(name).run(*args)


# Under torch.compile the block runs eagerly (a graph break): the Triton launchers and the routing plan are host code
# Dynamo cannot trace, and torch's fake _grouped_mm accepts bf16 only. Only then: the disable wrapper costs ~0.9 us
# a call, and an MoE layer calls this in every forward and recompute.
_eager_moe_experts = torch.compiler.disable(moe_experts)
