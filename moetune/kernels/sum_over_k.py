"""The experts' sum over each token's k slots, out[t] = sum_k y[t, k], as one bandwidth-bound launch.

The triton backend's down projection stores each routed row, already scaled by its routing weight, in (token,
slot) order, and the input gradient's dgrad does the same; the block's output (and the input gradient) is then
the sum over the k slots:

    y_TKH    [T, K, H]  contiguous, fp32 / fp16 / bf16
    out_TH   [T, H]     y's dtype; out[t, h] = y[t, 0, h] + ... + y[t, K-1, h], in fp32 in slot order, rounded once

torch's `y.sum(dim=1)` computes the same sums (fp32 accumulation, one rounding) but its reduction kernel reads
[T, 4, 2048] bf16 at ~2.1-2.25 TB/s on an H100 (runs 57e and 68b: GLM-4.7-Flash's 16K block 149 us a call, two a
step; its whole 8K step ~7 ms), two thirds of the 3.35 TB/s HBM3 gives. Here each program adds K tiles of
[BLOCK_T, BLOCK_H], read row by row with 16-byte loads, and stores its tile once: 2.73-2.95 TB/s on an H100 at
the shapes of Qwen3, gpt-oss and GLM-4.7-Flash (run 73; GLM's 16K call 150.6 -> ~115 us).

Deterministic: the same inputs give the same bits (slot order, no atomics). Against torch's sum an output can
differ in its last bit where torch's fp32 sums are taken in another order (tests/kernels/test_sum_over_k.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["check_input", "default_tile", "sum_over_k"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Off CUDA only Triton's interpreter runs the kernel, and it truncates fp32 -> bf16 instead of rounding to nearest:
# wrong sums, silently. (benchmarks/host_cost.py adds bf16 here: it skips the kernel bodies.)
CPU_DTYPES = (torch.float32, torch.float16)
# Rows and columns a program: one row of up to 2048 elements, 8 a thread at 8 warps (one 16-byte load a slot in
# bf16). Run 73's sweep on an H100 (benchmarks/sum_over_k_ab.py, 11 tiles, five cases): 1 x 2048 at 8 warps was the
# fastest in every case, 2.73-2.95 TB/s, 2-5% ahead of the 8 x 256 tile first written here.
BLOCK_T = 1
BLOCK_H = 2048
NUM_WARPS = 8


@triton.jit
def sum_over_k_kernel(y_ptr, out_ptr, T, H, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    y_offs = rows[:, None] * (K * H) + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):  # slot order, as a sequential fp32 sum would add them
        acc += tl.load(y_ptr + y_offs + k * H, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_input(y: torch.Tensor) -> str | None:
    """Why sum_over_k cannot take y (None when it can)."""
    if y.dim() != 3:
        return f"expected a [T, K, H] tensor, got shape {list(y.shape)}"
    if y.dtype not in DTYPES:
        return f"expected fp32, fp16 or bf16, got {y.dtype}"
    if not y.is_contiguous():
        return f"expected a contiguous tensor, got strides {list(y.stride())}"
    if y.device.type != "cuda" and y.dtype not in CPU_DTYPES:
        return "bf16 needs a CUDA GPU (Triton's interpreter rounds it wrongly); use fp32 or fp16 on the CPU"
    return None


def default_tile(H: int) -> dict:
    """sum_over_k's launch settings for rows of H columns: BLOCK_H capped at H's next power of 2 (at least 16)."""
    return dict(block_t=BLOCK_T, block_h=min(BLOCK_H, max(16, next_power_of_2(H))), num_warps=NUM_WARPS)


def sum_over_k(y: torch.Tensor, *, block_t: int | None = None, block_h: int | None = None,
               num_warps: int | None = None) -> torch.Tensor:
    """y [T, K, H] summed over dim 1 in one launch: [T, H] in y's dtype (see the module docstring). CUDA, or CPU
    under TRITON_INTERPRET=1 (fp32 / fp16). block_t, block_h (powers of 2) and num_warps, each default_tile(H)'s
    where not given, are for the benchmark's sweep."""
    problem = check_input(y)
    if problem is not None:
        raise ValueError(f"sum_over_k: y: {problem}")
    T, K, H = y.shape
    out = y.new_empty(T, H)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    tile = default_tile(H)
    block_t, block_h, num_warps = block_t or tile["block_t"], block_h or tile["block_h"], num_warps or tile["num_warps"]
    grid = (cdiv(T, block_t), cdiv(H, block_h))
    launch_kernel(sum_over_k_kernel, grid, y, out, T, H, K=K, BLOCK_T=block_t, BLOCK_H=block_h,
                  num_warps=num_warps)
    return out
