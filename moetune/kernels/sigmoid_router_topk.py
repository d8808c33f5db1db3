"""A sigmoid router's group-limited top-k in one kernel each way (DeepSeek-V3, GLM-4.5, GLM-4.7-Flash).

Shape legend: T tokens, E experts, G expert groups of E / G, K the experts a token is routed to (top_k).

    logits_TE   [T, E]  fp32 / fp16 / bf16, rows contiguous (the router Linear's output)
    bias_E      [E]     e_score_correction_bias: moves the choice, not the weights
    weights_TK  [T, K]  the logits' dtype: the routing weights, in order of falling choice score
    ids_TK      [T, K]  int64: their experts

Forward, per row, in fp32, as transformers' DeepseekV3TopkRouter / Glm4MoeTopkRouter / Glm4MoeLiteTopkRouter write
it (5.17 - 5.25):
    s = sigmoid(l), rounded to the logits' dtype (transformers' sigmoid runs in it: bf16 under autocast, where the
    rounding decides near-equal choices)      c = s + bias        (the choice score, fp32)
    with G > 1: each group's score is the sum of its two largest c; the TOPK_GROUPS best groups stay, the others'
    experts are out of the choice
    the K largest c among the experts left (NaN counts as the largest, as in torch.topk); among equal scores the
    lower id, as torch.topk's CUDA kernel chooses the k-th value's ties (the same for the groups)
    w_j = s_j / (sum_{i chosen} s_i + 1e-20) when NORMALIZE, else s_j;    w_j *= scale (routed_scaling_factor)
transformers returns its top-k unsorted (an order its CUDA kernel leaves); here in order of falling c, so the sum
over a token's K experts adds in another order: equal to fp32 rounding, not bitwise.

Backward, fp32, given g = d weights [T, K]; with D = sum of the chosen s + 1e-20:
    d s_j = scale * (g_j / D - sum_i g_i s_i / D^2)  when NORMALIZE, else scale * g_j
    d l_j = d s_j * s_j * (1 - s_j) on the chosen experts, 0 elsewhere (the bias and the choice carry none)
written in the logits' dtype. Saved: the logits (T x E: 2 MiB a layer at 8K tokens for GLM-4.7-Flash's 64 experts
in fp32) and the ids; s is recomputed from the K chosen logits.

Against transformers' ops: about 20 launches in forward (sigmoid, add, two top-k over groups, zeros, scatter, mask,
the top-k, gather, sum, division, scale and their copies) and 15 in backward, each also a Python call, in forward,
the checkpointing recompute and backward: ~57 a layer, ~2,600 a GLM-4.7-Flash step at 46 MoE layers. Here one each way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import saved_tensors
from .launch import launch as launch_kernel
from .router_topk import MAX_BLOCK_T, top_k_of
from .sizes import cdiv, next_power_of_2

__all__ = ["MAX_E", "MAX_GROUPS", "SigmoidTopKFunction", "sigmoid_router_topk"]

MAX_E = 1024  # one row of scores in registers (DeepSeek-V3: 256)
MAX_GROUPS = 64  # each group is a pass over the row's tile (DeepSeek-V3: 8)
# One program's [BLOCK_T, BLOCK_E] tile, 4 warps: half the softmax router's (router_topk.py), as this kernel keeps
# more of it live (scores, choice keys, the groups' mask). Compiled for sm_90a: 4096 took 229-248 registers at 160
# and 256 experts (no spills); tests/kernels/compile_router_topk.py checks the bound.
TILE_ELEMENTS = 2048
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def sigmoid_topk_forward_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, scale,
    E: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    TOPK_GROUPS: tl.constexpr, G_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_PAD)
    in_row = cols < E
    mask = (rows < T)[:, None] & in_row[None, :]
    l = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(l).to(logits_ptr.dtype.element_ty).to(tl.float32)  # rounded as transformers' sigmoid (autocast)
    bias = tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    c = s + bias[None, :]
    key = tl.where(c != c, float("inf"), c)  # NaN as the largest value, as torch.topk orders it
    available = in_row[None, :] & (rows >= 0)[:, None]
    if GROUPS > 1:
        group = cols // GROUP_SIZE
        gslots = tl.arange(0, G_PAD)
        group_score = tl.zeros((BLOCK_T, G_PAD), dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            in_group = available & (group == g)[None, :]
            first = tl.max(tl.where(in_group, key, float("-inf")), axis=1)
            first_id = tl.min(tl.where(in_group & (key == first[:, None]), cols[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(in_group & (cols[None, :] != first_id[:, None]), key, float("-inf")), axis=1)
            group_score = tl.where(gslots[None, :] == g, (first + second)[:, None], group_score)
        groups_left = (gslots < GROUPS)[None, :] & (rows >= 0)[:, None]
        kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _j in tl.static_range(TOPK_GROUPS):
            best = tl.max(tl.where(groups_left, group_score, float("-inf")), axis=1)
            pick = tl.min(tl.where(groups_left & (group_score == best[:, None]), gslots[None, :], G_PAD), axis=1)
            groups_left = groups_left & (gslots[None, :] != pick[:, None])
            kept = kept | (group[None, :] == pick[:, None])
        available = available & kept
    chosen_s, chosen_id = top_k_of(key, s, available, cols, slots, TOP_K, BLOCK_T, K_PAD, BLOCK_E)
    weights = chosen_s
    if NORMALIZE:
        weights = weights / (tl.sum(chosen_s, axis=1) + 1e-20)[:, None]
    weights = weights * scale
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = (rows < T)[:, None] & (slots < TOP_K)[None, :]
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out, chosen_id.to(tl.int64), mask=out_mask)


@triton.jit
def sigmoid_topk_backward_kernel(
    logits_ptr, ids_ptr, grad_ptr, grad_logits_ptr, T, scale,
    E: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_PAD)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    k_mask = row_mask[:, None] & (slots < TOP_K)[None, :]
    ids = tl.load(ids_ptr + rows64[:, None] * TOP_K + slots[None, :], mask=k_mask, other=0)
    l = tl.load(logits_ptr + rows64[:, None] * E + ids, mask=k_mask, other=0.0).to(tl.float32)
    s = tl.where(k_mask, tl.sigmoid(l).to(logits_ptr.dtype.element_ty).to(tl.float32), 0.0)
    g = tl.load(grad_ptr + rows64[:, None] * TOP_K + slots[None, :], mask=k_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        denominator = tl.sum(s, axis=1) + 1e-20
        d_s = (g / denominator[:, None] - (tl.sum(g * s, axis=1) / (denominator * denominator))[:, None]) * scale
    else:
        d_s = g * scale
    d_l = d_s * s * (1.0 - s)
    dense = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        in_slot = slots[None, :] == j
        pick = tl.sum(tl.where(in_slot, ids, 0), axis=1)
        value = tl.sum(tl.where(in_slot, d_l, 0.0), axis=1)
        dense = tl.where(cols[None, :] == pick[:, None], value[:, None], dense)
    mask = row_mask[:, None] & (cols < E)[None, :]
    tl.store(grad_logits_ptr + rows64[:, None] * E + cols[None, :], dense.to(grad_logits_ptr.dtype.element_ty),
             mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = next_power_of_2(num_experts)
    return min(MAX_BLOCK_T, max(1, TILE_ELEMENTS // block_e)), block_e


def check_routing(num_experts: int, top_k, num_groups, topk_groups) -> str | None:
    """Why the kernel cannot route this way (a one-line reason naming the argument), or None."""
    for name, value in (("top_k", top_k), ("num_groups", num_groups), ("topk_groups", topk_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name}: expected a positive integer, got {value!r}"
    if not 1 <= num_experts <= MAX_E:
        return f"logits: expected 1 to {MAX_E} experts, got {num_experts}"
    if num_groups > MAX_GROUPS or num_experts % num_groups:
        return f"num_groups: expected a divisor of the {num_experts} experts up to {MAX_GROUPS}, got {num_groups}"
    if num_groups > 1 and num_experts // num_groups < 2:  # a group's score is its two best experts
        return f"num_groups: expected groups of 2 experts or more, got {num_groups} groups of {num_experts}"
    if topk_groups > num_groups:
        return f"topk_groups: expected at most num_groups={num_groups}, got {topk_groups}"
    if top_k > topk_groups * (num_experts // num_groups):
        return f"top_k: expected at most the {topk_groups * (num_experts // num_groups)} experts of the chosen groups, " \
               f"got {top_k}"
    return None


def _forward(logits, bias, top_k, num_groups, topk_groups, normalize, scale):
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, device=logits.device, dtype=logits.dtype)
    ids = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
    if num_tokens:
        block_t, block_e = _blocks(num_experts)
        launch_kernel(
            sigmoid_topk_forward_kernel, (cdiv(num_tokens, block_t),),
            logits, bias, weights, ids, num_tokens, scale,
            E=num_experts, TOP_K=top_k, K_PAD=next_power_of_2(top_k), GROUPS=num_groups,
            GROUP_SIZE=num_experts // num_groups, TOPK_GROUPS=topk_groups, G_PAD=next_power_of_2(num_groups),
            NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
        )
    return weights, ids


def _backward(grad_weights, logits, ids, normalize, scale):
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty_like(logits)
    if num_tokens:
        block_t, block_e = _blocks(num_experts)
        launch_kernel(
            sigmoid_topk_backward_kernel, (cdiv(num_tokens, block_t),),
            logits, ids, grad_weights.contiguous(), grad_logits, num_tokens, scale,
            E=num_experts, TOP_K=ids.shape[1], K_PAD=next_power_of_2(ids.shape[1]), NORMALIZE=normalize,
            BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
        )
    return grad_logits


class SigmoidTopKFunction(torch.autograd.Function):
    """(weights, ids) = the sigmoid router's group-limited top-k; differentiable in the logits through the weights.

    Saved: the logits and the chosen ids. Recomputed in backward: the chosen experts' sigmoid.
    """

    @staticmethod
    def forward(ctx, logits, bias, top_k, num_groups, topk_groups, normalize, scale):
        weights, ids = _forward(logits, bias, top_k, num_groups, topk_groups, normalize, scale)
        saved_tensors.save(ctx, logits, ids)
        ctx.normalize, ctx.scale = normalize, scale
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        logits, ids = saved_tensors.load(ctx)
        return _backward(grad_weights, logits, ids, ctx.normalize, ctx.scale), None, None, None, None, None, None


def sigmoid_router_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, *, num_groups: int = 1,
                        topk_groups: int = 1, normalize: bool = True, scale: float = 1.0):
    """(weights [T, K] in the logits' dtype, ids [T, K] int64) of a sigmoid router's logits [T, E] with the choice
    bias [E] (None: zeros): see the module docstring. CUDA, or CPU under TRITON_INTERPRET=1 (fp32/fp16)."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits: expected a float [T, E] tensor, got {logits.dtype} {list(logits.shape)}")
    why = check_routing(logits.shape[1], top_k, num_groups, topk_groups)
    if why is not None:
        raise ValueError(why)
    if bias is None:
        bias = logits.new_zeros(logits.shape[1], dtype=torch.float32)
    elif bias.shape != (logits.shape[1],) or bias.dtype not in _DTYPES or bias.device != logits.device:
        raise ValueError(f"bias: expected a float [{logits.shape[1]}] tensor on {logits.device}, got {bias.dtype} "
                         f"{list(bias.shape)} on {bias.device}")
    return SigmoidTopKFunction.apply(logits.contiguous(), bias.detach().contiguous(), top_k, num_groups, topk_groups,
                                     bool(normalize), float(scale))
