"""Warp-specialised grouped GEMM over expert-sorted rows for Hopper (sm90), written in Gluon.

    C[c_row(i), :] = row_scale[i] * alpha * (A[i, :] @ B[e] + U[i, :] @ LB[e]) (+ bias[e])   rows i of expert e

The plain GEMMs over sorted rows of the triton backend (the down projection forward, gate_up's dgrad) as
grouped_gemm computes them with epilogue 0 and no gather, on a schedule Triton does not generate on Hopper:

- persistent: one program per SM loops over the real (M tile, N block) tiles in grouped_gemm's order;
- a producer warp issues every TMA load (A and B boxes, then one more step with the LoRA boxes U and LB) into a
  ring of shared-memory stages, running ahead across tiles, so the next tile's operands arrive while this tile's
  epilogue runs (a Triton program refills its pipeline from empty at every tile: ~1 of ~9 us at Qwen3's down
  projection, K = 768);
- CONSUMERS = 2 ("ping-pong"): two warpgroups take alternate tiles from rings of their own, so one's epilogue
  (scale, scatter, stores) overlaps the other's MMAs.

The producer makes its four TMA descriptors on the device, in Triton's global scratch (512 bytes a program), so a
launch passes plain pointers and goes through launch.py's direct path: descriptors built on the host cost 92-157 us
a launch in Python and Triton's launcher (run 54b), 33 us more than a Triton launch since (run 55a).

The LoRA product is one more K step: U [S, R] and LB's rows are read through boxes as wide as a K step (TMA
fills the columns past R with zeros) and multiplied over their first R_PAD columns only (R rounded up to a power of
2, at least 16: Gluon's shapes are powers of 2).

U may instead be made in the main loop (U_IN_LOOP, grouped_gemm's lora_u_weight: the triton backend's tuned ways
mostly take their LoRA inputs so, runs 48-55): U = u_alpha * A[i, :] @ UA[e] for the factor UA [E, K, R], whose box
(R_PAD by BLOCK_K) each K step loads with A's and B's and multiplies with the same A box into an [BLOCK_M, R_PAD]
accumulator (R_PAD / BLOCK_N more MMA work, 6% at 256 columns). After the loop U is rounded to the operands' dtype,
written out by the tiles of the first N block, and stored to the consumer's shared memory, where the LoRA step reads
it as U's TMA box would be read (that step then loads LB's box only). U's columns past R are set to zero there: in
UA's transposed layout the box rows past R are the next expert's (dropped exactly, even an inf or NaN). In UA's
contiguous layout the rows past an expert's K are the next expert's, as for the weights below.

Boxes past an operand's end read zeros, but in the contiguous [E, K, N] weight orientation the rows past an
expert's K (and past R in LB) are the next expert's: they meet A's (U's) zero columns, so they add exactly 0 for
finite weights, as in grouped_gemm's TMA path; an inf or NaN in a neighbouring expert would leak in.

Not for the interpreter (Gluon has none): correctness is checked on the GPU against grouped_gemm.
"""

from __future__ import annotations

import threading

import torch

from .launch import launch as launch_kernel
from .sizes import next_power_of_2

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # The TMA load's name: async_copy_global_to_shared up to Triton 3.6 or so, async_load later (3.9 keeps the old
    # name only to raise).
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
except ImportError:  # triton without Gluon (< 3.5): sorted_gemm_supported() says no
    gluon = None

try:
    from triton.runtime import _allocation  # where Triton keeps its scratch allocator (private: read, not set)
except ImportError:  # pragma: no cover - another layout: the allocator is set at every launch
    _allocation = None



