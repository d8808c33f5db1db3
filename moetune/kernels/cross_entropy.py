"""Cross-entropy forward and backward of one chunk of logits, gradient written over the logits in place.

Shape legend: N rows of the chunk, V vocabulary.

    logits_NV [N, V]   bf16 / fp16 / fp32, rows contiguous (stride(1) == 1, any row stride)
    targets_N [N]      int64; ignore_index marks a row without a target
    loss_N    [N]      fp32, returned

Per row, one program, two passes over V in blocks of BLOCK_V (fp32 arithmetic throughout):
    pass 1   m, d = running max and sum of exp(x - m) (online softmax), then
             loss = m + log(d) - x[target]                      (= logsumexp(x) - x[target])
    pass 2   x <- (exp(x - logsumexp(x)) - onehot(target)) * scale, cast back to the logits' dtype
Rows with target == ignore_index get loss 0 and an all-zero gradient row. A target outside [0, V)
(other than ignore_index) gives a NaN loss instead of an out-of-bounds read.

The caller (moetune/linear_cross_entropy.py) multiplies the gradient rows into the weight right
after, so the logits chunk is the only [N, V] buffer and it is never upcast to fp32 in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch as launch_kernel
from .sizes import next_power_of_2

__all__ = ["block_size", "cross_entropy_"]

# Liger-Kernel's cross-entropy settings (ops/cross_entropy.py: BLOCK_SIZE = min(32768, next_pow2(V)),
# num_warps 32), taken as they are: not yet swept for this kernel on our GPUs.
MAX_BLOCK_V = 32768
NUM_WARPS = 32


@triton.jit
def cross_entropy_kernel(
    logits_ptr, stride_row, targets_ptr, loss_ptr,
    num_cols, ignore_index, scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, num_cols, BLOCK_V):
                offs = start + cols
                tl.store(row_ptr + offs, tl.zeros((BLOCK_V,), dtype=logits_ptr.dtype.element_ty), mask=offs < num_cols)
        return

    # Pass 1: online max and sum of exponentials.
    m = float("-inf")
    d = 0.0
    for start in range(0, num_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < num_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    in_range = (target >= 0) & (target < num_cols)
    x_target = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_target)

    # Pass 2: softmax - onehot, scaled, over the logits.
    if COMPUTE_GRAD:
        for start in range(0, num_cols, BLOCK_V):
            offs = start + cols
            mask = offs < num_cols
            x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(offs == target, g - 1.0, g) * scale
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


def block_size(num_cols: int) -> int:
    return min(MAX_BLOCK_V, next_power_of_2(num_cols))


@torch.library.custom_op("moetune::cross_entropy_", mutates_args=("logits",))
def cross_entropy_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: float, compute_grad: bool, block_v: int
) -> torch.Tensor:
    """Per-row loss [N] (fp32) of logits [N, V] against targets [N]; with compute_grad, logits <- dloss/dlogits * scale.

    block_v: columns per block (a power of 2), 0 for the default (tests pass small ones to cover V tails).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a 2-D tensor with contiguous rows, got shape {list(logits.shape)} "
                         f"strides {list(logits.stride())}")
    if compute_grad and logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:  # the gradient goes over them
        raise ValueError(f"logits: rows overlap in memory (row stride {logits.stride(0)} < {logits.shape[1]} columns); "
                         "expected rows of their own, as the gradient is written in place")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets: expected int64 of shape [{logits.shape[0]}], got {targets.dtype} {list(targets.shape)}")
    num_rows, num_cols = logits.shape
    loss = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
    if num_rows == 0:
        return loss
    block_v = block_v or block_size(num_cols)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v: expected a power of 2, got {block_v}")
    launch_kernel(
        cross_entropy_kernel, (num_rows,),
        logits, logits.stride(0), targets.contiguous(), loss,
        num_cols, ignore_index, float(scale),
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )
    return loss


@cross_entropy_.register_fake
def _(logits, targets, ignore_index, scale, compute_grad, block_v):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
