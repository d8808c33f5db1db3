"""A softmax router's top-k in one kernel each way: softmax, top-k and the weights' normalisation, and their gradient.

Shape legend: T tokens, E experts, K the experts a token is routed to (top_k).

    logits_TE   [T, E]  fp32 / fp16 / bf16, rows contiguous (the router Linear's output)
    weights_TK  [T, K]  out_dtype: the routing weights, in order of falling logit
    ids_TK      [T, K]  int64: their experts

Forward, per row, in fp32 (what transformers' routers compute after `softmax(logits, dtype=float)`):
    e = exp(l - max(l))                       p = e / sum(e)
    the K largest logits, in falling order (NaN counts as the largest, as in torch.topk); among equal logits the
    lower expert id, as torch.topk's CUDA kernel chooses (the values above the k-th, then the k-th value's first
    ids; its CPU and ROCm kernels choose otherwise). Softmax keeps the order of the logits, so choosing on them
    chooses as transformers' choice on p does, except where two distinct logits round to one p (far below the row's
    largest, or p underflowing to 0: experts whose weights are ~0 either way)
    NORMALIZE   w_j = e_j / sum_{i chosen} e_i     = p_j / sum of the chosen p (qwen3_moe, mixtral, gpt-oss's
                                                     softmax over the top logits: the same quantity)
    else        w_j = p_j                          (qwen2_moe, olmoe with norm_topk_prob off)
The weights are rounded once, to out_dtype; transformers rounds p, the sum and the quotient to fp32 on the way, and
on GPUs tl.exp is an approximate exp2, so the two agree to ~1e-6 relative before that rounding, not bitwise.

Backward, fp32, given g = d weights [T, K] (scattered to g_E over the chosen experts, 0 elsewhere):
    NORMALIZE   s = w on the chosen experts, 0 elsewhere:  d logits = s * (g_E - sum(s * g_E))  (0 off the chosen)
    else        d logits = p * (g_E - sum_j p_j g_j)                                           (every expert)
written in the logits' dtype. The logits are saved (T x E: 2 MiB a layer at 8K tokens for Qwen3-30B-A3B in bf16);
e and p are recomputed from them.

Against transformers' ops: forward softmax, topk, sum, div, cast (five launches; torch's top-k alone took 57 us at
8K tokens on an H200, run 51d's profile), backward cast, div, sum, the top-k's scatter into zeros and softmax's
backward, each of them a launch and a Python call in forward, the checkpointing recompute and backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import saved_tensors
from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["MAX_E", "RouterTopKFunction", "router_topk", "router_topk_backward", "router_topk_forward"]

# One row of logits in registers: moetune's models route over 32-256 experts. Wider routers stay on transformers'.
MAX_E = 1024
# One program's [BLOCK_T, BLOCK_E] tile: 4096 elements (128 experts -> 32 rows), at most 64 rows so that a few
# experts still spread 8K tokens over 128 programs. 4 warps. Not swept (no GPU run yet). E is a constexpr: an E
# not a multiple of 16 as a runtime value costs a 64-bit address per element (compiled for sm_90a: 60 experts,
# k = 8, 253 registers and spills; as a constexpr 91-124, none).
TILE_ELEMENTS = 4096
MAX_BLOCK_T = 64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softmax_parts(logits_ptr, rows, cols, T, E):
    """(l, e = exp(l - max l), sum of e) of a [BLOCK_T, BLOCK_E] tile in fp32; -inf and 0 past E."""
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    l = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=mask, other=float("-inf"))
    l = l.to(tl.float32)
    top = tl.max(l, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # rows past T: no NaN from -inf - -inf
    e = tl.exp(l - top[:, None])
    return l, e, tl.sum(e, axis=1)


@triton.jit
def top_k_of(key, values, available, cols, slots, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr,
             BLOCK_E: tl.constexpr):
    """(values [BLOCK_T, K_PAD] fp32, ids int32) of the TOP_K largest keys of each row among the available experts,
    in falling order, the lowest id among equal keys (as torch.topk's CUDA kernel takes the k-th value's). Chosen
    experts leave a mask, not a key set to -inf: a row of -inf keys still gives TOP_K different experts."""
    chosen = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    chosen_id = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(available, key, float("-inf")), axis=1)
        pick = tl.min(tl.where(available & (key == best[:, None]), cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        chosen = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, values, 0.0), axis=1)[:, None], chosen)
        chosen_id = tl.where(slots[None, :] == j, pick[:, None], chosen_id)
        available = available & (cols[None, :] != pick[:, None])
    return chosen, chosen_id


@triton.jit
def router_topk_forward_kernel(
    logits_ptr, weights_ptr, ids_ptr, T,
    E: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_PAD)
    l, e, total = _softmax_parts(logits_ptr, rows, cols, T, E)
    key = tl.where(l != l, float("inf"), l)  # NaN as the largest value, as torch.topk orders it
    available = (cols < E)[None, :] & (rows >= 0)[:, None]
    chosen_e, chosen_id = top_k_of(key, e, available, cols, slots, TOP_K, BLOCK_T, K_PAD, BLOCK_E)
    if NORMALIZE:
        denominator = tl.sum(chosen_e, axis=1)
    else:
        denominator = total
    denominator = tl.where(rows < T, denominator, 1.0)  # rows past T: no 0 / 0
    weights = chosen_e / denominator[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask = (rows < T)[:, None] & (slots < TOP_K)[None, :]
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=mask)
    tl.store(ids_ptr + out, chosen_id.to(tl.int64), mask=mask)


@triton.jit
def router_topk_backward_kernel(
    logits_ptr, ids_ptr, grad_ptr, grad_logits_ptr, T,
    E: tl.constexpr, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    _, e, total = _softmax_parts(logits_ptr, rows, cols, T, E)
    g = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # d weights scattered to the chosen experts
    chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for j in tl.static_range(TOP_K):
        pick = tl.load(ids_ptr + rows64 * TOP_K + j, mask=row_mask, other=-1)
        g_j = tl.load(grad_ptr + rows64 * TOP_K + j, mask=row_mask, other=0.0).to(tl.float32)
        hit = cols[None, :] == pick[:, None]
        g = tl.where(hit, g_j[:, None], g)
        chosen = chosen | hit
    if NORMALIZE:
        s = tl.where(chosen, e, 0.0)
        denominator = tl.sum(s, axis=1)
    else:
        s = e
        denominator = total
    s = s / tl.where(row_mask, denominator, 1.0)[:, None]  # rows past T: no 0 / 0
    d = s * (g - tl.sum(s * g, axis=1)[:, None])
    mask = row_mask[:, None] & (cols < E)[None, :]
    tl.store(grad_logits_ptr + rows64[:, None] * E + cols[None, :], d.to(grad_logits_ptr.dtype.element_ty),
             mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = next_power_of_2(num_experts)
    return min(MAX_BLOCK_T, max(1, TILE_ELEMENTS // block_e)), block_e


def _check(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits: expected a float [T, E] tensor, got {logits.dtype} {list(logits.shape)}")
    if not 1 <= logits.shape[1] <= MAX_E:
        raise ValueError(f"logits: expected 1 to {MAX_E} experts, got {logits.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k: expected an integer in [1, {logits.shape[1]}], got {top_k!r}")


def _forward(logits, top_k, normalize, out_dtype):
    _check(logits, top_k)
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, device=logits.device, dtype=out_dtype)
    ids = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
    if num_tokens:
        block_t, block_e = _blocks(num_experts)
        launch_kernel(
            router_topk_forward_kernel, (cdiv(num_tokens, block_t),),
            logits, weights, ids, num_tokens,
            E=num_experts, TOP_K=top_k, K_PAD=next_power_of_2(top_k), NORMALIZE=normalize, BLOCK_T=block_t,
            BLOCK_E=block_e, num_warps=4,
        )
    return weights, ids


def _backward(grad_weights, logits, ids, normalize):
    logits = logits.contiguous()  # (saved as given: the forward's own copy is not kept)
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty_like(logits)
    if num_tokens:
        block_t, block_e = _blocks(num_experts)
        launch_kernel(
            router_topk_backward_kernel, (cdiv(num_tokens, block_t),),
            logits, ids, grad_weights.contiguous(), grad_logits, num_tokens,
            E=num_experts, TOP_K=ids.shape[1], NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
        )
    return grad_logits


@torch.library.custom_op("moetune::router_topk_forward", mutates_args=())
def router_topk_forward(
    logits: torch.Tensor, top_k: int, normalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] in out_dtype, ids [T, K] int64) of logits [T, E]. See the module docstring."""
    return _forward(logits, top_k, normalize, out_dtype)