if gluon is not None:

    @gluon.jit
    def _tile_of(i, pid, nprog, tile_ends_ptr, offsets_ptr, E, n_blocks, m_tiles,
                 LOG2_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """(expert, first row, expert's end row, first column) of this program's i-th tile, in grouped_gemm's
        grouped order (GROUP_M M tiles sweep every N block before the next group): grouped_gemm's _grouped_order
        and _find_tile in Gluon, which cannot call @triton.jit functions."""
        tile = pid + i * nprog
        per_group = GROUP_M * n_blocks
        first_m = (tile // per_group) * GROUP_M
        group_rows = gl.minimum(m_tiles - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        lo = pid_m * 0
        hi = lo + E
        for _ in gl.static_range(LOG2_E):  # smallest e with tile_ends[e] > pid_m
            active = lo < hi
            mid = (lo + hi) // 2
            ends = gl.load(tile_ends_ptr + gl.minimum(mid, E - 1))
            lo = gl.where(active & (ends <= pid_m), mid + 1, lo)
            hi = gl.where(active & (ends > pid_m), mid, hi)
        e = gl.minimum(lo, E - 1)
        prev = gl.maximum(e - 1, 0)
        tile_start = gl.where(e > 0, gl.load(tile_ends_ptr + prev), 0)
        row_start = gl.where(e > 0, gl.load(offsets_ptr + prev), 0)
        row_end = gl.load(offsets_ptr + e)
        return e, row_start + (pid_m - tile_start) * BLOCK_M, row_end, pid_n * BLOCK_N

    @gluon.jit
    def _loader(a_ptr, stride_am, a_rows, b_ptr, u_ptr, stride_um, u_rows, lb_ptr, ua_ptr, a_bufs, b_bufs, ua_bufs,
                ready, empty, tile_ends_ptr, offsets_ptr, pid, nprog, my_tiles, m_tiles, N, K, E, R,
                HAS_LORA: gl.constexpr, U_IN_LOOP: gl.constexpr, B_MODE: gl.constexpr, UA_MODE: gl.constexpr,
                LOG2_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                R_PAD: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """Producer (one warp): every TMA load of every tile of this program, tile i into ring i % CONSUMERS.
        With U_IN_LOOP each K step also loads UA[e]'s box, and the LoRA step loads LB[e]'s only (U is the
        consumer's)."""
        # The descriptors are made here, on the device, in global scratch (Triton's allocator): built on the host, each
        # launch paid for four in Python and in Triton's launcher (run 54b: +92-157 us a launch).
        dtype: gl.constexpr = a_ptr.dtype.element_ty
        a_layout: gl.constexpr = _smem_layout(BLOCK_M, BLOCK_K, dtype)
        b_box: gl.constexpr = _b_box(B_MODE, BLOCK_N, BLOCK_K)
        b_layout: gl.constexpr = _smem_layout(b_box[0], b_box[1], dtype)
        a_desc = tma.make_tensor_descriptor(a_ptr, [a_rows, K], [stride_am, 1], [BLOCK_M, BLOCK_K], a_layout)
        if B_MODE == 1:  # the [E, N, K] weights as [E * N, K] rows
            b_desc = tma.make_tensor_descriptor(b_ptr, [E * N, K], [K, 1], b_box, b_layout)
        else:  # [E, K, N] as [E * K, N]
            b_desc = tma.make_tensor_descriptor(b_ptr, [E * K, N], [N, 1], b_box, b_layout)
        if HAS_LORA:
            if U_IN_LOOP:  # U comes from the consumer's registers; no descriptor reads it
                u_desc = a_desc
            else:
                u_desc = tma.make_tensor_descriptor(u_ptr, [u_rows, R], [stride_um, 1], [BLOCK_M, BLOCK_K], a_layout)
            if B_MODE == 1:
                lb_desc = tma.make_tensor_descriptor(lb_ptr, [E * N, R], [R, 1], b_box, b_layout)
            else:
                lb_desc = tma.make_tensor_descriptor(lb_ptr, [E * R, N], [N, 1], b_box, b_layout)
        else:
            u_desc = a_desc
            lb_desc = b_desc
        if U_IN_LOOP:
            ua_box: gl.constexpr = _b_box(UA_MODE, R_PAD, BLOCK_K)
            ua_layout: gl.constexpr = _smem_layout(ua_box[0], ua_box[1], dtype)
            if UA_MODE == 1:  # the [E, R, K] factor as [E * R, K] rows
                ua_desc = tma.make_tensor_descriptor(ua_ptr, [E * R, K], [K, 1], ua_box, ua_layout)
            else:  # [E, K, R] as [E * K, R]
                ua_desc = tma.make_tensor_descriptor(ua_ptr, [E * K, R], [R, 1], ua_box, ua_layout)
        else:
            ua_desc = a_desc
        n_blocks = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        steps = k_steps + HAS_LORA
        size: gl.constexpr = dtype.primitive_bitwidth // 8
        nbytes: gl.constexpr = (BLOCK_M * BLOCK_K + BLOCK_N * BLOCK_K + U_IN_LOOP * R_PAD * BLOCK_K) * size
        lora_bytes: gl.constexpr = (BLOCK_N * BLOCK_K + (1 - U_IN_LOOP) * BLOCK_M * BLOCK_K) * size
        for i in range(my_tiles):
            ring = i % CONSUMERS
            e, first_row, row_end, off_n = _tile_of(i, pid, nprog, tile_ends_ptr, offsets_ptr, E, n_blocks, m_tiles,
                                                    LOG2_E, BLOCK_M, BLOCK_N, GROUP_M)
            base = (i // CONSUMERS) * steps  # uses of this ring before tile i: every tile has `steps` steps
            for ks in range(steps):
                it = base + ks
                slot = ring * STAGES + it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
                bar = ready.index(slot)
                if ks < k_steps:
                    mbarrier.expect(bar, nbytes)
                    k = ks * BLOCK_K
                    _tma_load(a_desc, [first_row, k], bar, a_bufs.index(slot))
                    if B_MODE == 1:  # weight rows are output columns: [BLOCK_N, BLOCK_K] boxes of [E*N, K]
                        _tma_load(b_desc, [e * N + off_n, k], bar, b_bufs.index(slot))
                    else:  # weight rows are the reduction dim: [BLOCK_K, BLOCK_N] boxes of [E*K, N]
                        _tma_load(b_desc, [e * K + k, off_n], bar, b_bufs.index(slot))
                    if U_IN_LOOP:  # rows past R (UA_MODE 1) are the next expert's: their U columns are dropped
                        if UA_MODE == 1:
                            _tma_load(ua_desc, [e * R, k], bar, ua_bufs.index(slot))
                        else:
                            _tma_load(ua_desc, [e * K + k, 0], bar, ua_bufs.index(slot))
                else:  # the LoRA step: U's rows (unless U_IN_LOOP) and LB[e], boxes padded with zeros past R
                    mbarrier.expect(bar, lora_bytes)
                    if not U_IN_LOOP:
                        _tma_load(u_desc, [first_row, 0], bar, a_bufs.index(slot))
                    if B_MODE == 1:
                        _tma_load(lb_desc, [e * N + off_n, 0], bar, b_bufs.index(slot))
                    else:
                        _tma_load(lb_desc, [e * R, off_n], bar, b_bufs.index(slot))

    @gluon.constexpr_function
    def _b_box(mode, block_n, block_k):
        """A weight box: [BLOCK_N, BLOCK_K] of [E * N, K] rows (mode 1), [BLOCK_K, BLOCK_N] of [E * K, N] (mode 2)."""
        mode, block_n, block_k = (getattr(v, "value", v) for v in (mode, block_n, block_k))
        return [block_n, block_k] if mode == 1 else [block_k, block_n]

    @gluon.constexpr_function
    def _smem_layout(rows, cols, dtype):
        """The swizzled shared-memory layout of a [rows, cols] TMA box (what TMA writes and wgmma reads)."""
        rows, cols = (getattr(v, "value", v) for v in (rows, cols))
        return gl.NVMMASharedLayout.get_default_for([rows, cols], getattr(dtype, "value", dtype))

    @gluon.constexpr_function
    def _acc_layout(block_m, block_n, warps):
        block_m, block_n, warps = (getattr(v, "value", v) for v in (block_m, block_n, warps))  # plain ints
        warps_per_cta = [4, 1]
        while warps_per_cta[0] * warps_per_cta[1] != warps:
            if block_m > 16 * warps_per_cta[0]:
                warps_per_cta[0] *= 2
            else:
                warps_per_cta[1] *= 2
        m_reps = -(-block_m // 16)
        n_reps = -(-warps // m_reps)
        max_n = max(block_n // n_reps, 8)
        n = 256
        while n > max_n or block_n % n != 0:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps_per_cta, instr_shape=[16, n, 16])

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ua_bufs, u_bufs, ready, empty, c_ptr, stride_cm, out_index_ptr, row_scale_ptr,
                  bias_ptr, stride_bias, u_ptr, stride_um, tile_ends_ptr, offsets_ptr, pid, nprog, my_tiles, m_tiles,
                  N, K, E, R, alpha, u_alpha,
                  HAS_LORA: gl.constexpr, U_IN_LOOP: gl.constexpr, HAS_BIAS: gl.constexpr,
                  HAS_OUT_INDEX: gl.constexpr, HAS_ROW_SCALE: gl.constexpr, B_MODE: gl.constexpr,
                  UA_MODE: gl.constexpr, LOG2_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, R_PAD: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, CONSUMER_WARPS: gl.constexpr, CONVERT: gl.constexpr, WHICH: gl.constexpr):
        """A warpgroup (or two) that runs the MMAs and the epilogue of tiles WHICH, WHICH + CONSUMERS, ...

        U_IN_LOOP: each K step also multiplies the A box by UA[e]'s into a second, R_PAD-wide accumulator; after the
        loop U = u_alpha * that, rounded to the operands' dtype (as grouped_gemm's U_IN_LOOP and a launch of its own
        store it), is written out by the tiles of the first N block and, through this consumer's shared-memory
        buffer, is the LoRA step's left operand."""
        acc_layout: gl.constexpr = _acc_layout(BLOCK_M, BLOCK_N, CONSUMER_WARPS)
        u_layout: gl.constexpr = _acc_layout(BLOCK_M, R_PAD, CONSUMER_WARPS)
        if CONVERT:  # 16-byte stores, through a shared-memory shuffle
            out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [CONSUMER_WARPS, 1], [1, 0])
        else:  # stores straight from the accumulator's registers (4-byte pairs)
            out_layout: gl.constexpr = acc_layout
        n_blocks = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        steps = k_steps + HAS_LORA
        for i in range(WHICH, my_tiles, CONSUMERS):
            e, first_row, row_end, off_n = _tile_of(i, pid, nprog, tile_ends_ptr, offsets_ptr, E, n_blocks, m_tiles,
                                                    LOG2_E, BLOCK_M, BLOCK_N, GROUP_M)
            base = (i // CONSUMERS) * steps
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            acc_u = gl.zeros([BLOCK_M, R_PAD], gl.float32, u_layout)
            prev = base * 0 + WHICH * STAGES  # a tensor: loop-carried
            for ks in range(k_steps):
                it = base + ks
                slot = WHICH * STAGES + it % STAGES
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                a = a_bufs.index(slot)
                if B_MODE == 1:
                    b = b_bufs.index(slot).permute((1, 0))
                else:
                    b = b_bufs.index(slot)
                acc = warpgroup_mma(a, b, acc, is_async=True)
                if U_IN_LOOP:
                    if UA_MODE == 1:
                        ua = ua_bufs.index(slot).permute((1, 0))
                    else:
                        ua = ua_bufs.index(slot)
                    acc_u = warpgroup_mma(a, ua, acc_u, is_async=True)
                    acc, acc_u = warpgroup_mma_wait(2, deps=(acc, acc_u))  # the previous step's two are done
                else:
                    acc = warpgroup_mma_wait(1, deps=(acc, ))  # the previous step's MMA is done: free its stage
                if ks > 0:
                    mbarrier.arrive(empty.index(prev), count=1)
                prev = slot
            if U_IN_LOOP:
                acc, acc_u = warpgroup_mma_wait(0, deps=(acc, acc_u))
                mbarrier.arrive(empty.index(prev), count=1)
                u_cols = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, u_layout))
                u_rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, u_layout))
                # Columns past R: UA_MODE 1 boxes read the next expert's rows there; they must add nothing below.
                u = gl.where(u_cols[None, :] < R, acc_u * u_alpha, 0.0).to(u_ptr.dtype.element_ty)
                if off_n == 0:
                    gl.store(u_ptr + u_rows.to(gl.int64)[:, None] * stride_um + u_cols[None, :], u,
                             mask=(u_rows < row_end)[:, None] & (u_cols < R)[None, :])
                u_smem = u_bufs.index(WHICH)  # free: the previous tile's LoRA MMA was waited for
                u_smem.store(u)
                fence_async_shared()
                it = base + k_steps
                slot = WHICH * STAGES + it % STAGES
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                if B_MODE == 1:
                    lb = b_bufs.index(slot).slice(0, R_PAD, dim=1).permute((1, 0))
                else:
                    lb = b_bufs.index(slot).slice(0, R_PAD, dim=0)
                acc = warpgroup_mma(u_smem, lb, acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                prev = slot
            elif HAS_LORA:
                it = base + k_steps
                slot = WHICH * STAGES + it % STAGES
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                u = a_bufs.index(slot).slice(0, R_PAD, dim=1)
                if B_MODE == 1:
                    lb = b_bufs.index(slot).slice(0, R_PAD, dim=1).permute((1, 0))
                else:
                    lb = b_bufs.index(slot).slice(0, R_PAD, dim=0)
                acc = warpgroup_mma(u, lb, acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                mbarrier.arrive(empty.index(prev), count=1)
                prev = slot
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(prev), count=1)

            acc = gl.convert_layout(acc * alpha, out_layout)
            rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
            cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
            row_mask = rows < row_end
            col_mask = cols < N
            if HAS_BIAS:
                bias = gl.load(bias_ptr + e.to(gl.int64) * stride_bias + cols, mask=col_mask, other=0.0)
                acc = acc + bias.to(gl.float32)[None, :]
            if HAS_ROW_SCALE:
                acc = acc * gl.load(row_scale_ptr + rows, mask=row_mask, other=0.0).to(gl.float32)[:, None]
            if HAS_OUT_INDEX:
                c_rows = gl.load(out_index_ptr + rows, mask=row_mask, other=0).to(gl.int64)
            else:
                c_rows = rows.to(gl.int64)
            gl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])

    @gluon.jit
    def sorted_gemm_kernel(a_ptr, stride_am, a_rows, b_ptr, u_ptr, stride_um, u_rows, lb_ptr, ua_ptr,
                           c_ptr, stride_cm, out_index_ptr, row_scale_ptr, bias_ptr, stride_bias,
                           tile_ends_ptr, offsets_ptr, N, K, E, R, alpha, u_alpha,
                           HAS_LORA: gl.constexpr, U_IN_LOOP: gl.constexpr, HAS_BIAS: gl.constexpr,
                           HAS_OUT_INDEX: gl.constexpr, HAS_ROW_SCALE: gl.constexpr, B_MODE: gl.constexpr,
                           UA_MODE: gl.constexpr, LOG2_E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           BLOCK_K: gl.constexpr, R_PAD: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                           CONSUMERS: gl.constexpr, CONSUMER_WARPS: gl.constexpr, CONVERT: gl.constexpr,
                           LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        m_tiles = gl.load(tile_ends_ptr + E - 1)
        total = m_tiles * gl.cdiv(N, BLOCK_N)
        my_tiles = (total - pid + nprog - 1) // nprog
        dtype: gl.constexpr = a_ptr.dtype.element_ty
        b_box: gl.constexpr = _b_box(B_MODE, BLOCK_N, BLOCK_K)
        a_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS * STAGES, BLOCK_M, BLOCK_K],
                                           _smem_layout(BLOCK_M, BLOCK_K, dtype))
        b_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS * STAGES, b_box[0], b_box[1]],
                                           _smem_layout(b_box[0], b_box[1], dtype))
        if U_IN_LOOP:  # a ring of UA boxes beside A's and B's, and each consumer's U for its LoRA step
            ua_box: gl.constexpr = _b_box(UA_MODE, R_PAD, BLOCK_K)
            ua_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS * STAGES, ua_box[0], ua_box[1]],
                                                _smem_layout(ua_box[0], ua_box[1], dtype))
            u_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, R_PAD], _smem_layout(BLOCK_M, R_PAD, dtype))
        else:  # not read
            ua_bufs = a_bufs
            u_bufs = a_bufs
        ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS * STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [CONSUMERS * STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(CONSUMERS * STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        # Each partition's arguments (those it reads) spelled out in full: Triton 3.6 turns the constexprs of a tuple
        # built once and passed whole (`(p, 0)`) or concatenated with the partition index (`p + (0, )`) into tensors,
        # which layouts cannot be made from (both tried, session 17).
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_consumer, (a_bufs, b_bufs, ua_bufs, u_bufs, ready, empty, c_ptr, stride_cm, out_index_ptr,
                             row_scale_ptr, bias_ptr, stride_bias, u_ptr, stride_um, tile_ends_ptr, offsets_ptr, pid,
                             nprog, my_tiles, m_tiles, N, K, E, R, alpha, u_alpha, HAS_LORA, U_IN_LOOP, HAS_BIAS,
                             HAS_OUT_INDEX, HAS_ROW_SCALE, B_MODE, UA_MODE, LOG2_E, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
                             GROUP_M, STAGES, CONSUMERS, CONSUMER_WARPS, CONVERT, 0)),
                (_loader, (a_ptr, stride_am, a_rows, b_ptr, u_ptr, stride_um, u_rows, lb_ptr, ua_ptr, a_bufs, b_bufs,
                           ua_bufs, ready, empty, tile_ends_ptr, offsets_ptr, pid, nprog, my_tiles, m_tiles, N, K, E, R,
                           HAS_LORA, U_IN_LOOP, B_MODE, UA_MODE, LOG2_E, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, GROUP_M,
                           STAGES, CONSUMERS)),
            ], [1], [LOADER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (a_bufs, b_bufs, ua_bufs, u_bufs, ready, empty, c_ptr, stride_cm, out_index_ptr,
                             row_scale_ptr, bias_ptr, stride_bias, u_ptr, stride_um, tile_ends_ptr, offsets_ptr, pid,
                             nprog, my_tiles, m_tiles, N, K, E, R, alpha, u_alpha, HAS_LORA, U_IN_LOOP, HAS_BIAS,
                             HAS_OUT_INDEX, HAS_ROW_SCALE, B_MODE, UA_MODE, LOG2_E, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
                             GROUP_M, STAGES, CONSUMERS, CONSUMER_WARPS, CONVERT, 0)),
                (_loader, (a_ptr, stride_am, a_rows, b_ptr, u_ptr, stride_um, u_rows, lb_ptr, ua_ptr, a_bufs, b_bufs,
                           ua_bufs, ready, empty, tile_ends_ptr, offsets_ptr, pid, nprog, my_tiles, m_tiles, N, K, E, R,
                           HAS_LORA, U_IN_LOOP, B_MODE, UA_MODE, LOG2_E, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, GROUP_M,
                           STAGES, CONSUMERS)),
                (_consumer, (a_bufs, b_bufs, ua_bufs, u_bufs, ready, empty, c_ptr, stride_cm, out_index_ptr,
                             row_scale_ptr, bias_ptr, stride_bias, u_ptr, stride_um, tile_ends_ptr, offsets_ptr, pid,
                             nprog, my_tiles, m_tiles, N, K, E, R, alpha, u_alpha, HAS_LORA, U_IN_LOOP, HAS_BIAS,
                             HAS_OUT_INDEX, HAS_ROW_SCALE, B_MODE, UA_MODE, LOG2_E, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
                             GROUP_M, STAGES, CONSUMERS, CONSUMER_WARPS, CONVERT, 1)),
            ], [1, CONSUMER_WARPS], [LOADER_REGS, CONSUMER_REGS])


