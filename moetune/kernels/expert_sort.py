"""The routing plan's stable sort of the S = T*K (token, slot) pairs by expert, as a counting sort in three launches.

torch's version (moetune.experts.routing) is about ten ops: a stable radix sort of int64 keys (several passes,
each a launch), the inverse permutation, a histogram, a cumulative sum, casts. That took 232 us of host time a
plan at Qwen3-30B-A3B's 8K routing (run 51f). A whole-model step plans 96 times (48 MoE layers, in forward and
again in the checkpoint's recompute), about 9 ms of kernels (run 51d), and that step waits for its host (run 51).
With at most 1024 experts, counting is cheaper than sorting:

  1. block_counts_kernel   per block of BLOCK pairs: how many pairs go to each expert        hist [NB, E] int32
  2. block_offsets_kernel  per group of EXPERT_GROUP experts: each expert's pairs in earlier blocks (exclusive
                           prefix over the blocks, in place in hist) and its total (counts_E)
  3. scatter_kernel        per block: a pair's sorted row = rows of earlier experts (the cumulative sum of
                           counts_E, offsets_E, which the first block also writes) + its expert's pairs in earlier
                           blocks + its rank among its expert's pairs in this block (a cumulative sum of the
                           block's one-hot [BLOCK, E] over pairs); writes the four [S] index arrays. The first
                           block also writes grouped_gemm's tile schedules (cumulative M tiles per expert) for
                           each BLOCK_M it may use: four torch ops a BLOCK_M otherwise, and the first of them
                           held up the block's first GEMM (run 55c: ~0.2 ms of a 16K step's ~1 ms idle start)

The rank follows pair order, so rows of one expert keep token order: the result is exactly torch's stable sort.
An id outside [0, E) is skipped here (nothing is written out of bounds), so the counts then add up to fewer than S:
plan_routing asserts on the device that they add up to S (experts/routing.py), as CUDA's own index checks in the
torch version would stop the process.
Shapes: S pairs, E experts, NB = ceil(S / BLOCK) blocks, E_P2 = E rounded up to a power of two.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from .grouped_gemm import TILE_BLOCKS, remember_tile_schedule
from .launch import launch as launch_kernel
from .sizes import cdiv, next_power_of_2

__all__ = ["MAX_EXPERTS", "expert_sort", "sort_into"]

# scatter_kernel writes tile schedules for BLOCK_M = 16 << i, i < len(TILE_BLOCKS): they must be those.
assert TILE_BLOCKS == tuple(16 << i for i in range(len(TILE_BLOCKS))), TILE_BLOCKS

# The largest expert count moetune's models route to is 256 (DeepSeek-V3); up to 1024 the one-hot tiles below stay
# small (16 pairs a block at E = 1024). Beyond that torch's sort is the better tool.
MAX_EXPERTS = 1024
# Elements of a block's one-hot tile [BLOCK, E_P2] (and of its cumulative sum), and of the offsets kernel's
# [CHUNK, EXPERT_GROUP] tile, each over WARPS warps. Each offsets program loops over all the blocks for its experts.
# With one program for every expert (run 52a, H200) that loop made the plan's GPU time grow with the blocks: 42 us
# at 4K tokens (k 8, E 128), 79 us at 8K, 126 us at 8K with 256 experts (torch's sort: 113-125 us); groups of 16
# experts run those 512-1024 blocks as 8-16 programs of 2-4 iterations. CHUNK is fixed, so that batches of other
# lengths compile nothing new. Compiled for sm_90a (Triton 3.9, sessions 14-15), none of the three kernels uses local
# memory (spills) for E_P2 = 1 to 1024 with these.
BLOCK_ELEMENTS, MAX_BLOCK = 16384, 2048
EXPERT_GROUP, CHUNK = 16, 256
WARPS = 8


@triton.jit
def _load_ids(ids_ptr, pair, S, E):
    """The expert id of each pair as int32, or -1 past the end and for an id outside [0, E) (compared in the ids'
    own dtype: a uint8 or an int64 id must not wrap into range)."""
    raw = tl.load(ids_ptr + pair, mask=pair < S, other=0)
    valid = (pair < S) & (raw >= 0) & (raw < E)
    return tl.where(valid, raw.to(tl.int32), -1)


@triton.jit
def _one_hot(ids, E_P2: tl.constexpr):
    return (ids[:, None] == tl.arange(0, E_P2)[None, :]).to(tl.int32)


@triton.jit
def block_counts_kernel(ids_ptr, hist_ptr, S, E, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    block = tl.program_id(0)
    pair = block * BLOCK + tl.arange(0, BLOCK)
    counts_E = tl.sum(_one_hot(_load_ids(ids_ptr, pair, S, E), E_P2), axis=0)
    expert = tl.arange(0, E_P2)
    tl.store(hist_ptr + block * E + expert, counts_E, mask=expert < E)


@triton.jit
def block_offsets_kernel(hist_ptr, counts_ptr, NB, E, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    expert = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    in_range = expert < E
    carry_E = tl.zeros([GROUP], dtype=tl.int32)  # pairs of each expert in the blocks before this chunk
    for start in range(0, NB, CHUNK):
        block = start + tl.arange(0, CHUNK)
        mask = (block[:, None] < NB) & in_range[None, :]
        where = hist_ptr + block[:, None] * E + expert[None, :]
        counts = tl.load(where, mask=mask, other=0)
        tl.store(where, tl.cumsum(counts, axis=0) - counts + carry_E[None, :], mask=mask)
        carry_E += tl.sum(counts, axis=0)
    tl.store(counts_ptr + expert, carry_E.to(tl.int64), mask=in_range)


@triton.jit
def scatter_kernel(ids_ptr, prefix_ptr, counts_ptr, offsets_ptr, tile_ends_ptr, stride_tiles, perm_ptr, inv_perm_ptr,
                   token_ptr, expert_ptr, S, E, TOP_K, BLOCK: tl.constexpr, E_P2: tl.constexpr,
                   TILE_SIZES: tl.constexpr):
    block = tl.program_id(0)
    pair = block * BLOCK + tl.arange(0, BLOCK)
    ids = _load_ids(ids_ptr, pair, S, E)
    one_hot = _one_hot(ids, E_P2)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # same-expert pairs before it in the block
    expert = tl.arange(0, E_P2)
    in_range = expert < E
    counts_E = tl.load(counts_ptr + expert, mask=in_range, other=0).to(tl.int32)
    offsets_E = tl.cumsum(counts_E, axis=0)  # each expert's end row (E_P2 <= 1024: cheap in every program)
    if block == 0:
        tl.store(offsets_ptr + expert, offsets_E, mask=in_range)
        for i in tl.static_range(TILE_SIZES):  # grouped_gemm's tile_schedule for BLOCK_M = 16, 32, 64, ...
            tiles_E = tl.cumsum((counts_E + (16 << i) - 1) // (16 << i), axis=0)
            tl.store(tile_ends_ptr + i * stride_tiles + expert, tiles_E, mask=in_range)
    before_E = offsets_E - counts_E + tl.load(prefix_ptr + block * E + expert, mask=in_range, other=0)
    row = tl.sum(one_hot * before_E[None, :], axis=1) + rank
    routed = ids >= 0
    tl.store(perm_ptr + row, pair.to(tl.int64), mask=routed)
    tl.store(inv_perm_ptr + pair, row.to(tl.int64), mask=routed)
    tl.store(token_ptr + row, (pair // TOP_K).to(tl.int64), mask=routed)
    tl.store(expert_ptr + row, ids.to(tl.int64), mask=routed)


def expert_sort(topk_ids_TK: torch.Tensor, num_experts: int, out: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """topk_ids [T, K] (any integer dtype, ids in [0, E)) -> (perm_S, inv_perm_S, token_S, expert_S, counts_E,
    offsets_E), as moetune.experts.routing.plan_routing defines them (int64, offsets_E int32).

    out: those six and the tile schedules' [len(TILE_BLOCKS), >= E] int32 (contiguous rows) to write into: views of a
    routing plan's one buffer (experts/routing.py's PlanLayout; a new one where not given).

    An id outside [0, E) is left out of the counts and its pair of the rows; the rows past sum(counts_E) are then
    unset. plan_routing checks on the device that the rows add up to S (every id in range) before any launch reads
    the plan."""
    try:  # operator.index: a NumPy or 0-d tensor integer counts, a float or a bool does not
        experts = None if isinstance(num_experts, bool) else operator.index(num_experts)
    except TypeError:
        experts = None
    if experts is None or not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected an integer from 1 to {MAX_EXPERTS} for the counting sort, "
                         f"got {num_experts!r}")
    num_experts = experts
    if topk_ids_TK.dim() != 2 or topk_ids_TK.is_floating_point() or topk_ids_TK.is_complex() \
            or topk_ids_TK.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected integer ids of shape [T, K], got {topk_ids_TK.dtype} "
                         f"{list(topk_ids_TK.shape)}")
    if out is None:
        from ..experts.routing import PlanLayout

        layout = PlanLayout(*topk_ids_TK.shape, num_experts, len(TILE_BLOCKS))
        out = layout.views(layout.new_buffer(topk_ids_TK.device))
    _check_out(out, topk_ids_TK.numel(), num_experts, topk_ids_TK.device)
    return sort_into(topk_ids_TK, num_experts, out)


def sort_into(topk_ids_TK: torch.Tensor, num_experts: int, out: tuple) -> tuple[torch.Tensor, ...]:
    """expert_sort's launches without its argument checks: plan_routing's entry, for ids moe_experts checked, an
    expert count it checked, and out the views of a PlanLayout it made (twice per MoE layer and step)."""
    num_tokens, top_k = topk_ids_TK.shape
    ids_S = topk_ids_TK.reshape(-1)
    if not ids_S.is_contiguous():
        ids_S = ids_S.contiguous()
    num_pairs, device = ids_S.numel(), ids_S.device
    e_p2 = next_power_of_2(num_experts)
    block = max(16, min(MAX_BLOCK, BLOCK_ELEMENTS // e_p2))
    num_blocks = max(1, cdiv(num_pairs, block))
    if num_pairs >= 2**31 or num_blocks * num_experts >= 2**31:  # the kernels index in int32
        raise ValueError(f"topk_ids: expected fewer than 2**31 pairs for the counting sort, got {num_pairs}")
    hist_NE = torch.empty((num_blocks, num_experts), dtype=torch.int32, device=device)
    perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E, tile_ends = out
    launch_kernel(block_counts_kernel, (num_blocks,), ids_S, hist_NE, num_pairs, num_experts, BLOCK=block,
                  E_P2=e_p2, num_warps=WARPS)
    group = min(EXPERT_GROUP, e_p2)
    launch_kernel(block_offsets_kernel, (cdiv(num_experts, group),), hist_NE, counts_E, num_blocks, num_experts,
                  CHUNK=CHUNK, GROUP=group, num_warps=WARPS)
    launch_kernel(scatter_kernel, (num_blocks,), ids_S, hist_NE, counts_E, offsets_E, tile_ends, tile_ends.stride(0),
                  perm_S, inv_perm_S, token_S, expert_S, num_pairs, num_experts, top_k, BLOCK=block, E_P2=e_p2,
                  TILE_SIZES=len(TILE_BLOCKS), num_warps=WARPS)
    remember_tile_schedule(counts_E, tile_ends[:, :num_experts])
    return perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E


def _check_out(out: tuple, num_pairs: int, num_experts: int, device: torch.device) -> None:
    """expert_sort's out: one line naming what does not fit, rather than writes out of bounds."""
    if not isinstance(out, (tuple, list)) or len(out) != 7:
        raise ValueError("out: expected (perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E, tile_ends)")
    wants = [((num_pairs,), torch.int64)] * 4 + [((num_experts,), torch.int64), ((num_experts,), torch.int32)]
    for i, (t, (shape, dtype)) in enumerate(zip(out[:6], wants)):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"out[{i}]: expected a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    tile_ends = out[6]
    if tile_ends.dim() != 2 or tile_ends.shape[0] != len(TILE_BLOCKS) or tile_ends.shape[1] < num_experts \
            or tile_ends.dtype != torch.int32 or tile_ends.device != device or tile_ends.stride(1) != 1:
        raise ValueError(f"out[6]: expected int32 tile schedules of shape [{len(TILE_BLOCKS)}, >= {num_experts}] "
                         f"with contiguous rows on {device}, got {tile_ends.dtype} {list(tile_ends.shape)}")
