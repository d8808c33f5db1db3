"""AdamW over many fp32 parameters in one launch, its two moments kept in bfloat16 with stochastic rounding.

Shape legend: P parameters (segments), B blocks of BLOCK elements, N elements in all (the moments' flat length).

    for each parameter s, elements i (one program per block of one parameter):
        p  = p * (1 - lr * wd)                                  decoupled weight decay, as torch's AdamW
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g * g
        p  = p - lr / bc1[s] * m / (sqrt(v / bc2[s]) + eps)      bc: the bias corrections of s's own step count
        m, v stored in bf16, rounded stochastically

Operands: param_ptrs, grad_ptrs [P] (int64 addresses of the fp32 parameters and their gradients, each contiguous;
read in place: a concatenated copy of the gradients would be a transient as large as them at the step),
exp_avg / exp_avg_sq [N] bf16 (flat state, parameter s at base[s]),
block_segment / block_offset [B] (which parameter, which element of it each block starts at), base [P], numel [P],
seeds [P] (each parameter's own rounding seed: two parameters, or two chunks of the step in backward, never share
their noise), corrections [P, 3] fp32 (bc1, bc2, step; bc1 = 0: the parameter has no gradient this step and is left
as it is), or, where every parameter has a gradient and the same step count (UNIFORM, the usual case), the three as
scalars: no table to upload, so no copy from the host at each step (a blocking one waits for the GPU). The noise is
keyed by (seed, step, element): a run resumed from a checkpoint draws what the uninterrupted run drew. The step
comes as a float (exact to 2**24): an int argument would be a new specialisation key at every launch.

Why bf16 moments: they halve AdamW's 8 bytes of state per parameter (2.4 GiB for the 643M LoRA parameters of a
whole Qwen3-30B-A3B), memory the checkpoint planner spends on speed. Why stochastic rounding: the second moment
moves by (1 - beta2) = 0.1% of itself per step, under bf16's half-ulp (0.2%): rounded to nearest it would stay put;
rounded up with probability equal to the fraction dropped, its expected value follows the fp32 recurrence. Why one
launch: a chunk of the step in backward (training/step_in_backward.py) holds ~15 parameters; bitsandbytes' 8-bit
AdamW steps each with its own launches and Python, which cost whole Qwen3 ~95 ms a step (NOTES run 50f).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch as launch_kernel

BLOCK = 1024  # elements per program; parameters are laid out so that no block spans two


@triton.jit
def _round_bf16_stochastic(x, random):
    """fp32 -> bf16, up with probability equal to the fraction of an ulp dropped (x finite); random: 32 random bits
    per element."""
    noise = (random & 0xFFFF).to(tl.uint32)
    bits = x.to(tl.uint32, bitcast=True) + noise  # the low half carries into the kept half with that probability
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the dropped bits are zero


@triton.jit
def adamw_kernel(
    param_ptrs, grad_ptrs, exp_avg, exp_avg_sq, block_segment, block_offset, base, numel, seeds, corrections,
    lr, beta1, beta2, eps, weight_decay, bc1_all, bc2_all, step_all,
    BLOCK: tl.constexpr, UNIFORM: tl.constexpr, LR_IN_MEMORY: tl.constexpr,
):
    pid = tl.program_id(0)
    if LR_IN_MEMORY:  # a one-element device tensor: a CUDA graph's replays read the schedule's current value
        lr = tl.load(lr).to(tl.float32)
    segment = tl.load(block_segment + pid)
    if UNIFORM:
        bc1 = bc1_all
        bc2 = bc2_all
        step = step_all
    else:
        bc1 = tl.load(corrections + 3 * segment)
        if bc1 == 0.0:  # no gradient this step
            return
        bc2 = tl.load(corrections + 3 * segment + 1)
        step = tl.load(corrections + 3 * segment + 2)
    seed = (tl.load(seeds + segment) + step.to(tl.int64) * 1000003) & 0x7FFFFFFF
    idx = tl.load(block_offset + pid) + tl.arange(0, BLOCK)
    mask = idx < tl.load(numel + segment)
    flat = tl.load(base + segment) + idx
    p_ptr = tl.load(param_ptrs + segment).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(grad_ptrs + segment).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    m = tl.load(exp_avg + flat, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq + flat, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - (lr / bc1) * m / (tl.sqrt(v / bc2) + eps)
    tl.store(p_ptr + idx, p, mask=mask)
    random_m, random_v, _, _ = tl.randint4x(seed, idx)  # keyed by the element within the parameter
    tl.store(exp_avg + flat, _round_bf16_stochastic(m, random_m), mask=mask)
    tl.store(exp_avg_sq + flat, _round_bf16_stochastic(v, random_v), mask=mask)


def adamw_step(param_ptrs, grad_ptrs, exp_avg, exp_avg_sq, block_segment, block_offset, base, numel, seeds,
               corrections, *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> None:
    """One AdamW step of every parameter in the tables (see the module docstring), in place. corrections: the
    [P, 3] device table, or (bc1, bc2, step) for every parameter. lr: a float, or a one-element float32 tensor on
    the parameters' device, read by the kernel (what a captured step needs: AdamWBf16(capturable=True))."""
    uniform = isinstance(corrections, tuple)
    lr_in_memory = isinstance(lr, torch.Tensor)
    launch_kernel(
        adamw_kernel, (block_segment.numel(),),
        param_ptrs, grad_ptrs, exp_avg, exp_avg_sq, block_segment, block_offset, base, numel, seeds,
        base if uniform else corrections,  # not read when uniform
        lr if lr_in_memory else float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        *((float(c) for c in corrections) if uniform else (1.0, 1.0, 1.0)),
        BLOCK=BLOCK, UNIFORM=uniform, LR_IN_MEMORY=lr_in_memory, num_warps=4,
    )
