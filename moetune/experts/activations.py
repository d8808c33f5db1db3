"""Gated expert activations: gu [S, 2I] -> h [S, I], and their backward.

Each activation knows how gate and up are packed along the 2I axis:
  concat      (default)  gate = gu[:, :I], up = gu[:, I:]
  interleaved (gpt-oss)  gate = gu[:, 0::2], up = gu[:, 1::2]

`forward` is used by every backend and by the float64 reference; `backward` is the
analytic derivative used by custom autograd Functions (the reference differentiates
`forward` with autograd instead, so the two are checked against each other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Activation", "SwiGLU", "GptOssGLU", "GeGLU", "get_activation", "ACTIVATIONS"]


def split_gate_up(gu: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return gu[..., 0::2], gu[..., 1::2]
    half = gu.shape[-1] // 2
    return gu[..., :half], gu[..., half:]


def join_gate_up(d_gate: torch.Tensor, d_up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((d_gate, d_up), dim=-1).flatten(-2)
    return torch.cat((d_gate, d_up), dim=-1)


@dataclass(frozen=True, kw_only=True)
class Activation:
    """Base class: a gated activation h = f(gate, up)."""

    name: str = ""

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gated_backward(
        self, gate: torch.Tensor, up: torch.Tensor, d_h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, gu: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        gate, up = split_gate_up(gu, interleaved)
        return self.gated(gate, up)

    def backward(self, gu: torch.Tensor, d_h: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        """d_gu [S, 2I] from the saved pre-activation gu [S, 2I] and d_h [S, I]."""
        gate, up = split_gate_up(gu, interleaved)
        d_gate, d_up = self.gated_backward(gate, up, d_h)
        return join_gate_up(d_gate, d_up, interleaved)


@dataclass(frozen=True, kw_only=True)
class SwiGLU(Activation):
    """silu(gate) * up: Qwen, Mixtral, OLMoE, DeepSeek, GLM."""

    name: str = "swiglu"

    def gated(self, gate, up):
        return F.silu(gate) * up

    def gated_backward(self, gate, up, d_h):
        d_gate = torch.ops.aten.silu_backward(d_h * up, gate)
        d_up = d_h * F.silu(gate)
        return d_gate, d_up


@dataclass(frozen=True, kw_only=True)
class GptOssGLU(Activation):
    """gpt-oss: gate = min(gate, L), up = clamp(up, -L, L), (up + 1) * gate * sigmoid(alpha * gate)."""

    name: str = "gpt_oss"
    alpha: float = 1.702
    limit: float = 7.0

    def gated(self, gate, up):
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(self.alpha * gate))

    def gated_backward(self, gate, up, d_h):
        # Clamp passes the gradient where the input lies inside [min, max] (torch's convention).
        gate_c = gate.clamp(max=self.limit)
        up_c = up.clamp(-self.limit, self.limit)
        sig = torch.sigmoid(self.alpha * gate_c)
        glu = gate_c * sig
        d_glu = d_h * (up_c + 1)
        d_gate = d_glu * (sig + self.alpha * glu * (1 - sig))
        d_gate = d_gate * (gate <= self.limit)
        d_up = (d_h * glu) * (up.abs() <= self.limit)
        return d_gate, d_up


@dataclass(frozen=True, kw_only=True)
class GeGLU(Activation):
    """gelu(gate) * up; approximate="none" (erf) or "tanh"."""

    name: str = "geglu"
    approximate: str = "none"

    def gated(self, gate, up):
        return F.gelu(gate, approximate=self.approximate) * up

    def gated_backward(self, gate, up, d_h):
        d_gate = torch.ops.aten.gelu_backward(d_h * up, gate, approximate=self.approximate)
        d_up = d_h * F.gelu(gate, approximate=self.approximate)
        return d_gate, d_up


ACTIVATIONS: dict[str, type[Activation]] = {"swiglu": SwiGLU, "gpt_oss": GptOssGLU, "geglu": GeGLU}


def get_activation(activation: str | Activation) -> Activation:
    """Resolve a name ("swiglu" | "gpt_oss" | "geglu") or pass an Activation instance through."""
    if isinstance(activation, Activation):
        if isinstance(activation, GptOssGLU) and not (math.isfinite(activation.limit) and activation.limit > 0):
            raise ValueError(f"activation: gpt_oss limit must be a positive finite number, got {activation.limit}")
        if isinstance(activation, GeGLU) and activation.approximate not in ("none", "tanh"):
            raise ValueError(f"activation: geglu approximate must be 'none' or 'tanh', got {activation.approximate!r}")
        return activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or an Activation, got {activation!r}")
    return ACTIVATIONS[activation]()
