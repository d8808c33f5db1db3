"""Gated activations as Triton device functions (fp32 in, fp32 out), used in GEMM epilogues.

ACT codes (constexpr): 0 swiglu, 1 gpt_oss (clamped), 2 geglu (erf), 3 geglu (tanh).
They mirror moetune.experts.activations, whose torch versions are the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

SWIGLU, GPT_OSS, GEGLU_ERF, GEGLU_TANH = 0, 1, 2, 3

# Triton reads globals only when they are constexpr.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


def act_code(activation) -> tuple[int, float, float]:
    """(ACT code, alpha, limit) for a moetune.experts.activations.Activation."""
    name = activation.name
    if name == "swiglu":
        return SWIGLU, 0.0, 0.0
    if name == "gpt_oss":
        return GPT_OSS, float(activation.alpha), float(activation.limit)
    if name == "geglu":
        return (GEGLU_TANH if activation.approximate == "tanh" else GEGLU_ERF), 0.0, 0.0
    raise ValueError(f"activation: the triton backend has no kernel for {name!r}")


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_forward(gate, up, ACT: tl.constexpr, alpha, limit):
    if ACT == 0:
        h = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        h = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    elif ACT == 2:
        h = 0.5 * gate * (1.0 + tl.erf(gate * _SQRT1_2)) * up
    else:
        inner = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        h = 0.5 * gate * (1.0 + _tanh(inner)) * up
    return h


@triton.jit
def act_backward(gate, up, d_h, ACT: tl.constexpr, alpha, limit):
    """(d_gate, d_up) given the pre-activation halves and d_h."""
    if ACT == 0:
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_gate = d_h * up * (sig * (1.0 + gate * (1.0 - sig)))
        d_up = d_h * silu
    elif ACT == 1:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * g)
        glu = g * sig
        d_gate = d_h * (u + 1.0) * (sig + alpha * glu * (1.0 - sig))
        d_gate = tl.where(gate <= limit, d_gate, 0.0)
        d_up = tl.where(tl.abs(up) <= limit, d_h * glu, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(gate * _SQRT1_2))
        pdf = tl.exp(-0.5 * gate * gate) * _INV_SQRT_2PI
        d_gate = d_h * up * (cdf + gate * pdf)
        d_up = d_h * gate * cdf
    else:
        inner = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        t = _tanh(inner)
        gelu = 0.5 * gate * (1.0 + t)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * gate * gate)
        d_gate = d_h * up * (0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * d_inner)
        d_up = d_h * gelu
    return d_gate, d_up