# Configs, best first as measured (run 54a, H200, Qwen3 and GLM shapes at 4K and 16K tokens): one consumer of 8 warps
# on 128 x 256 tiles (the widest wgmma: two warpgroups of 64 rows) with the accumulator shuffled through shared
# memory for 16-byte stores (CONVERT: 12-19% faster than storing the wgmma registers' 4-byte pairs), 3 or 4 stages;
# or two ping-pong consumers of 4 warps on 128 x 128 tiles. Run 54a's two-stage ping-pong configs ran 30-60% slower.
CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=3, CONSUMERS=1, CONSUMER_WARPS=8, CONVERT=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=4, CONSUMERS=1, CONSUMER_WARPS=8, CONVERT=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=3, CONSUMERS=2, CONSUMER_WARPS=4, CONVERT=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=4, CONSUMERS=1, CONSUMER_WARPS=8, CONVERT=False),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=3, CONSUMERS=2, CONSUMER_WARPS=4, CONVERT=False),
)


def weight_mode(b: torch.Tensor) -> int:
    """1 if the [E, K, N] view b is a transposed contiguous [E, N, K] tensor, 2 if it is contiguous, else 0."""
    E, K, N = b.shape
    if b.stride() == (N * K, 1, K):
        return 1
    if b.stride() == (K * N, N, 1):
        return 2
    return 0


