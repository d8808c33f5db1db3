"""The routing plan's stable sort of the S = T*K (token, slot) pairs by expert, as a counting sort in three launches.

torch's version (moetune.experts.routing) is about ten ops: a stable radix sort of int64 keys (several passes,
each a launch), the inverse permutation, a histogram, a cumulative sum, casts. In a whole-model step of
Qwen3-30B-A3B at 8K tokens (48 MoE layers, each planned in forward and again in the checkpoint's recompute), the
plan took ~0.46 ms of host time per call and ~9 ms of GPU time per step, and the host is what the step waits for
(run 51). Here an expert has at most E <= 1024 ids, so counting is cheaper than sorting:

  1. block_counts_kernel   per block of BLOCK pairs: how many pairs go to each expert        hist [NB, E] int32
  2. block_offsets_kernel  one program: per expert, the pairs of earlier blocks (exclusive prefix over blocks,
                           in place in hist), each expert's total (counts_E) and their cumulative sum (offsets_E)
  3. scatter_kernel        per block: a pair's sorted row = rows of earlier experts + its expert's pairs in
                           earlier blocks + its rank among its expert's pairs in this block (a cumulative sum
                           of the block's one-hot [BLOCK, E] over pairs); writes the four [S] index arrays

The rank follows pair order, so rows of one expert keep token order: the result is exactly torch's stable sort.
An id outside [0, E) is skipped here (nothing is written out of bounds); check_inputs reports it with a
device-side assert, as CUDA's own index checks in the torch version would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["MAX_EXPERTS", "expert_sort"]

MAX_EXPERTS = 1024
# A block's one-hot tile [BLOCK, E_P2] and its cumulative sum stay in registers: 16K int32 elements each.
TILE_ELEMENTS = 16384


@triton.jit
def _one_hot(ids, E_P2: tl.constexpr):
    return (ids[:, None] == tl.arange(0, E_P2)[None, :]).to(tl.int32)


@triton.jit
def block_counts_kernel(ids_ptr, hist_ptr, S, E, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    block = tl.program_id(0)
    pair = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + pair, mask=pair < S, other=-1).to(tl.int32)
    counts = tl.sum(_one_hot(ids, E_P2), axis=0)
    expert = tl.arange(0, E_P2)
    tl.store(hist_ptr + block * E + expert, counts, mask=expert < E)


@triton.jit
def block_offsets_kernel(hist_ptr, counts_ptr, offsets_ptr, NB, E, CHUNK: tl.constexpr, E_P2: tl.constexpr):
    expert = tl.arange(0, E_P2)
    in_range = expert < E
    carry = tl.zeros([E_P2], dtype=tl.int32)  # pairs of each expert in the blocks before this chunk
    for start in range(0, NB, CHUNK):
        block = start + tl.arange(0, CHUNK)
        mask = (block[:, None] < NB) & in_range[None, :]
        where = hist_ptr + block[:, None] * E + expert[None, :]
        counts = tl.load(where, mask=mask, other=0)
        tl.store(where, tl.cumsum(counts, axis=0) - counts + carry[None, :], mask=mask)
        carry += tl.sum(counts, axis=0)
    tl.store(counts_ptr + expert, carry.to(tl.int64), mask=in_range)
    tl.store(offsets_ptr + expert, tl.cumsum(carry, axis=0), mask=in_range)


@triton.jit
def scatter_kernel(ids_ptr, prefix_ptr, counts_ptr, offsets_ptr, perm_ptr, inv_perm_ptr, token_ptr, expert_ptr,
                   S, E, TOP_K, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    block = tl.program_id(0)
    pair = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + pair, mask=pair < S, other=-1).to(tl.int32)
    one_hot = _one_hot(ids, E_P2)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # same-expert pairs before it in the block
    expert = tl.arange(0, E_P2)
    in_range = expert < E
    first_row = tl.load(offsets_ptr + expert, mask=in_range, other=0) \
        - tl.load(counts_ptr + expert, mask=in_range, other=0).to(tl.int32)
    before = first_row + tl.load(prefix_ptr + block * E + expert, mask=in_range, other=0)
    row = tl.sum(one_hot * before[None, :], axis=1) + rank
    ok = (pair < S) & (ids >= 0) & (ids < E)
    tl.store(perm_ptr + row, pair.to(tl.int64), mask=ok)
    tl.store(inv_perm_ptr + pair, row.to(tl.int64), mask=ok)
    tl.store(token_ptr + row, (pair // TOP_K).to(tl.int64), mask=ok)
    tl.store(expert_ptr + row, ids.to(tl.int64), mask=ok)


def expert_sort(topk_ids: torch.Tensor, num_experts: int):
    """topk_ids [T, K] (any integer dtype) -> (perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E), as
    moetune.experts.routing.plan_routing defines them (int64, offsets_E int32)."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected 1 to {MAX_EXPERTS} for the counting sort, got {num_experts}")
    num_tokens, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_pairs, device = ids.numel(), ids.device
    e_p2 = next_power_of_2(num_experts)
    block = max(16, min(1024, TILE_ELEMENTS // e_p2))
    num_blocks = max(1, cdiv(num_pairs, block))
    hist = torch.empty((num_blocks, num_experts), dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=device)
    perm, inv_perm, token, expert = torch.empty((4, num_pairs), dtype=torch.int64, device=device).unbind(0)
    launch_kernel(block_counts_kernel, (num_blocks,), ids, hist, num_pairs, num_experts, BLOCK=block, E_P2=e_p2)
    launch_kernel(block_offsets_kernel, (1,), hist, counts, offsets, num_blocks, num_experts,
                  CHUNK=max(1, TILE_ELEMENTS // e_p2), E_P2=e_p2, num_warps=4)
    launch_kernel(scatter_kernel, (num_blocks,), ids, hist, counts, offsets, perm, inv_perm, token, expert,
                  num_pairs, num_experts, top_k, BLOCK=block, E_P2=e_p2)
    return perm, inv_perm, token, expert, counts, offsets
