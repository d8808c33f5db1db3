"""Rotary position embedding (the "rotate half" form) forward and backward in one kernel each.

What transformers writes for Llama-style models (qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3 and
glm4_moe_lite without interleave, qwen3_vl_moe text):

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)   (x1, x2: first and second half of D)

is five to eight elementwise launches per tensor forward (slices, neg, cat, two broadcast muls, add) and as
many backward, each reading and writing the whole [B, heads, T, D] tensor: at 8K tokens the Qwen3-30B-A3B
query is 64 MiB, and with checkpointing the forward runs twice. Here: one read and one write each way.

Shape legend: B batch, Hh heads, T tokens, D head dim (even), D2 = D // 2.

    x     [B, Hh, T, D]  fp32 / fp16 / bf16, any strides with the last dim contiguous (attention's query is the
                         transposed view of a [B, T, Hh, D] tensor); y and dx get x's strides (empty_like)
    cos   [Bc, T, W]     Bc = B or 1, any strides (transformers 5.17's gpt-oss table is a transposed view), x's dtype;
    sin   [Bc, T, W]     W = D (c1, c2 its halves), or W = D2: gpt-oss's form, one table for both halves

Forward, per row, the halves of y:
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
Backward (rotate_half transposed: its first half reads -x2, its second half x1):
    dx1 = g1 * c1 + g2 * s2
    dx2 = g2 * c2 - g1 * s1
Rounding: torch rounds each product and the sum to the tensor's dtype; the kernels round at the same places
(and launch with enable_fp_fusion=False so no product is fused into the add), so the result is bitwise
transformers' in fp16 / bf16 / fp32. cos and sin get no gradient (transformers computes them under no_grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["RotaryFunction", "rotary", "rotary_backward", "rotary_forward"]

# Elements of one program's half tile [BLOCK_R, BLOCK_D2]: 64 rows of a 128-wide head.
TILE_ELEMENTS = 4096


@triton.jit
def _round(v, dtype: tl.constexpr):
    """v rounded to the tensors' dtype, back in fp32: where torch's elementwise ops round."""
    return v.to(dtype).to(tl.float32)


@triton.jit
def rotate_pair(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr, BACKWARD: tl.constexpr):
    """The pair's halves (y1, y2) in fp32, rounded where torch rounds (see the module docstring); BACKWARD: the
    input's gradient from the output's (x1, x2 are then g1, g2)."""
    if BACKWARD:
        return _round(x1 * c1, dtype) + _round(x2 * s2, dtype), _round(x2 * c2, dtype) - _round(x1 * s1, dtype)
    return _round(x1 * c1, dtype) - _round(x2 * s1, dtype), _round(x2 * c2, dtype) + _round(x1 * s2, dtype)


@triton.jit
def rotary_kernel(
    x_ptr, sx_b, sx_h, sx_t,
    y_ptr, sy_b, sy_h, sy_t,
    cos_ptr, sin_ptr, sc_b, sc_t, sc_d,
    R, Hh, T, D2, C2,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """One tile of rows (b, h, t), t fastest. Forward: x -> y. BACKWARD: x is the output gradient, y dx."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    t = rows % T
    h = (rows // T) % Hh
    b = rows // (T * Hh)
    cols = tl.arange(0, BLOCK_D2)
    mask = row_mask[:, None] & (cols < D2)[None, :]
    dtype = x_ptr.dtype.element_ty

    x_rows = (b * sx_b + h * sx_h + t * sx_t)[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + x_rows, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_rows + D2, mask=mask, other=0.0).to(tl.float32)
    c_rows = (b * sc_b + t * sc_t)[:, None] + cols[None, :] * sc_d
    c1 = tl.load(cos_ptr + c_rows, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_rows + C2 * sc_d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_rows, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_rows + C2 * sc_d, mask=mask, other=0.0).to(tl.float32)

    y1, y2 = rotate_pair(x1, x2, c1, c2, s1, s2, dtype, BACKWARD)
    y_rows = (b * sy_b + h * sy_h + t * sy_t)[:, None] + cols[None, :]
    tl.store(y_ptr + y_rows, y1.to(dtype), mask=mask)
    tl.store(y_ptr + y_rows + D2, y2.to(dtype), mask=mask)


def table_strides(cos: torch.Tensor) -> tuple[int, int, int]:
    """cos's (batch, token, dim) strides for the kernels: batch 0 where one table serves every batch row."""
    return (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1), cos.stride(2)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, contiguous: bool) -> torch.Tensor:
    B, Hh, T, D = x.shape
    y = None if contiguous else torch.empty_like(x)  # x's strides (x is dense): the layout torch's x * cos keeps
    if y is None or y.stride(-1) != 1:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    R, D2 = B * Hh * T, D // 2
    if R == 0:
        return y
    block_d2 = next_power_of_2(D2)
    block_r = max(1, min(TILE_ELEMENTS // block_d2, next_power_of_2(R)))
    launch_kernel(
        rotary_kernel, (cdiv(R, block_r),),
        x, x.stride(0), x.stride(1), x.stride(2),
        y, y.stride(0), y.stride(1), y.stride(2),
        cos, sin, *table_strides(cos),
        R, Hh, T, D2, D2 if cos.shape[-1] == D else 0,
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_D2=block_d2,
        enable_fp_fusion=False,
    )
    return y


def check_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (None when it can)."""
    if x.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return "expects x [B, heads, T, D] and cos, sin [B or 1, T, D or D/2]"
    B, _, T, D = x.shape
    if D % 2 or cos.shape[1] != T or cos.shape[2] not in (D, D // 2) or cos.shape[0] not in (1, B):
        return f"shapes x {tuple(x.shape)}, cos {tuple(cos.shape)} do not match"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return f"dtypes x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}: expected one of fp32/fp16/bf16 for all three"
    if x.stride(-1) != 1 or sin.stride() != cos.stride():
        return "the last dim of x must be contiguous and cos, sin laid out alike"
    if not (x.device == cos.device == sin.device):
        return "x, cos and sin must be on one device"
    return None


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (cos, sin [Bc, T, D or D/2] broadcast over heads), no autograd.

    The result has x's strides, or is contiguous with `contiguous` (what gpt-oss's torch.cat returns)."""
    return _launch(x, cos, sin, backward=False, contiguous=contiguous)


def rotary_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rotary_forward's input; dy may have any strides with a contiguous last dim."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return _launch(dy, cos, sin, backward=True, contiguous=False)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, contiguous):
        # The tables every layer shares ([T, D], made once a forward; no gradient): held on ctx rather than saved (a
        # checkpointed layer's recompute keeps them alive anyway).
        saved_tensors.save(ctx, cos, sin, hold=(cos, sin))
        return rotary_forward(x, cos, sin, contiguous)

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True) raises instead of silently losing its graph
    def backward(ctx, dy):
        cos, sin = saved_tensors.load(ctx)
        return rotary_backward(dy, cos, sin), None, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] with cos, sin [B or 1, T, D or D/2] (differentiable in x only).

    The result has x's strides, or is contiguous with `contiguous`."""
    problem = check_inputs(x, cos, sin)
    if problem is not None:
        raise ValueError(f"rotary: {problem}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary: cos and sin must not require grad (the kernel gives them no gradient)")
    return RotaryFunction.apply(x, cos, sin, contiguous)