def sorted_gemm_supported(a, b, lora_u=None, lora_b=None, bias=None, out=None, out_index=None,
                          row_scale=None, lora_u_weight=None) -> str | None:
    """None if sorted_gemm can run these operands, else why not. Asked at every eligible grouped_gemm launch: cheap
    checks only. With lora_u_weight, lora_u is the [S, R] buffer the kernel writes U into (plain stores)."""
    from .grouped_gemm import _capability  # cached there (and grouped_gemm imports this module)

    if gluon is None:
        return "triton has no Gluon (needs triton >= 3.5)"
    if a.device.type != "cuda" or _capability(a.device.index) != (9, 0):
        return "the Gluon kernel is for Hopper (sm90) only"
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return f"expected bf16 or fp16 operands, got {a.dtype} and {b.dtype}"
    mode = weight_mode(b)
    size = a.element_size()
    E, K, N = b.shape
    if min(a.shape[0], E, K, N) == 0:  # TMA descriptors need every dimension > 0, the ring at least one K step
        return "empty operands"
    if mode == 0 or a.stride(1) != 1 or (a.stride(0) * size) % 16 or a.data_ptr() % 16 or b.data_ptr() % 16:
        return "operands TMA cannot read"
    if ((K if mode == 1 else N) * size) % 16:
        return "weight rows not 16-byte aligned"
    if lora_u_weight is not None and lora_u is None:
        return "lora_u_weight needs lora_u, the buffer U is written to"
    if lora_u is not None:
        R = lora_u.shape[1]
        if (lora_b is None or tuple(lora_b.shape) != (E, R, N) or lora_u.shape[0] < a.shape[0]
                or not 0 < R <= 64):  # fewer U rows than A's: TMA would read zeros, the LoRA term silently lost
            return "expected lora_u [S, R] and lora_b [E, R, N] with 0 < R <= 64"
        if ((R * size) % 16 or lora_u.stride(1) != 1 or lora_u.dtype != a.dtype or lora_b.dtype != a.dtype
                or weight_mode(lora_b) != mode or lora_b.data_ptr() % 16):
            return "LoRA operands TMA cannot read in the weight's orientation"
        if lora_u_weight is None and ((lora_u.stride(0) * size) % 16 or lora_u.data_ptr() % 16):
            return "a LoRA input TMA cannot read"
        if lora_u_weight is not None:
            ua_mode = weight_mode(lora_u_weight)
            if (tuple(lora_u_weight.shape) != (E, K, R) or lora_u_weight.dtype != a.dtype or ua_mode == 0
                    or lora_u_weight.data_ptr() % 16 or ((K if ua_mode == 1 else R) * size) % 16):
                return "expected lora_u_weight [E, K, R] in a layout TMA can read"
    if bias is not None and bias.stride(1) != 1:
        return "bias columns not contiguous"
    if out is not None and out.stride(1) != 1:
        return "output columns not contiguous"
    if (out_index is not None and out_index.stride(0) != 1) or (row_scale is not None and row_scale.stride(0) != 1):
        return "out_index / row_scale not contiguous"
    return None