@router_topk_forward.register_fake
def _(logits, top_k, normalize, out_dtype):
    return logits.new_empty(logits.shape[0], top_k, dtype=out_dtype), logits.new_empty(
        logits.shape[0], top_k, dtype=torch.int64)


@torch.library.custom_op("moetune::router_topk_backward", mutates_args=())
def router_topk_backward(
    grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """d logits [T, E] in the logits' dtype, from d weights [T, K]."""
    return _backward(grad_weights, logits, ids, normalize)


@router_topk_backward.register_fake
def _(grad_weights, logits, ids, normalize):
    return torch.empty_like(logits)


class RouterTopKFunction(torch.autograd.Function):
    """(weights, ids) = the router's top-k; differentiable in the logits through the weights.

    Saved: the logits and the chosen ids. Recomputed in backward: the softmax from the logits.
    """

    @staticmethod
    def forward(ctx, logits, top_k, normalize, out_dtype):
        if torch.compiler.is_compiling():
            weights, ids = torch.ops.moetune.router_topk_forward(logits, top_k, normalize, out_dtype)
        else:
            weights, ids = _forward(logits, top_k, normalize, out_dtype)
        saved_tensors.save(ctx, logits, ids)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        logits, ids = saved_tensors.load(ctx)
        if torch.compiler.is_compiling():
            grad_logits = torch.ops.moetune.router_topk_backward(grad_weights, logits, ids, ctx.normalize)
        else:
            grad_logits = _backward(grad_weights, logits, ids, ctx.normalize)
        return grad_logits, None, None, None


def router_topk(logits: torch.Tensor, top_k: int, *, normalize: bool, out_dtype: torch.dtype | None = None):
    """(weights [T, K], ids [T, K] int64): softmax over logits [T, E], its top_k, the weights normalised to sum to
    1 over the chosen experts when `normalize`, in out_dtype (default the logits'). CUDA, or CPU under
    TRITON_INTERPRET=1 (fp32/fp16)."""
    if isinstance(top_k, bool):  # (int() below would take it)
        raise ValueError(f"top_k: expected an integer, got {top_k!r}")
    return RouterTopKFunction.apply(logits, int(top_k), bool(normalize), out_dtype or logits.dtype)
