"""`native`: a Python loop over the experts that have rows, plain matmuls, autograd.

The readable path and the fallback for any device/dtype (float64 included). Split LoRA is
still split: (x A^T) B^T on each expert's rows. Base weights are frozen (checked by the
caller), so autograd runs no weight-gradient GEMM for them.
"""

from __future__ import annotations

import torch

from ..activations import Activation
from ..lora import ExpertLoRA
from ..routing import RoutingPlan


def native_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    plan: RoutingPlan,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    lora: ExpertLoRA | None,
    act: Activation,
    interleaved: bool,
    only_for_backward: bool = False,  # autograd saves what it needs as it goes: nothing to skip here
) -> torch.Tensor:
    A1 = B1 = A2 = B2 = None
    if lora is not None:
        A1, B1, A2, B2 = (None if f is None else f.to(x.dtype) for f in lora.factors())
        s = lora.scaling
    w_S = topk_weights.reshape(-1).index_select(0, plan.perm_S).to(x.dtype)

    # fp32 accumulator: K contributions per token are summed in full precision.
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(plan.counts_E.tolist()):  # one host sync for the whole loop
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        token = plan.token_S[rows]
        xe = x.index_select(0, token)
        gu = xe @ gate_up[e].T
        if A1 is not None:
            gu = gu + s * ((xe @ A1[e].T) @ B1[e].T)
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e]
        h = act.forward(gu, interleaved)
        y = h @ down[e].T
        if A2 is not None:
            y = y + s * ((h @ A2[e].T) @ B2[e].T)
        if down_bias is not None:
            y = y + down_bias[e]
        out = out.index_add(0, token, (y * w_S[rows].unsqueeze(-1)).float())
    return out.to(x.dtype)
