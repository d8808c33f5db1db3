"""K-grouped GEMM for the LoRA factor gradients: a reduction over each expert's sorted rows.

    out[e] = alpha * sum_{rows i of e} A[a_row(i), :]^T  (scale[i] * Bv(i, :))      -> [E, M, N]

  A      [rows_A, M]  read at a_row(i) = a_index[i] (fused gather) or i
  Bv     B[b_row(i), :] with b_row(i) = b_index[i] or i; or, with B_ACT, h = act(gate, up) of the
         pre-activation GU [S, 2N] (recomputed on load, so h [S, I] is never stored)
  scale  optional per-row factor (the routing weight)

Used for dA/dB of both projections, where M or N is the LoRA rank. Experts with no rows get zeros.

Split over rows: each expert's rows are cut into chunks of at most chunk_rows (twice the mean rows per expert,
rounded up to a power of two), and each program reduces one chunk for one [BLOCK_M, BLOCK_N] block. Routing is
rarely even: run 86d's random-initialised Qwen3-30B-A3B cut sent 16K of 131K rows to one expert and none to 60-83
of 128, and one program walking a whole expert's rows made the four launches of a layer 1.41-1.50 ms against
0.53 ms for even routing.
An expert of one chunk (all of them where routing is even) is stored directly. Several chunks store fp32 partial
sums (in a slab of at most twice as many chunks as rows / chunk_rows: only experts of several chunks have a place
there); the program that finishes its expert's block last (an atomic count) adds them up in chunk order, stores
the result and zeroes the count again: deterministic, the same bits whichever program is last, and the counts are
filled once per set of routing counts, not once a launch. Grid: (chunk bound * M blocks, N blocks);
chunks past the last exit at once. The schedule (cumulative chunks per expert, and their slab places) is one small
launch per backward, memoised on the counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import autotune
from .activations import act_forward
from .grouped_gemm import _pow2_at_least, dot_precision, schedules, tile_expert
from .launch import launch as launch_kernel
from .operands import check_rows, check_vector
from .sizes import cdiv, next_power_of_2


@triton.jit
def grouped_wgrad_kernel(
    a_ptr, stride_am, stride_ak,
    a_index_ptr,
    b_ptr, stride_bm, stride_bn,
    b_index_ptr, scale_ptr,
    offsets_ptr, schedule_ptr, chunk_rows,
    c_ptr, stride_ce, stride_cm, stride_cn,
    part_ptr, arrived_ptr,
    M, N, E, alpha, act_alpha, act_limit,
    HAS_A_INDEX: tl.constexpr, HAS_B_INDEX: tl.constexpr, HAS_SCALE: tl.constexpr,
    B_ACT: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_blocks = tl.cdiv(M, BLOCK_M)
    chunk = pid // m_blocks
    pid_m = pid % m_blocks
    e = tile_expert(chunk, schedule_ptr, E, LOG2_E)  # row 0 of the schedule: cumulative chunks per expert
    if e >= E:
        return
    first_chunk = tl.where(e > 0, tl.load(schedule_ptr + tl.maximum(e - 1, 0)), 0)
    chunks = tl.load(schedule_ptr + e) - first_chunk
    row_start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0) + (chunk - first_chunk) * chunk_rows
    row_end = tl.minimum(tl.load(offsets_ptr + e), row_start + chunk_rows)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    if B_ACT:
        if INTERLEAVED:  # (gate, up) pairs side by side: one contiguous [BLOCK_K, 2 * BLOCK_N] tile per step
            p_cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
            p_mask = p_cols < 2 * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(row_start, row_end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        k_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        if HAS_A_INDEX:
            a_rows = tl.load(a_index_ptr + rows64, mask=k_mask, other=0).to(tl.int64)
        else:
            a_rows = rows64
        if HAS_B_INDEX:
            b_rows = tl.load(b_index_ptr + rows64, mask=k_mask, other=0).to(tl.int64)
        else:
            b_rows = rows64
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ms[None, :] * stride_ak,
                    mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        bmask = k_mask[:, None] & n_mask[None, :]
        if B_ACT:
            base = b_ptr + b_rows[:, None] * stride_bm
            if INTERLEAVED:
                # Two stride-2 loads (gate at 2n, up at 2n + 1) cannot be vectorised: run 41 measured gpt-oss's
                # dA2 at 16K tokens at 2.1 ms, 11% of bandwidth. Load the pairs whole, split in registers.
                pairs = tl.load(base + p_cols[None, :] * stride_bn, mask=k_mask[:, None] & p_mask[None, :], other=0.0)
                gate, up = tl.split(tl.reshape(pairs.to(tl.float32), (BLOCK_K, BLOCK_N, 2)))
            else:
                gate = tl.load(base + ns[None, :] * stride_bn, mask=bmask, other=0.0).to(tl.float32)
                up = tl.load(base + (ns + N)[None, :] * stride_bn, mask=bmask, other=0.0).to(tl.float32)
            bv = act_forward(gate, up, ACT, act_alpha, act_limit)
        else:
            bv = tl.load(b_ptr + b_rows[:, None] * stride_bm + ns[None, :] * stride_bn, mask=bmask, other=0.0)
            bv = bv.to(tl.float32)
        if HAS_SCALE:
            bv = bv * tl.load(scale_ptr + rows64, mask=k_mask, other=0.0).to(tl.float32)[:, None]
        acc = tl.dot(tl.trans(a), bv.to(a.dtype), acc, input_precision=DOT_PRECISION)
    mn_mask = m_mask[:, None] & n_mask[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn
    if chunks == 1:
        tl.store(c_ptrs, (acc * alpha).to(c_ptr.dtype.element_ty), mask=mn_mask)
    else:
        block = ms[:, None].to(tl.int64) * N + ns[None, :]  # this block's elements in one [M, N] partial
        first_part = tl.load(schedule_ptr + E + e) - chunks  # row 1: cumulative slab places of split experts
        tl.store(part_ptr + (first_part + chunk - first_chunk).to(tl.int64) * M * N + block, acc, mask=mn_mask)
        # Every thread's stores, a barrier, then one release / acquire at GPU scope (the scalar atomic's acq_rel, by
        # one thread, its result shared with the rest): CUTLASS's semaphore pattern. The partials are read past L1.
        tl.debug_barrier()
        counter = arrived_ptr + (e * m_blocks + pid_m) * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1)
        if arrived == chunks - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in range(0, chunks):
                total += tl.load(part_ptr + (first_part + j).to(tl.int64) * M * N + block, mask=mn_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(c_ptrs, (total * alpha).to(c_ptr.dtype.element_ty), mask=mn_mask)
            tl.store(counter, 0)  # every chunk has counted: zero again for the next launch (arrival_counters)


@triton.jit
def chunk_schedule_kernel(rows_ptr, out_ptr, E, chunk_rows, ARE_OFFSETS: tl.constexpr, E_P2: tl.constexpr):
    """out[0, e]: cumulative max(1, cdiv(rows of e, chunk_rows)); out[1, e]: the same over experts of several chunks
    only (their places in the partials' slab). rows_ptr: the counts per expert, or their cumulative offsets."""
    e = tl.arange(0, E_P2)
    inside = e < E
    rows = tl.load(rows_ptr + e, mask=inside, other=0).to(tl.int32)
    if ARE_OFFSETS:
        rows -= tl.load(rows_ptr + e - 1, mask=inside & (e > 0), other=0).to(tl.int32)
    chunks = tl.where(inside, tl.maximum((rows + chunk_rows - 1) // chunk_rows, 1), 0)
    tl.store(out_ptr + e, tl.cumsum(chunks, axis=0), mask=inside)
    tl.store(out_ptr + E + e, tl.cumsum(tl.where(chunks > 1, chunks, 0), axis=0), mask=inside)


def wgrad_candidates(M: int, N: int, num_rows: int, E: int) -> tuple[dict, ...]:
    """Configs to tune over (the heuristic favourite first): one of M, N is the LoRA rank and takes it in one
    block up to rank 64 (more in blocks of 64); the other, wide side (H or I) is tried in 64- to 256-column
    blocks. Wider blocks read longer runs of each (gathered) row: these launches are bandwidth-bound (run 41, the
    four of a Qwen3 layer at 16K tokens: 0.66 ms alone for ~1.9 GB; the wider blocks won 3-10%)."""
    return _wgrad_candidates(M, N, num_rows >= 64 * E)


@functools.lru_cache(maxsize=None)
def _wgrad_candidates(M: int, N: int, many_rows: bool) -> tuple[dict, ...]:
    cfg = autotune.block_config
    bm, bn = min(64, _pow2_at_least(M)), min(128 if M <= 32 else 64, _pow2_at_least(N))
    bk = 64 if many_rows else 32

    def widened(width: int) -> tuple[int, int]:  # the wide side's block `width` columns, the rank's as it is
        return (min(width, _pow2_at_least(M)), bn) if M > N else (bm, min(width, _pow2_at_least(N)))

    candidates = [cfg(bm, bn, bk, 4, 3), cfg(bm, bn, 128, 4, 3), cfg(*widened(128), 64, 4, 4),
                  cfg(*widened(256), 64, 8, 3), cfg(*widened(256), 32, 8, 4)]
    return tuple(c for i, c in enumerate(candidates) if c not in candidates[:i])


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets_E: torch.Tensor, **kwargs) -> torch.Tensor:
    """[E, M, N] per-expert sums of outer products over the expert's rows (see module docstring and wgrad_launch,
    which takes the same arguments)."""
    return wgrad_launch(a, b, offsets_E, **kwargs)()


def wgrad_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets_E: torch.Tensor,
    *,
    num_rows: int,
    a_index: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    alpha: float = 1.0,
    b_act: tuple[int, float, float] | None = None,
    interleaved: bool = False,
    out_dtype: torch.dtype = torch.float32,
    counts_E: torch.Tensor | None = None,
    config: dict | None = None,
) -> Callable[[], torch.Tensor]:
    """grouped_wgrad in two steps. This one checks the operands and, on the current stream, allocates the result and
    the partials' slab, makes the chunk schedule and the arrival counters, and picks the config (tuning it the first
    time, on these operands); the function it returns launches the kernel on the stream current then, and returns
    the result. So a launch meant for a side stream takes nothing from that stream's memory pool, which the caching
    allocator keeps apart (the result is a gradient, kept well past the launch); the caller keeps the function, and
    with it the slab, until its stream has waited for the side stream.

    counts_E: the rows per expert (the routing plan's), where the caller has them: saves their difference of
    offsets_E. config: one of wgrad_candidates(...) to use instead of the tuned one (tests, benchmarks)."""
    E = offsets_E.shape[0]
    check_vector("offsets_E", offsets_E, E)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a, b: expected 2-D row operands, got shapes {list(a.shape)} and {list(b.shape)}")
    check_rows("a", a, 0 if a_index is not None else num_rows)
    check_rows("b", b, 0 if b_index is not None else num_rows)  # (the kernel casts b's tiles to a's dtype)
    check_vector("a_index", a_index, num_rows)
    check_vector("b_index", b_index, num_rows)
    check_vector("scale", scale, num_rows)
    check_vector("counts_E", counts_E, E)
    M = a.shape[1]
    N = b.shape[1] // 2 if b_act is not None else b.shape[1]
    out = torch.empty(E, M, N, device=a.device, dtype=out_dtype)
    act = b_act or (0, 0.0, 0.0)
    rows = chunk_rows(num_rows, E)
    rows_E = offsets_E if counts_E is None else counts_E
    schedule = chunk_schedule(rows_E, rows, counts_E is not None)
    units = cdiv(num_rows, rows) + E  # >= sum over experts of max(1, cdiv(rows of e, rows))
    split = rows < num_rows  # else every expert is one chunk: no partials, no counts
    # An expert of several chunks has more than `rows` rows, so fewer than 2 * its rows / rows chunks: all of them
    # together fewer than 2 * num_rows / rows. At most as large as the fp32 gradient out (rows >= 2 x the mean).
    partials = torch.empty(2 * cdiv(num_rows, rows), M, N, device=a.device, dtype=torch.float32) if split else out
    dummy = out

    def counters(blocks: dict) -> torch.Tensor:
        return arrival_counters(rows_E, E * cdiv(M, blocks["BLOCK_M"]) * cdiv(N, blocks["BLOCK_N"]))

    def launch(blocks: dict):
        m_blocks, n_blocks = cdiv(M, blocks["BLOCK_M"]), cdiv(N, blocks["BLOCK_N"])
        launch_kernel(
            grouped_wgrad_kernel, (units * m_blocks, n_blocks),
            a, a.stride(0), a.stride(1),
            a_index if a_index is not None else dummy,
            b, b.stride(0), b.stride(1),
            b_index if b_index is not None else dummy,
            scale if scale is not None else dummy,
            offsets_E, schedule, rows,
            out, out.stride(0), out.stride(1), out.stride(2),
            partials, counters(blocks) if split else schedule,
            M, N, E, float(alpha), float(act[1]), float(act[2]),
            HAS_A_INDEX=a_index is not None, HAS_B_INDEX=b_index is not None, HAS_SCALE=scale is not None,
            B_ACT=b_act is not None, ACT=act[0], INTERLEAVED=interleaved, DOT_PRECISION=dot_precision(a.dtype),
            LOG2_E=max(1, int(E).bit_length()), **blocks,
        )

    candidates = wgrad_candidates(M, N, num_rows, E)
    # The key and name are those of the kernel before the split: a program's work under even routing (one chunk an
    # expert) is the same, so the picks cached on disk still apply, and a GPU does not tune again for the split.
    key = (a_index is not None, b_index is not None, b_act is not None, interleaved, M, N, str(a.dtype),
           next_power_of_2(max(1, num_rows // E)), num_rows >= 64 * E)
    chosen = config if config is not None else autotune.pick("grouped_wgrad", key, candidates, launch, a.device,
                                                             num_rows)
    if split:
        counters(chosen)  # made here, on this stream, if not yet

    def run() -> torch.Tensor:
        launch(chosen)
        return out

    return run


# Chunks of twice the mean rows per expert rounded up to a power of two (2-4x the mean): where routing is even every
# expert is one chunk (no partials), and where it is not the busiest expert's rows spread over at least
# (its rows / mean) / 4 programs per block.
CHUNK_OVER_MEAN = 2
SPLIT_ROWS = True  # False: every expert one chunk, one program walking all its rows (as before the split)


def chunk_rows(num_rows: int, num_experts: int) -> int:
    """Rows per chunk of grouped_wgrad's split: a power of two from 256 (a few BLOCK_K steps) up."""
    if not SPLIT_ROWS:
        return max(256, num_rows)
    return max(256, CHUNK_OVER_MEAN * next_power_of_2(cdiv(num_rows, max(1, num_experts))))


def arrival_counters(rows_E: torch.Tensor, size: int) -> torch.Tensor:
    """int32 zeros (at least `size`) on rows_E's device, memoised with its chunk schedule: the program that adds
    up a block's partials sets the block's counter back to zero, so the launches of one backward (four, from one
    set of counts, in stream order) share one fill instead of a torch.zeros each (run 88a: eager launches of tens
    of us took 13-26 us longer with the split, where nothing was split, than without)."""
    cache = schedules(rows_E)
    counters = cache.get("wgrad arrival counters")
    if counters is None or counters.numel() < size:
        counters = cache["wgrad arrival counters"] = torch.zeros(size, device=rows_E.device, dtype=torch.int32)
    return counters


def chunk_schedule(rows_E: torch.Tensor, rows: int, are_counts: bool) -> torch.Tensor:
    """int32 [2, E] on the device, no sync (chunk_schedule_kernel): row 0 the cumulative chunks per expert,
    max(1, cdiv(its rows, rows)) each (an expert without rows has one empty chunk, whose program stores its zeros);
    row 1 the same over experts of several chunks only (their places in the partials' slab). rows_E: the counts per
    expert, or (are_counts False) their cumulative offsets. Memoised with the tile schedules made from the same
    tensor (the four launches of a backward share it)."""
    cache = schedules(rows_E)
    key = ("wgrad chunks", rows)
    if key not in cache:
        E = rows_E.numel()
        out = torch.empty(2, E, device=rows_E.device, dtype=torch.int32)
        if E:
            launch_kernel(chunk_schedule_kernel, (1,), rows_E, out, E, rows, ARE_OFFSETS=not are_counts,
                          E_P2=max(16, next_power_of_2(E)))
        cache[key] = out
    return cache[key]
