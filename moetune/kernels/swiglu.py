"""The gated MLP's activation, silu(gate) * up, forward and backward in one kernel each.

transformers' gated MLPs (shared experts of Qwen2-MoE, DeepSeek-V3, GLM-4.5 / 4.7-Flash; their dense layers) write

    h = act_fn(gate_proj(x)) * up_proj(x)                       act_fn: SiLU

two launches forward (silu, mul), again in a checkpointed layer's recompute, and three backward (two muls, silu's
backward), each reading and writing [T, I] tensors (GLM-4.7-Flash's shared expert at 8K tokens: 24 MiB each).
Here one launch each way, reading gate and up (and dh) once.

    gate, up, h, dh   [...] contiguous, one shape, fp32 / fp16 / bf16

Rounding, where torch rounds to the tensors' dtype:
    s  = silu(gate) = gate / (1 + exp(-gate))                  rounded (F.silu's output)
    h  = s * up                                                rounded
    ds = dh * up                                               rounded (mul's gradient for s)
    du = dh * s                                                rounded
    dg = ds * sig * (1 + gate * (1 - sig)),  sig = 1 / (1 + exp(-gate))   rounded (silu's backward)
Each value is computed in fp32 from the same rounded inputs as torch's; Triton's exp and torch's may differ in the
last fp32 bit, and the compilers may contract a product into an add differently, so a result can differ from
torch's by one rounding of its dtype (rarely; tests/kernels/test_swiglu.py bounds it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from .launch import launch as launch_kernel
from .sizes import cdiv

__all__ = ["SwiGLUFunction", "check_inputs", "swiglu"]

BLOCK = 1024  # elements a program
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _round(v, dtype: tl.constexpr):
    """v rounded to the tensors' dtype, back in fp32: where torch's elementwise ops round."""
    return v.to(dtype).to(tl.float32)


@triton.jit
def swiglu_forward_kernel(gate_ptr, up_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = h_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(h_ptr + offs, (s * up).to(dtype), mask=mask)


@triton.jit
def swiglu_backward_kernel(gate_ptr, up_ptr, dh_ptr, d_gate_ptr, d_up_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = dh_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-gate)
    s = _round(gate / (1.0 + e), dtype)
    sig = 1.0 / (1.0 + e)
    ds = _round(dh * up, dtype)
    tl.store(d_up_ptr + offs, (dh * s).to(dtype), mask=mask)
    tl.store(d_gate_ptr + offs, (ds * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)


def check_inputs(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None when they can)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        return f"gate {gate.dtype} {list(gate.shape)} and up {up.dtype} {list(up.shape)}: expected one shape, " \
               "dtype and device"
    if gate.dtype not in DTYPES:
        return f"dtype {gate.dtype}: expected fp32, fp16 or bf16"
    if not (gate.is_contiguous() and up.is_contiguous()):
        return "gate and up must be contiguous"
    return None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up; see the module docstring. Kept for backward: gate and up (torch's ops keep silu's output
    too)."""

    @staticmethod
    def forward(ctx, gate, up):
        h = torch.empty_like(gate)
        n = gate.numel()
        if n:
            launch_kernel(swiglu_forward_kernel, (cdiv(n, BLOCK),), gate, up, h, n, BLOCK=BLOCK)
        saved_tensors.save(ctx, gate, up)
        return h

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True) raises instead of silently losing its graph
    def backward(ctx, dh):
        gate, up = saved_tensors.load(ctx)
        dh = dh.to(gate.dtype).contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            launch_kernel(swiglu_backward_kernel, (cdiv(n, BLOCK),), gate, up, dh, d_gate, d_up, n, BLOCK=BLOCK)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in one launch (and one for its gradients). CUDA, or CPU under TRITON_INTERPRET=1
    (fp32/fp16)."""
    problem = check_inputs(gate, up)
    if problem is not None:
        raise ValueError(f"swiglu: {problem}")
    return SwiGLUFunction.apply(gate, up)
