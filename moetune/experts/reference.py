"""The oracle: a plain per-expert loop, written for clarity, differentiated by autograd.

Every backend is tested against `reference_moe_experts` run in float64. It shares nothing
with the backends but the activation's forward formula (whose analytic backward, used by the
backends, is thereby checked against autograd here).
"""

from __future__ import annotations

import torch

from .activations import Activation, get_activation
from .lora import ExpertLoRA

__all__ = ["reference_moe_experts"]


def reference_moe_experts(
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]), all arithmetic in `dtype`."""
    act = get_activation(activation)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, w = cast(x), cast(topk_weights)
    W1, W2, b1, b2 = cast(gate_up), cast(down), cast(gate_up_bias), cast(down_bias)
    A1 = B1 = A2 = B2 = None
    s = 0.0
    if lora is not None:
        A1, B1, A2, B2 = (cast(f) for f in lora.factors())
        s = lora.scaling

    out = torch.zeros_like(x)
    for e in range(W1.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token]
        gu = xe @ W1[e].T
        if A1 is not None:
            gu = gu + s * (xe @ A1[e].T) @ B1[e].T
        if b1 is not None:
            gu = gu + b1[e]
        h = act.forward(gu, interleaved)
        y = h @ W2[e].T
        if A2 is not None:
            y = y + s * (h @ A2[e].T) @ B2[e].T
        if b2 is not None:
            y = y + b2[e]
        out = out.index_add(0, token, y * w[token, slot].unsqueeze(-1))
    return out