def _scratch(size: int, alignment: int, stream):
    """Triton's global scratch for a launch (the kernel's TMA descriptors), from torch's caching allocator (its
    blocks are 512-byte aligned, more than the 128 bytes a descriptor needs)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_thread = threading.local()


def _scratch_allocator_set() -> None:
    """Give Triton an allocator for the kernel's scratch in this thread if it has none: Triton keeps it in a
    ContextVar, so one set on the main thread is not seen by autograd's backward thread, where the dgrad runs.
    Where Triton's allocator cannot be read, set once per thread (a later one set by the user is kept)."""
    held = getattr(_allocation, "_allocator", None)
    if held is not None:
        if isinstance(held.get(), getattr(_allocation, "NullAllocator", ())):
            triton.set_allocator(_scratch)
    elif not getattr(_thread, "allocator_set", False):
        triton.set_allocator(_scratch)
        _thread.allocator_set = True


def sorted_gemm(a, b, offsets_E, counts_E, *, num_rows: int, tile_ends=None, lora_u=None, lora_b=None,
                lora_u_weight=None, lora_u_alpha: float = 1.0, alpha: float = 1.0, bias=None, out=None, out_index=None,
                row_scale=None, config: dict | None = None):
    """grouped_gemm(a, b, ..., epilogue=0) without a_index on the Gluon kernel; see the module docstring.

    a [S, K] expert-sorted rows; b [E, K, N] (a transposed view of [E, N, K] or contiguous); lora_u [S, R] and
    lora_b [E, R, N] in b's orientation; bias [E, N]; out [*, N] written at rows out_index[i] (or i), scaled by
    row_scale[i]. lora_u_weight [E, K, R] (either layout): U = lora_u_alpha * A @ lora_u_weight[e] is computed in
    the main loop and written to lora_u, as grouped_gemm's lora_u_weight does. tile_ends: grouped_gemm's
    tile_schedule(counts_E, BLOCK_M) (computed here if None).
    """
    from .grouped_gemm import multiprocessors, tile_schedule  # grouped_gemm imports this module

    config = dict(config or CONFIGS[0])
    BM = config["BLOCK_M"]
    E, K, N = b.shape
    R = lora_u.shape[1] if lora_u is not None else 0
    if lora_u_weight is not None and (lora_u is None or lora_u.shape[0] < num_rows):
        # (without lora_u the loader would run one step a tile fewer than the consumer waits for: a hang)
        raise ValueError(f"lora_u: expected the [num_rows={num_rows}, R] buffer U is written to with lora_u_weight")
    if out is None:
        out = torch.empty(num_rows, N, device=a.device, dtype=a.dtype)
    if tile_ends is None:
        tile_ends = tile_schedule(counts_E, BM)
    _scratch_allocator_set()
    u = lora_u if lora_u is not None else a
    ua = lora_u_weight if lora_u_weight is not None else b
    warps = config["CONSUMER_WARPS"]
    launch_kernel(sorted_gemm_kernel, (multiprocessors(a.device),),
           a, a.stride(0), a.shape[0], b, u, u.stride(0), u.shape[0], lora_b if lora_b is not None else b, ua,
           out, out.stride(0), out_index if out_index is not None else out,
           row_scale if row_scale is not None else out, bias if bias is not None else out,
           bias.stride(0) if bias is not None else 0,
           tile_ends, offsets_E, N, K, E, R, float(alpha), float(lora_u_alpha),
           HAS_LORA=lora_u is not None, U_IN_LOOP=lora_u_weight is not None, HAS_BIAS=bias is not None,
           HAS_OUT_INDEX=out_index is not None, HAS_ROW_SCALE=row_scale is not None, B_MODE=weight_mode(b),
           UA_MODE=weight_mode(lora_u_weight) if lora_u_weight is not None else 0,
           LOG2_E=max(1, int(E).bit_length()),
           BLOCK_M=BM, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], R_PAD=max(16, next_power_of_2(R)),
           GROUP_M=8, STAGES=config["STAGES"], CONSUMERS=config["CONSUMERS"], CONSUMER_WARPS=warps,
           CONVERT=config["CONVERT"], LOADER_REGS=40, CONSUMER_REGS=232,
           num_warps=warps, maxnreg=config.get("MAXNREG", 168))
    return out
