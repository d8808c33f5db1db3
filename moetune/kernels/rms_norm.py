"""RMSNorm forward and backward in one kernel each, with the rounding of transformers' RMSNorm modules.

Shape legend: M rows (every leading dim of the input flattened), H the normalised (last) dim.

    x_MH     [M, H]   fp32 / fp16 / bf16. Row r starts at (r // inner) * stride_outer + (r % inner) * stride_inner
                      and its H elements are contiguous: a contiguous input, a column slice (deepseek's
                      kv_a_layernorm on one half of a split) and the transposed gradient a q/k norm gets back
                      from attention ([T, heads, D] with strides (D, T*D, 1)) are all read without a copy.
    w_H      [H]      the norm weight, any of those dtypes
    y_MH     [M, H]   contiguous; dtype: promote(w, x) when CAST_BEFORE_WEIGHT, else x's
    rstd_M   [M]      fp32, saved by forward for backward

Forward, per row, fp32 arithmetic (what transformers computes after `hidden_states.to(torch.float32)`):
    rstd = rsqrt(mean(x^2) + eps),  xn = x * rstd
    CAST_BEFORE_WEIGHT   y = w * xn.to(x.dtype)     Llama's form: qwen*, mixtral, olmoe, deepseek_v3, glm4_moe*
    else                 y = (w * xn).to(x.dtype)   gpt-oss's form
The product of two values of <= 16 bits is exact in fp32, so both forms round exactly as torch does.

Backward (autograd sees the cast as identity), fp32 throughout, then cast to x's dtype:
    g = dy * w,  dx = rstd * (g - xn * mean(g * xn))
    dw = sum over rows of dy * xn (xn cast to x.dtype first when CAST_BEFORE_WEIGHT), only with COMPUTE_DW: the
    weight is frozen in LoRA training and then that path is not even compiled. Each program loops over row
    blocks pid, pid + P, ... keeping its partial dw in registers and stores it to dw_partial [P, H]; the
    launcher sums the P rows (deterministic, no atomics). Without COMPUTE_DW, P = number of row blocks.

torch.compile: the launchers are also `torch.library.custom_op`s with fake implementations, used when compiling;
eager calls go to the launchers directly (a custom_op call costs ~10 us of host time, and a step calls the
norms some 700 times: 4-5 norms per layer, forward + recompute + backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import saved_tensors
from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["MAX_H", "RMSNormFunction", "rms_norm", "rms_norm_backward", "rms_norm_forward"]

# Liger-Kernel's limit for one row in registers (MAX_FUSED_SIZE); wider norms stay on transformers' path.
MAX_H = 65536
# Elements of one program's [BLOCK_M, BLOCK_H] tile: several rows per program for head_dim norms (128 -> 32 rows),
# one row of a hidden-size norm (2048 -> 2 rows, 2880 -> 1). Not swept yet (no GPU run of this kernel).
TILE_ELEMENTS = 4096


@triton.jit
def _row_starts(rows, inner, stride_outer, stride_inner):
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def rms_norm_forward_kernel(
    x_ptr, x_inner, x_stride_outer, x_stride_inner,
    w_ptr, y_ptr, rstd_ptr,
    M, H, eps,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]

    x_rows = _row_starts(rows, x_inner, x_stride_outer, x_stride_inner)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    xn = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if CAST_BEFORE_WEIGHT:
        y = w[None, :] * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        y = w[None, :] * xn
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def rms_norm_backward_kernel(
    dy_ptr, dy_inner, dy_stride_outer, dy_stride_inner,
    x_ptr, x_inner, x_stride_outer, x_stride_inner,
    w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    M, H,
    CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows < 2^31; offsets in int64
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x_rows = _row_starts(rows, x_inner, x_stride_outer, x_stride_inner)
        dy_rows = _row_starts(rows, dy_inner, dy_stride_outer, dy_stride_inner)
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xn = x * rstd[:, None]
        g = dy * w[None, :]
        mean_gxn = tl.sum(g * xn, axis=1) / H
        dx = (g - xn * mean_gxn[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * H + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if CAST_BEFORE_WEIGHT:
                xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * xn, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=col_mask)


def _row_layout(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(t or a contiguous copy, inner, stride_outer, stride_inner): t's rows addressed in two levels.

    Leading dims of size 1 are dropped and neighbours that are one strided dim merged; a copy is made only when
    the last dim is strided or more than two leading dims remain.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    dims: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 2:
        t = t.contiguous()
        dims = [(t.numel() // t.shape[-1], t.shape[-1])]
    if len(dims) == 2:
        (_, stride_outer), (inner, stride_inner) = dims
        return t, inner, stride_outer, stride_inner
    size, stride = dims[0] if dims else (1, t.shape[-1])
    return t, size, 0, stride


def _blocks(num_cols: int, num_rows: int, block_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps)."""
    block_h = next_power_of_2(num_cols)
    if not block_rows:
        block_rows = min(max(1, TILE_ELEMENTS // block_h), next_power_of_2(max(num_rows, 1)))
    if block_rows & (block_rows - 1):
        raise ValueError(f"block_rows: expected a power of 2, got {block_rows}")
    # Liger-Kernel's calculate_settings (num_warps by block size), taken as it is.
    elements = block_rows * block_h
    num_warps = 32 if elements >= 32768 else 16 if elements >= 8192 else 8 if elements >= 2048 else 4
    return block_rows, block_h, num_warps


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x, weight: expected x [..., H] and weight [H], got {list(x.shape)} and {list(weight.shape)}")
    if x.shape[-1] > MAX_H:
        raise ValueError(f"x: the fused RMSNorm takes rows of at most {MAX_H} elements, got {x.shape[-1]}")


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype


def _forward(x, weight, eps, cast_before_weight, block_rows=0):
    _check(x, weight)
    weight = weight.contiguous()  # the kernels read it as w_ptr + column (H elements: nothing to copy as a rule)
    num_cols = x.shape[-1]
    num_rows = x.numel() // num_cols if num_cols else 0
    y = torch.empty(x.shape, device=x.device, dtype=_output_dtype(x, weight, cast_before_weight))
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if num_rows == 0 or num_cols == 0:
        return y, rstd
    x, inner, stride_outer, stride_inner = _row_layout(x)
    block_m, block_h, num_warps = _blocks(num_cols, num_rows, block_rows)
    launch_kernel(
        rms_norm_forward_kernel, (cdiv(num_rows, block_m),),
        x, inner, stride_outer, stride_inner,
        weight, y, rstd,
        num_rows, num_cols, float(eps),
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y, rstd


def _num_dw_programs(device: torch.device, num_blocks: int) -> int:
    if device.type != "cuda":
        return min(num_blocks, 4)  # the interpreter: small, so that tests loop over several row blocks
    return min(num_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _backward(dy, x, weight, rstd, cast_before_weight, compute_dw, block_rows=0):
    _check(x, weight)
    weight = weight.contiguous()
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected the shape of x {list(x.shape)}, got {list(dy.shape)}")
    num_cols = x.shape[-1]
    num_rows = x.numel() // num_cols if num_cols else 0
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if num_rows == 0 or num_cols == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else weight.new_empty(0))
    x, x_inner, x_stride_outer, x_stride_inner = _row_layout(x)
    dy, dy_inner, dy_stride_outer, dy_stride_inner = _row_layout(dy)
    block_m, block_h, num_warps = _blocks(num_cols, num_rows, block_rows)
    num_blocks = cdiv(num_rows, block_m)
    programs = _num_dw_programs(x.device, num_blocks) if compute_dw else num_blocks
    dw_partial = torch.empty(programs, num_cols, device=x.device, dtype=torch.float32) if compute_dw else rstd
    launch_kernel(
        rms_norm_backward_kernel, (programs,),
        dy, dy_inner, dy_stride_outer, dy_stride_inner,
        x, x_inner, x_stride_outer, x_stride_inner,
        weight, rstd.contiguous(), dx, dw_partial,
        num_rows, num_cols,
        CAST_BEFORE_WEIGHT=cast_before_weight, COMPUTE_DW=compute_dw, BLOCK_M=block_m, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx, dw


@torch.library.custom_op("moetune::rms_norm_forward", mutates_args=())
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cast_before_weight: bool, block_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., H], rstd [...] fp32) of x [..., H] (any strides) and weight [H]. See the module docstring.

    block_rows: rows per program (a power of 2), 0 for the default (tests pass small ones to cover row tails).
    """
    return _forward(x, weight, eps, cast_before_weight, block_rows)


@rms_norm_forward.register_fake
def _(x, weight, eps, cast_before_weight, block_rows=0):
    return (
        x.new_empty(x.shape, dtype=_output_dtype(x, weight, cast_before_weight)),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.custom_op("moetune::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, cast_before_weight: bool,
    compute_dw: bool, block_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [..., H] in x's dtype, dw [H] in weight's dtype, or an empty tensor without compute_dw)."""
    return _backward(dy, x, weight, rstd, cast_before_weight, compute_dw, block_rows)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, cast_before_weight, compute_dw, block_rows=0):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else (0,))


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) * weight in one kernel; backward in one kernel (plus a [P, H] sum when dw is needed).

    Saved: x as given (a view, no copy), weight, rstd [M] fp32. Recomputed in backward: xn = x * rstd.
    dw is computed only when weight requires grad. A frozen weight parameter is held on ctx rather than saved
    (moetune/saved_tensors.py).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, cast_before_weight, block_rows):
        if torch.compiler.is_compiling():
            y, rstd = torch.ops.moetune.rms_norm_forward(x, weight, eps, cast_before_weight, block_rows)
        else:
            y, rstd = _forward(x, weight, eps, cast_before_weight, block_rows)
        saved_tensors.save(ctx, x, weight, rstd)
        ctx.cast_before_weight = cast_before_weight
        ctx.block_rows = block_rows
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = saved_tensors.load(ctx)
        compute_dw = ctx.needs_input_grad[1]
        args = (dy, x, weight, rstd, ctx.cast_before_weight, compute_dw, ctx.block_rows)
        if torch.compiler.is_compiling():
            dx, dw = torch.ops.moetune.rms_norm_backward(*args)
        else:
            dx, dw = _backward(*args)
        return (dx if ctx.needs_input_grad[0] else None), (dw if compute_dw else None), None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, cast_before_weight: bool = True, block_rows: int = 0
) -> torch.Tensor:
    """RMSNorm of x [..., H] over its last dim, times weight [H], differentiable in x and weight.

    cast_before_weight=True: `weight * x_normed.to(x.dtype)` (Llama and most models); False:
    `(weight * x_normed).to(x.dtype)` (gpt-oss). CUDA, or CPU under TRITON_INTERPRET=1 (fp32/fp16).
    """
    return RMSNormFunction.apply(x, weight, float(eps), bool(cast_before_weight), int(block_rows))
