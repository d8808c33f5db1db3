"""Row-grouped GEMM over expert-sorted rows with fused gather, split-LoRA, bias, activation and scatter.

Shape legend: S sorted rows, E experts, K reduction dim, N output columns, R LoRA rank.

For each sorted row i of expert e (rows of one expert are contiguous, ends in offsets_E):

    acc[i, :] = alpha * ( A[a_row(i), :] @ B[e]  +  U[i, :] @ LB[e] )  (+ bias[e])

  A        [rows_A, K]   read at a_row(i) = a_index[i] (gather fused into the loads) or i
  B        [E, K, N]     any strides (a transposed view of a [E, N, K] weight costs nothing)
  U, LB    [S, R], [E, R, N]   the split-LoRA second product, added in the epilogue
           (U = u_alpha * A[a_row] @ UA[e] may instead be accumulated in the main loop: lora_u_weight)
  bias     [E, N]

Epilogues (EPILOGUE constexpr):
  0 plain      C[c_row(i), :] = acc * row_scale[i];  c_row(i) = out_index[i] (fused scatter) or i
  1 act fwd    the N columns of B are the h columns of a gated pair: the program computes the gate
               and the up accumulators (columns g(n), u(n) of B, LB, bias), stores them to GU and
               h = act(gate, up) to C [S, N]
  2 act bwd    acc is g = d_h / w for columns n of h; reads gate/up of GU, writes
               d_gu = act'(gu) * (g * w) to C [S, 2N] at the gate/up columns, and the partial dot
               <act(gu), g> of this column block to DW [n_blocks, S] (summed by the launcher:
               deterministic, no atomics). That dot is the routing-weight gradient.
Gate/up columns: concat g(n) = n, u(n) = N + n; interleaved g(n) = 2n, u(n) = 2n + 1.

Weight loads: pointers, or (B_TMA, tried by autotuning on sm90+, see tma_candidates) a host TMA descriptor over
the weight's own 2-D rows, every epilogue. A box may overrun an expert's rows into the next expert's: past N
those columns are never stored, past K they meet A's zero-masked columns. Gated concat weights take two boxes
per step (gate, up) into two accumulators, paired after the loop. Plain GEMMs over sorted rows (no gather) may
read the activations through TMA too (A_TMA): a box past an expert's last row reads the next expert's rows,
whose results are never stored.

Scheduling: a 1-D grid of (M tiles upper bound) x (N blocks) programs in grouped order (GROUP_M M tiles
sweep all N blocks before the next group). M tile t belongs to the expert e with tile_ends[e-1] <= t <
tile_ends[e] (binary search over E); tiles past the last exit at once. Or (PERSISTENT, see persistent_candidates)
a few programs per SM, each looping over the real tiles in the same order.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from . import autotune, hopper_gemm
from .activations import act_backward, act_forward
from .launch import launch as launch_kernel
from .operands import check_rows, check_vector
from .sizes import cdiv, next_power_of_2


@triton.jit
def tile_expert(pid_m, tile_ends_ptr, E, LOG2_E: tl.constexpr):
    """The smallest e with tile_ends[e] > pid_m (the expert of tile pid_m), or E past the last tile."""
    lo = pid_m * 0
    hi = lo + E
    for _ in tl.static_range(LOG2_E):
        active = lo < hi
        mid = (lo + hi) // 2
        ends = tl.load(tile_ends_ptr + tl.minimum(mid, E - 1))
        lo = tl.where(active & (ends <= pid_m), mid + 1, lo)
        hi = tl.where(active & (ends > pid_m), mid, hi)
    return lo


@triton.jit
def _find_tile(pid_m, tile_ends_ptr, offsets_ptr, E, LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert of M tile pid_m and its row range; e == E means 'past the last tile'."""
    e = tile_expert(pid_m, tile_ends_ptr, E, LOG2_E)
    e_safe = tl.minimum(e, E - 1)
    prev = tl.maximum(e_safe - 1, 0)
    tile_start = tl.where(e_safe > 0, tl.load(tile_ends_ptr + prev), 0)
    row_start = tl.where(e_safe > 0, tl.load(offsets_ptr + prev), 0)
    row_end = tl.load(offsets_ptr + e_safe)
    first_row = row_start + (pid_m - tile_start) * BLOCK_M
    return e, e_safe, first_row, row_end


@triton.jit
def _grouped_order(tile, m_tiles, n_blocks, GROUP_M: tl.constexpr):
    """(M tile, N block) of tile number `tile` in grouped launch order: GROUP_M consecutive M tiles run against
    every N block before the next group starts, so their A rows (gathered activations, [S, K]: hundreds of MiB)
    are read from HBM once and then served from L2, instead of once per N block."""
    per_group = GROUP_M * n_blocks
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def grouped_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    a_index_ptr,
    b_ptr, stride_be, stride_bk, stride_bn,
    offsets_ptr, tile_ends_ptr,
    u_ptr, stride_um, stride_ur,
    ua_ptr, stride_uae, stride_uak, stride_uar,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    bias_ptr, stride_biase, stride_biasn,
    c_ptr, stride_cm, stride_cn,
    out_index_ptr, row_scale_ptr,
    gu_ptr, stride_gum, stride_gun,
    dw_ptr, stride_dwn,
    b_desc, a_desc,
    N, K, R, E, M_TILES, alpha, u_alpha, act_alpha, act_limit,
    HAS_A_INDEX: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
    LOG2_E: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, B_TMA: tl.constexpr = 0, TMA_GATE_UP: tl.constexpr = False, A_TMA: tl.constexpr = False,
    U_IN_LOOP: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    # One output tile per program (M_TILES, an upper bound, x N blocks programs; those past the last tile exit), or
    # PERSISTENT: each program loops over tiles pid, pid + programs, ... of the real count (tile_ends[E - 1]). The
    # loop is flattened with the K loop, so the software pipeline issues the next tile's first loads during this
    # tile's epilogue instead of refilling from empty at every tile (run 53a: no faster on an H200 with Triton 3.6,
    # so autotuning tries it only when asked, see persistent_candidates).
    n_blocks = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        m_tiles = tl.load(tile_ends_ptr + E - 1)
        for tile in tl.range(tl.program_id(0), m_tiles * n_blocks, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _grouped_order(tile, m_tiles, n_blocks, GROUP_M)
            _, e_safe, first_row, row_end = _find_tile(pid_m, tile_ends_ptr, offsets_ptr, E, LOG2_E, BLOCK_M)
            _gemm_tile(
                pid_n, e_safe, first_row, row_end,
                a_ptr, stride_am, stride_ak, a_index_ptr, b_ptr, stride_be, stride_bk, stride_bn,
                u_ptr, stride_um, stride_ur, ua_ptr, stride_uae, stride_uak, stride_uar,
                lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_biase, stride_biasn,
                c_ptr, stride_cm, stride_cn, out_index_ptr, row_scale_ptr, gu_ptr, stride_gum, stride_gun,
                dw_ptr, stride_dwn, b_desc, a_desc, N, K, R, alpha, u_alpha, act_alpha, act_limit,
                HAS_A_INDEX, HAS_LORA, HAS_BIAS, HAS_OUT_INDEX, HAS_ROW_SCALE, EPILOGUE, ACT, INTERLEAVED,
                DOT_PRECISION, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, B_TMA, TMA_GATE_UP, A_TMA,
                U_IN_LOOP,
            )
    else:
        pid_m, pid_n = _grouped_order(tl.program_id(0), M_TILES, n_blocks, GROUP_M)
        e, e_safe, first_row, row_end = _find_tile(pid_m, tile_ends_ptr, offsets_ptr, E, LOG2_E, BLOCK_M)
        if e >= E:
            return
        _gemm_tile(
            pid_n, e_safe, first_row, row_end,
            a_ptr, stride_am, stride_ak, a_index_ptr, b_ptr, stride_be, stride_bk, stride_bn,
            u_ptr, stride_um, stride_ur, ua_ptr, stride_uae, stride_uak, stride_uar,
            lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_biase, stride_biasn,
            c_ptr, stride_cm, stride_cn, out_index_ptr, row_scale_ptr, gu_ptr, stride_gum, stride_gun,
            dw_ptr, stride_dwn, b_desc, a_desc, N, K, R, alpha, u_alpha, act_alpha, act_limit,
            HAS_A_INDEX, HAS_LORA, HAS_BIAS, HAS_OUT_INDEX, HAS_ROW_SCALE, EPILOGUE, ACT, INTERLEAVED,
            DOT_PRECISION, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, B_TMA, TMA_GATE_UP, A_TMA,
            U_IN_LOOP,
        )


@triton.jit
def _gemm_tile(
    pid_n, e_safe, first_row, row_end,
    a_ptr, stride_am, stride_ak, a_index_ptr, b_ptr, stride_be, stride_bk, stride_bn,
    u_ptr, stride_um, stride_ur, ua_ptr, stride_uae, stride_uak, stride_uar,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_biase, stride_biasn,
    c_ptr, stride_cm, stride_cn, out_index_ptr, row_scale_ptr, gu_ptr, stride_gum, stride_gun,
    dw_ptr, stride_dwn, b_desc, a_desc, N, K, R, alpha, u_alpha, act_alpha, act_limit,
    HAS_A_INDEX: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    B_TMA: tl.constexpr, TMA_GATE_UP: tl.constexpr, A_TMA: tl.constexpr, U_IN_LOOP: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile: rows first_row.. (before row_end) of expert e_safe, N block pid_n."""
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    # A loads use clamped row indices instead of masks (rows past the expert's end read its last row):
    # nothing they produce is stored, and unmasked loads pipeline better.
    safe_rows = tl.minimum(rows, row_end - 1).to(tl.int64)
    if HAS_A_INDEX:
        a_rows = tl.load(a_index_ptr + safe_rows).to(tl.int64)
    else:
        a_rows = safe_rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    b_base = b_ptr + e_safe.to(tl.int64) * stride_be
    if HAS_LORA:
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        if U_IN_LOOP:  # U = u_alpha * A[a_row] @ UA[e], accumulated from the same A tiles as the main product
            ua_ptrs = (ua_ptr + e_safe.to(tl.int64) * stride_uae + ks[:, None] * stride_uak
                       + rs[None, :] * stride_uar)
            acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        else:
            u = tl.load(u_ptr + rows64[:, None] * stride_um + rs[None, :] * stride_ur,
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        lb_base = lb_ptr + e_safe.to(tl.int64) * stride_lbe
    if HAS_BIAS:
        bias_base = bias_ptr + e_safe.to(tl.int64) * stride_biase

    if EPILOGUE == 1:
        # Gated: one [BLOCK_K, 2 * BLOCK_N] tile of B holds the gate and the up column of each output
        # column, paired (j even: gate, j odd: up), so one wide dot replaces two narrow ones and the
        # accumulator splits in registers. Interleaved weights store the pairs contiguously; concat ones
        # are K-contiguous here (a transposed [E, 2N, K] weight), so picking columns costs nothing.
        j = tl.arange(0, 2 * BLOCK_N)
        pair = pid_n * BLOCK_N + j // 2
        if INTERLEAVED:
            b_cols = pid_n * 2 * BLOCK_N + j
        else:
            b_cols = pair + (j % 2) * N
        b_col_mask = pair < N
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    else:
        b_cols = cols
        b_col_mask = col_mask
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_base + ks[:, None] * stride_bk + b_cols[None, :].to(tl.int64) * stride_bn
    if B_TMA != 0:
        # Box origin along the weight's output columns: gated interleaved tiles are one [., 2 * BLOCK_N] box of
        # pairs; gated concat tiles are two boxes, the gate columns here and the up columns N further on.
        if EPILOGUE == 1:
            n_b = 2 * N  # the weight's columns
            box_col = pid_n * 2 * BLOCK_N if INTERLEAVED else pid_n * BLOCK_N
        else:
            n_b = N
            box_col = pid_n * BLOCK_N
        if TMA_GATE_UP:  # two accumulators, paired up once after the loop
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if A_TMA:  # sorted rows, no gather: rows past the expert's end are the next expert's (never stored)
            a = a_desc.load([first_row, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks < K)[None, :], other=0.0)
        if B_TMA == 1:  # weight rows are output columns (K-contiguous): [box, BLOCK_K] boxes, transposed
            b = b_desc.load([e_safe * n_b + box_col, k0]).T
            if TMA_GATE_UP:
                b_up = b_desc.load([e_safe * n_b + N + box_col, k0]).T
        elif B_TMA == 2:  # weight rows are the reduction dim (N-contiguous): [BLOCK_K, box] boxes
            b = b_desc.load([e_safe * K + k0, box_col])
            if TMA_GATE_UP:
                b_up = b_desc.load([e_safe * K + k0, N + box_col])
        elif EVEN_K:
            if EVEN_N:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=b_col_mask[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=(k0 + ks < K)[:, None] & b_col_mask[None, :], other=0.0)
        if TMA_GATE_UP:
            acc_gate = tl.dot(a, b, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if U_IN_LOOP:
            if EVEN_K:
                ua = tl.load(ua_ptrs, mask=r_mask[None, :], other=0.0)
            else:
                ua = tl.load(ua_ptrs, mask=(k0 + ks < K)[:, None] & r_mask[None, :], other=0.0)
            acc_u = tl.dot(a, ua, acc_u, input_precision=DOT_PRECISION)
            ua_ptrs += BLOCK_K * stride_uak
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if TMA_GATE_UP:  # the paired layout of the one-wide-dot path: column 2n is gate n, 2n + 1 is up n
        acc = tl.reshape(tl.join(acc_gate, acc_up), (BLOCK_M, 2 * BLOCK_N))
    if U_IN_LOOP:  # rounded as its own launch would store it; the first column block writes it out
        u = (acc_u * u_alpha).to(u_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(u_ptr + rows64[:, None] * stride_um + rs[None, :] * stride_ur, u,
                     mask=row_mask[:, None] & r_mask[None, :])
    if HAS_LORA:
        lb = tl.load(lb_base + rs[:, None] * stride_lbr + b_cols[None, :] * stride_lbn,
                     mask=r_mask[:, None] & b_col_mask[None, :], other=0.0)
        acc = tl.dot(u, lb, acc, input_precision=DOT_PRECISION)
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_base + b_cols * stride_biasn, mask=b_col_mask, other=0.0).to(tl.float32)[None, :]

    mask = row_mask[:, None] & col_mask[None, :]
    if EPILOGUE == 0:
        if HAS_ROW_SCALE:
            acc = acc * tl.load(row_scale_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_OUT_INDEX:
            c_rows = tl.load(out_index_ptr + rows64, mask=row_mask, other=0).to(tl.int64)
        else:
            c_rows = rows64
        tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        gu_tile = acc.to(gu_ptr.dtype.element_ty)
        gate, up = tl.split(tl.reshape(gu_tile, (BLOCK_M, BLOCK_N, 2)))
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        if INTERLEAVED:  # the tile is already in gu's column order
            tl.store(gu_rows + b_cols[None, :] * stride_gun, gu_tile, mask=row_mask[:, None] & b_col_mask[None, :])
        else:
            tl.store(gu_rows + cols[None, :] * stride_gun, gate, mask=mask)
            tl.store(gu_rows + (cols + N)[None, :] * stride_gun, up, mask=mask)
        # h from the rounded gu, exactly as backward will recompute it
        h = act_forward(gate.to(tl.float32), up.to(tl.float32), ACT, act_alpha, act_limit)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn,
                 h.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        c_rows = c_ptr + rows64[:, None] * stride_cm
        if INTERLEAVED:  # one contiguous [BLOCK_M, 2 * BLOCK_N] tile of pairs, not two stride-2 loads
            pcols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
            pmask = row_mask[:, None] & (pcols < 2 * N)[None, :]
            pairs = tl.load(gu_rows + pcols[None, :] * stride_gun, mask=pmask, other=0.0).to(tl.float32)
            gate, up = tl.split(tl.reshape(pairs, (BLOCK_M, BLOCK_N, 2)))
        else:
            gate = tl.load(gu_rows + cols[None, :] * stride_gun, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(gu_rows + (cols + N)[None, :] * stride_gun, mask=mask, other=0.0).to(tl.float32)
        h = act_forward(gate, up, ACT, act_alpha, act_limit)
        dot = tl.sum(tl.where(mask, h * acc, 0.0), axis=1)
        tl.store(dw_ptr + pid_n * stride_dwn + rows64, dot, mask=row_mask)
        w = tl.load(row_scale_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        d_gate, d_up = act_backward(gate, up, acc * w[:, None], ACT, act_alpha, act_limit)
        d_gate = d_gate.to(c_ptr.dtype.element_ty)
        d_up = d_up.to(c_ptr.dtype.element_ty)
        if INTERLEAVED:
            tl.store(c_rows + pcols[None, :] * stride_cn, tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_N)),
                     mask=pmask)
        else:
            tl.store(c_rows + cols[None, :] * stride_cn, d_gate, mask=mask)
            tl.store(c_rows + (cols + N)[None, :] * stride_cn, d_up, mask=mask)


@triton.jit
def gated_backward_kernel(
    g_ptr, stride_gm, gu_ptr, stride_gum, w_ptr, dgu_ptr, stride_dm, dots_ptr,
    S, N, act_alpha, act_limit,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The activation-gradient epilogue as its own pass (the "split" variant of epilogue 2).

    g [S, N] = d_h / w from a plain GEMM; writes d_gu [S, 2N] = act'(gu) * (g * w) and dots [S] = <act(gu), g>.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < S
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if INTERLEAVED:  # one contiguous [BLOCK_M, 2 * BLOCK_N] tile, split in registers
            pcols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
            pmask = row_mask[:, None] & (pcols < 2 * N)[None, :]
            pairs = tl.load(gu_ptr + rows64[:, None] * stride_gum + pcols[None, :], mask=pmask, other=0.0)
            gate, up = tl.split(tl.reshape(pairs.to(tl.float32), (BLOCK_M, BLOCK_N, 2)))
        else:
            gate = tl.load(gu_ptr + rows64[:, None] * stride_gum + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(gu_ptr + rows64[:, None] * stride_gum + (cols + N)[None, :], mask=mask, other=0.0).to(tl.float32)
        h = act_forward(gate, up, ACT, act_alpha, act_limit)
        dot += tl.sum(tl.where(mask, h * g, 0.0), axis=1)
        d_gate, d_up = act_backward(gate, up, g * w[:, None], ACT, act_alpha, act_limit)
        d_gate = d_gate.to(dgu_ptr.dtype.element_ty)
        d_up = d_up.to(dgu_ptr.dtype.element_ty)
        if INTERLEAVED:
            d_pairs = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_N))
            tl.store(dgu_ptr + rows64[:, None] * stride_dm + pcols[None, :], d_pairs, mask=pmask)
        else:
            tl.store(dgu_ptr + rows64[:, None] * stride_dm + cols[None, :], d_gate, mask=mask)
            tl.store(dgu_ptr + rows64[:, None] * stride_dm + (cols + N)[None, :], d_up, mask=mask)
    tl.store(dots_ptr + rows64, dot, mask=row_mask)


# --- launcher ----------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 by default (~1e-3 relative): keep fp32 exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, next_power_of_2(int(n)))


def tma_candidates(device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether autotuning also tries the weight operand through TMA descriptors: on NVIDIA Hopper and newer
    (sm90+, where TMA exists) in bfloat16 (the dtype measured and GPU-tested) unless MOETUNE_TRITON_TMA=0;
    MOETUNE_TRITON_TMA=1 forces it for any dtype (the interpreter's fp32 tests).

    Run 36 (H200, 16K tokens): the TMA candidate won the down projection forward (gpt-oss +16%), the
    activation-gradient GEMM and the dgrad of gate_up (+5%); autotuning keeps whichever config is faster.
    """
    setting = os.environ.get("MOETUNE_TRITON_TMA")
    if TensorDescriptor is None or setting == "0":
        return False
    if setting == "1":
        return True
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or dtype != torch.bfloat16:
        return False
    return _capability(device.index) >= (9, 0)


# TMA boxes are at most 256 elements along each dimension: a larger tile loads through pointers instead.
TMA_MAX_BOX = 256


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def weight_descriptor(b: torch.Tensor, block_n: int, block_k: int, column_offset: int = 0):
    """(B_TMA mode, descriptor) for the [E, K, N] weight view b, or (0, None) where TMA cannot read it.

    Mode 1: b is a transposed view of a contiguous [E, N, K] weight, read as [E*N, K] rows in [block_n, block_k]
    boxes; mode 2: b is a contiguous [E, K, N] weight, read as [E*K, N] rows in [block_k, block_n] boxes. TMA
    needs a 16-byte aligned base and row pitch and boxes of at most 256 per dimension; reads past the 2-D tensor's
    end are zeros. column_offset: boxes also start that many output columns in (a gated concat weight's up
    columns, N in): in mode 2 that offset must be 16-byte aligned too (in mode 1 it counts rows).
    """
    if TensorDescriptor is None or max(block_n, block_k) > TMA_MAX_BOX:
        return 0, None
    E, K, N = b.shape
    size = b.element_size()
    if b.data_ptr() % 16:
        return 0, None
    if b.stride() == (N * K, 1, K) and (K * size) % 16 == 0:
        return 1, TensorDescriptor.from_tensor(b.transpose(1, 2).reshape(E * N, K), [block_n, block_k])
    if b.stride() == (K * N, N, 1) and (N * size) % 16 == 0 and (column_offset * size) % 16 == 0:
        return 2, TensorDescriptor.from_tensor(b.reshape(E * K, N), [block_k, block_n])
    return 0, None


def rows_descriptor(a: torch.Tensor, K: int, block_m: int, block_k: int):
    """A TMA descriptor over the first K columns of the activations a in [block_m, block_k] boxes, or None where
    TMA cannot read it (needs unit column stride, a 16-byte aligned base and row pitch, boxes of at most 256).

    Its width is K, not a's: columns past K must read as zeros, since a [E*K, N] weight's box past K holds the
    next expert's rows."""
    size = a.element_size()
    if (TensorDescriptor is None or a.shape[1] < K or a.stride(1) != 1 or a.data_ptr() % 16
            or (a.stride(0) * size) % 16 or max(block_m, block_k) > TMA_MAX_BOX):
        return None
    return TensorDescriptor(a, [a.shape[0], K], list(a.stride()), [block_m, block_k])


# The BLOCK_M values whose tile schedules the counting sort (expert_sort.py) writes with the plan: 16 << i.
TILE_BLOCKS = (16, 32, 64, 128, 256)


def tile_schedule(counts_E: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative M-tile counts per expert (int32 [E]); computed on the device, no sync.

    Memoised on the counts tensor: the 6-8 launches of one MoE call share their routing, and each
    recomputation is four small torch ops of host time (the 4K-token step is host-bound). A plan from the counting
    sort comes with them (remember_tile_schedule). The memo holds for the counts' version: counts written in place
    (a caller reusing its buffers) get new schedules.
    """
    cache = schedules(counts_E)
    if block_m not in cache:
        cache[block_m] = torch.cumsum((counts_E + block_m - 1) // block_m, 0).to(torch.int32)
    return cache[block_m]


def schedules(counts_E: torch.Tensor) -> dict:
    """The memo of schedules made from counts_E as it is now (tile_schedule's; grouped_wgrad keeps its own there)."""
    version, cache = counts_E.__dict__.get("_moetune_tile_ends", (None, None))
    current = _version(counts_E)
    if version != current:
        cache = {}
        counts_E.__dict__["_moetune_tile_ends"] = (current, cache)
    return cache


def remember_tile_schedule(counts_E: torch.Tensor, tile_ends: torch.Tensor) -> None:
    """Keep tile_ends [len(TILE_BLOCKS), E] (row i: tile_schedule(counts_E, TILE_BLOCKS[i]), made on the device
    with counts_E) as counts_E's tile schedules, for counts_E as it is now."""
    counts_E.__dict__["_moetune_tile_ends"] = (_version(counts_E), dict(zip(TILE_BLOCKS, tile_ends.unbind(0))))


def _version(t: torch.Tensor) -> int:
    """t's in-place write count; 0 for a tensor made under inference_mode, which keeps none (it is written in place
    only inside inference_mode, where a caller reusing buffers is not expected)."""
    try:
        return t._version
    except RuntimeError:
        return 0


def _check_in_loop_lora(a, b, lora_u, weight, out, lora_b, num_rows: int) -> None:
    """grouped_gemm's lora_u_weight arguments: one-line errors instead of reads and writes out of bounds."""
    E, K = b.shape[0], b.shape[1]
    if lora_u is not None or out is None or lora_b is None:
        raise ValueError("lora_u_weight: expected with lora_u_out and lora_b, and without lora_u")
    R = weight.shape[-1]
    if weight.dim() != 3 or tuple(weight.shape[:2]) != (E, K) or weight.dtype != a.dtype:
        raise ValueError(f"lora_u_weight: expected [E={E}, K={K}, R] in {a.dtype}, got {list(weight.shape)} {weight.dtype}")
    if out.dim() != 2 or tuple(out.shape) != (num_rows, R) or out.dtype != a.dtype:
        raise ValueError(f"lora_u_out: expected [num_rows={num_rows}, R={R}] in {a.dtype}, got {list(out.shape)} {out.dtype}")
    if lora_b.shape[1] != R:
        raise ValueError(f"lora_b: expected rank {R} (lora_u_weight's) in dim 1, got {list(lora_b.shape)}")


def _check_operands(a, b, offsets_E, counts_E, num_rows, a_index, lora_u, lora_b, bias, out, out_index, row_scale,
                    epilogue, gu) -> None:
    """grouped_gemm's operands against b's [E, K, N_b]: one-line errors instead of reads and writes out of bounds
    (the in-loop LoRA ones are _check_in_loop_lora's)."""
    if b.dim() != 3:
        raise ValueError(f"b: expected [E, K, N] expert weights, got shape {list(b.shape)}")
    E, K, N_b = b.shape
    check_rows("a", a, 0 if a_index is not None else num_rows, K, b.dtype)
    check_vector("offsets_E", offsets_E, E)
    check_vector("counts_E", counts_E, E)
    check_vector("a_index", a_index, num_rows)
    check_vector("out_index", out_index, num_rows)
    check_vector("row_scale", row_scale, num_rows)
    if (lora_u is None) != (lora_b is None):
        raise ValueError("lora_u, lora_b: expected both (the split-LoRA product) or neither")
    if lora_b is not None:
        rank = lora_b.shape[1] if lora_b.dim() == 3 else -1
        if lora_b.dim() != 3 or tuple(lora_b.shape) != (E, rank, N_b):
            raise ValueError(f"lora_b: expected [{E}, r, {N_b}], got {list(lora_b.shape)}")
        if lora_u is not None:
            check_rows("lora_u", lora_u, num_rows, rank, lora_u.dtype)
    if bias is not None and tuple(bias.shape) != (E, N_b):
        raise ValueError(f"bias: expected [{E}, {N_b}], got {list(bias.shape)}")
    if epilogue == 2 and (gu is None or row_scale is None):
        raise ValueError("gu, row_scale: expected with epilogue 2 (the activation's backward reads both)")
    if epilogue in (1, 2) and out is not None:
        raise ValueError(f"out: epilogue {epilogue} returns buffers of its own; expected none")
    if epilogue == 1 and gu is not None:
        raise ValueError("gu: epilogue 1 returns its own (the pre-activation it writes); expected none")


def _tune_key(epilogue: int, interleaved: bool, gathered: bool, lora: bool, scattered: bool, N: int, K: int,
              dtype: torch.dtype, num_rows: int, E: int) -> tuple:
    # Rows per expert set the best M tile: bucket them by powers of two in the key.
    return (epilogue, interleaved, gathered, lora, scattered, N, K, str(dtype), next_power_of_2(max(1, num_rows // E)),
            _rows_class(num_rows, E))


# Names of the tuned choices in the autotune cache; bump the version when a kernel or rule change invalidates them.
# v4: TMA's host time counted (TMA_HOST_MS); v3: one gated dot, pointer increments. The LoRA input's way is timed
# with the tuned configs: v2 with v4's.
TUNING = "grouped_gemm/v4"
LORA_INPUT_TUNING = "grouped_gemm/lora_input/v2"

# The two ways to feed a GEMM its LoRA input U = u_alpha * A[a_row] @ UA[e], the main loop first: one launch fewer.
_LORA_INPUT_WAYS = ({"in_loop": True}, {"in_loop": False})
# Host time to issue one more launch (run 48c, an H200's host: 0.14-0.16 ms for the LoRA-input launches). Autotuning
# times the GPU only, where the host runs ahead; in short batches the host is the limit and each launch costs this.
# Run 48e: letting the GPU timing alone choose kept a launch at Qwen3 4K, 3.47 ms a block against 3.00 in the loop.
LAUNCH_HOST_MS = 0.15
# Host time a TMA descriptor adds to a launch: built in Python and encoded by Triton's launcher at every launch (run
# 49a, an H200's host: 50-100 us more for the launches with two descriptors than for the same GEMM with pointer
# loads). Autotuning counts it against the TMA configs: a TMA tile must save more GPU time than that. Run 50b
# (Qwen3, H200): three of the four large 4K launches went to pointer loads, none at 16K; the block measured the same
# either way (4K 2.84 / 2.86 ms, 16K 7.52 / 7.55, medians of 3 alternating rounds).
TMA_HOST_MS = 0.03


# The second tuning step: the first step's pick against the same tile with PERSISTENT programs per SM (see
# persistent_variants). Its own name, so the first step's cached picks stay valid.
PERSISTENT_TUNING = "grouped_gemm/persistent/v1"

# What autotuning decided for a launch signature (shapes, dtype, device, operands present, environment switches):
# the LoRA input's way, the config of the first two steps, whether the Gluon step may run. autotune answers repeats
# from memory too, but asking it (three tuning keys, candidate lists, six reads of the environment, up to four
# lookups) cost ~15 us a launch, a fifth of an experts block's host time on a CPU (session 22), and a 4K-token
# block waits on its host (run 56f). Batch lengths vary: bounded as launch.py's keys are.
_decisions: dict[tuple, tuple[bool | None, dict | None, bool]] = {}
MAX_DECISIONS = 4096


def forget_decisions() -> None:
    """Drop the memoised decisions: for tests and scripts that change what autotuning answers or offers within one
    process (a faked autotune.pick, another _LORA_INPUT_WAYS, another autotune cache)."""
    _decisions.clear()


def _switches() -> tuple:
    """The environment switches that change what autotuning tries, read at every launch: benchmarks flip them within
    one process (switch_ab.py), and each setting gets decisions of its own."""
    get = os.environ.get
    return get("MOETUNE_TRITON_TMA"), get("MOETUNE_TRITON_PERSISTENT"), get("MOETUNE_TRITON_GLUON")


def _remember(signature: tuple, decision: tuple[bool | None, dict | None, bool]) -> None:
    if len(_decisions) >= MAX_DECISIONS:
        _decisions.clear()
    _decisions[signature] = decision


def persistent_candidates(device) -> bool:
    """Whether autotuning also tries its pick as a persistent kernel: only under MOETUNE_TRITON_PERSISTENT=1.

    Off by default: run 53a (H200, Triton 3.6, Qwen3 16K tokens) timed the persistent variants of all 11 tuned
    launches and kept none (none beat one tile per program by 3%), while each costs one more compile when tuning
    (1 and 2 programs per SM are the same kernel on different grids).
    Triton 3.6 pipelines the flattened loop without warp specialisation on Hopper, so a tile's epilogue still
    stalls its own warps; kept for the Triton releases and GPUs where that changes."""
    return os.environ.get("MOETUNE_TRITON_PERSISTENT") == "1"


def persistent_variants(config: dict) -> tuple[dict, ...]:
    """config, then the same tile with 1 and 2 persistent programs per SM (2: room for one program's epilogue to
    overlap the other's main loop where two fit on an SM). Memoised: asked at every launch."""
    return _persistent_variants(tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _persistent_variants(items: tuple) -> tuple[dict, ...]:
    config = dict(items)
    return (config, dict(config, PERSISTENT=1), dict(config, PERSISTENT=2))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device) -> int:
    """SMs a persistent launch spreads over (the interpreter: 2, so a test's programs each loop over tiles)."""
    device = torch.device(device)
    return _multiprocessors(device.index) if device.type == "cuda" else 2


def _tma_host_ms(config: dict) -> float:
    return TMA_HOST_MS * (bool(config.get("TMA_B")) + bool(config.get("TMA_A")))


# The third tuning step, on Hopper: the pick so far against hopper_gemm's Gluon kernel (warp-specialised,
# persistent), for the plain GEMMs over sorted rows (the down projection forward, gate_up's dgrad), their LoRA input
# given or accumulated in the main loop (v4; v3 took it given only). Its own name, so the earlier steps' cached picks
# stay valid; it is also part of the LoRA-input ways' key, which are measured again when it changes.
GLUON_TUNING = "grouped_gemm/gluon/v4"
# Host time a Gluon launch adds over grouped_gemm's own, counted against it as TMA_HOST_MS is. Run 54b (an H200's
# host, Qwen3 4K): 92 and 157 us for the dgrad and the down projection, when four TMA descriptors were built in Python
# and encoded by Triton's launcher at every launch, through Triton's own launch path. Since the kernel makes its
# descriptors on the device and launches directly (launch.py): 16 and 26 us (run 55b; the scratch allocation and the
# eligibility checks).
GLUON_HOST_MS = 0.02


def gluon_candidates(device, dtype: torch.dtype) -> bool:
    """Whether autotuning also tries hopper_gemm's Gluon kernel: only under MOETUNE_TRITON_GLUON=1, on sm90 with a
    Triton that has Gluon, for bf16 and fp16.

    Off by default. Runs 54a-b (H200, Triton 3.6): its outputs were bitwise grouped_gemm's, its GPU time 18-19%
    lower on Qwen3's 4K dgrad and from a 9% gain to a 2% loss elsewhere; but each launch cost 92-157 us more host
    time, and the whole block (switch_ab.py --switch gluon) measured the same either way at Qwen3 4K and 16K and
    GLM 16K. Run 55a, with the descriptors made on the device and direct launches: 33 us more host a launch (not
    92-157; 16-26 once eligibility was asked once, run 55b), GPU -29% (4K down projection) and -20% (4K dgrad), and still the same block times: at 4K the block
    waits on its host, and at 16K the two launches it may take are within a few percent of Triton's. Those launches
    had their LoRA input by a launch of its own, where the tuned ways mostly put it in Triton's main loop; since
    session 19 the Gluon kernel takes it in its main loop too: run 56e found it 12-13% faster per launch than
    Triton's at Qwen3's 4K and 3-4% at 16K, the Qwen3 4K block 2.59 ms against 2.82 (medians of three rounds), 16K
    and GLM 16K the same within the rounds' spread (GLM's median 1% slower); but whole Qwen3 at 8K (run 56f,
    host-bound) took 663 and 598 ms a step with it against 621 and 586 without. Still opt-in until a whole model
    shows the gain."""
    device = torch.device(device)
    if os.environ.get("MOETUNE_TRITON_GLUON") != "1" or hopper_gemm.gluon is None or device.type != "cuda":
        return False
    return (torch.version.hip is None and dtype in (torch.bfloat16, torch.float16)
            and _capability(device.index) == (9, 0))


def gluon_variants(config: dict) -> tuple[dict, ...]:
    """config, then each of hopper_gemm's configs (marked GLUON). Memoised: asked at every launch."""
    return _gluon_variants(tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _gluon_variants(items: tuple) -> tuple[dict, ...]:
    return (dict(items),) + tuple(dict(config, GLUON=True) for config in hopper_gemm.CONFIGS)


def _gluon_host_ms(config: dict) -> float:
    return GLUON_HOST_MS if config.get("GLUON") else _tma_host_ms(config)


def _lora_input_in_loop(a, b, offsets_E, counts_E, *, num_rows, a_index, lora_u_weight, epilogue, interleaved,
                        out_index, **rest) -> bool:
    """Whether grouped_gemm's LoRA input runs faster in its main loop than by a launch of its own, for this shape.

    Measured per shape, not fixed: run 48 (H200, 16K tokens) found the extra rank-wide product in the loop cheaper
    than the separate pass in some launches (Qwen3's gate_up dgrad: -0.19 ms) and dearer in others (gpt-oss's gated
    forward: +0.53 ms, GLM's activation-gradient GEMM: +0.17 ms). The loop keeps its place unless the other way is
    faster by more than the host time of the launch it adds (LAUNCH_HOST_MS)."""
    E, K = b.shape[0], b.shape[1]
    N = b.shape[2] // 2 if epilogue == 1 else b.shape[2]
    rank = lora_u_weight.shape[2]
    key = _tune_key(epilogue, interleaved, a_index is not None, True, out_index is not None, N, K, a.dtype,
                    num_rows, E) + (_pow2_at_least(rank), tma_candidates(a.device, a.dtype))  # TMA: other configs
    if persistent_candidates(a.device):  # other configs again (appended only when on: the cached keys stay valid)
        key += ("persistent",)
    if epilogue == 0 and a_index is None and gluon_candidates(a.device, a.dtype):  # either way may run on Gluon
        key += ("gluon", GLUON_TUNING)

    def run(way: dict):
        grouped_gemm(a, b, offsets_E, counts_E, num_rows=num_rows, a_index=a_index, lora_u_weight=lora_u_weight,
                     lora_u_in_loop=way["in_loop"], epilogue=epilogue, interleaved=interleaved, out_index=out_index,
                     **rest)

    return autotune.pick(LORA_INPUT_TUNING, key, _LORA_INPUT_WAYS, run, a.device, num_rows,
                         first_bonus_ms=LAUNCH_HOST_MS)["in_loop"]


def candidates_for(epilogue: int, num_rows: int, E: int, N: int, K: int, tma: bool = False,
                   gathered: bool = True) -> tuple[dict, ...]:
    """Configs to tune over for one launch (memoised per rows-per-expert class: asked on every launch, and
    batch lengths vary; treat as read-only)."""
    return _candidates(epilogue, _rows_class(num_rows, E), N, K, tma, gathered)


def _rows_class(num_rows: int, E: int) -> int:
    """One rows-per-expert figure per class that candidate_blocks tells apart (its thresholds 48, 256, 512)."""
    per_expert = num_rows / max(E, 1)
    return 1024 if per_expert > 512 else 256 if per_expert >= 256 else 48 if per_expert >= 48 else 0


@functools.lru_cache(maxsize=None)
def _candidates(epilogue: int, rows_per_expert: int, N: int, K: int, tma: bool, gathered: bool) -> tuple[dict, ...]:
    """candidates_for's configs for one class of rows per expert.

    The activation-gradient epilogue (2) may also run "split": a plain GEMM into a [S, N] buffer, then
    gated_backward_kernel; which wins depends on the shape (run 14: the fused epilogue ran at 108-201 TFLOP/s
    where the plain GEMM reaches 330-470). tma (see tma_candidates) adds the same tiles with the weight read
    through TMA descriptors, and for plain GEMMs over sorted rows (gathered=False) with the activations read
    through TMA as well; neither for the rank-wide LoRA products."""
    fused = candidate_blocks(rows_per_expert, N, K, gated=epilogue != 0)
    tma_b = (lambda configs: [dict(config, TMA_B=True) for config in configs]) if tma and N > 64 else (lambda _: [])
    if epilogue == 0:
        # N > 64: not the rank-wide LoRA products, whose activations through TMA ran 5-20% slower (run 38).
        tma_a = [dict(config, TMA_A=True, TMA_B=True) for config in fused] if tma and not gathered and N > 64 else []
        return tuple(fused + tma_b(fused) + tma_a)
    if epilogue == 1:
        return tuple(fused + tma_b(fused))
    plain = candidate_blocks(rows_per_expert, N, K, gated=False)
    narrow = autotune.block_config(128, 32, 64, 4, 4)  # fewer live epilogue registers per thread
    split = [dict(config, SPLIT=True) for config in plain[:3]]
    return tuple(fused + [narrow] + split + tma_b(fused[:2] + split))


def candidate_blocks(rows_per_expert: float, N: int, K: int, gated: bool) -> list[dict]:
    """Block shapes to try, the heuristic favourite first (used as is in the interpreter).

    Narrow N (a LoRA rank) and tiny problems get small tiles; the wide ones are the configs that
    Triton GEMMs usually win with on Hopper/Ampere, pruned to a few so tuning stays short.
    """
    bm = 128 if rows_per_expert >= 256 else 64 if rows_per_expert >= 48 else 32
    bk = 64 if K >= 64 else _pow2_at_least(K)
    cfg = autotune.block_config
    if N <= 64:
        bn = _pow2_at_least(N)
        return [cfg(bm, bn, bk, 4, 3), cfg(128, bn, 128, 4, 3)]
    if gated:
        first = cfg(bm, 64, bk, 8 if bm == 128 else 4, 3)
        more = [cfg(128, 128, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 64, 64, 8, 4)]
    else:
        first = cfg(bm, 128, bk, 8 if bm == 128 else 4, 3)
        more = [cfg(128, 256, 64, 8, 3), cfg(128, 256, 64, 8, 4), cfg(128, 128, 64, 8, 4)]
    if rows_per_expert <= 512:  # few rows per expert (4K-token steps): more, shorter tiles keep the GPU full
        more.append(cfg(64, 128, 64, 4, 4))
    return [first] + [c for c in more if c != first]


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets_E: torch.Tensor,
    counts_E: torch.Tensor,
    *,
    num_rows: int,
    a_index: torch.Tensor | None = None,
    lora_u: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_u_weight: torch.Tensor | None = None,
    lora_u_alpha: float = 1.0,
    lora_u_out: torch.Tensor | None = None,
    lora_u_in_loop: bool | None = None,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    epilogue: int = 0,
    gu: torch.Tensor | None = None,
    act: tuple[int, float, float] = (0, 0.0, 0.0),
    interleaved: bool = False,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. Returns C (epilogue 0), (h, gu) (epilogue 1), (d_gu, dots_S) (epilogue 2).

    b is [E, K, N_b]: for epilogue 1, N_b = 2N (gate/up pairs) and C has N columns.
    lora_u_weight [E, K, R] (instead of lora_u): the split-LoRA input is computed in the main loop from the same A
    tiles, lora_u = lora_u_alpha * A[a_row] @ lora_u_weight[e], rounded to a's dtype, and written to lora_u_out
    [S, R] (what a separate grouped_gemm(a, lora_u_weight, a_index=a_index, alpha=lora_u_alpha) returns, up to
    the order of the K sums, in one pass over A instead of two). lora_u_in_loop: True does that; False launches
    that separate grouped_gemm into lora_u_out first; None (default) takes whichever way measured faster for this
    shape on this GPU (tuned once, like the configs; in the loop where nothing is tuned, or with a config).
    config: one of candidates_for(...) to use instead of the tuned one (tests, benchmarks).
    """
    # A caller's config decides everything; otherwise autotuning does, once per signature (see _decisions).
    signature, decided, gluon = None, None, False
    if config is None:
        signature = (a.device, a.dtype, b.shape, num_rows, epilogue, interleaved, a_index is None, lora_u is None,
                     None if lora_u_weight is None else lora_u_weight.shape[-1], lora_u_in_loop, out_index is None,
                     _switches())
        decided = _decisions.get(signature)
        if decided is not None:
            lora_u_in_loop = decided[0]
    if lora_u_weight is not None:
        _check_in_loop_lora(a, b, lora_u, lora_u_weight, lora_u_out, lora_b, num_rows)
        if lora_u_in_loop is None and config is None:
            lora_u_in_loop = _lora_input_in_loop(
                a, b, offsets_E, counts_E, num_rows=num_rows, a_index=a_index, lora_b=lora_b,
                lora_u_weight=lora_u_weight, lora_u_alpha=lora_u_alpha, lora_u_out=lora_u_out, bias=bias, alpha=alpha,
                out=out, out_index=out_index, row_scale=row_scale, epilogue=epilogue, gu=gu, act=act,
                interleaved=interleaved, out_dtype=out_dtype)
        if lora_u_in_loop is False:  # U by a launch of its own, then the GEMM that reads it (each decides its own)
            if signature is not None and decided is None:
                _remember(signature, (False, None, False))
            grouped_gemm(a, lora_u_weight, offsets_E, counts_E, num_rows=num_rows, a_index=a_index,
                         alpha=lora_u_alpha, out=lora_u_out)
            return grouped_gemm(a, b, offsets_E, counts_E, num_rows=num_rows, a_index=a_index, lora_u=lora_u_out,
                                lora_b=lora_b, bias=bias, alpha=alpha, out=out, out_index=out_index,
                                row_scale=row_scale, epilogue=epilogue, gu=gu, act=act, interleaved=interleaved,
                                out_dtype=out_dtype, config=config)
    elif lora_u_out is not None:
        raise ValueError("lora_u_out: expected only with lora_u_weight (the kernel writes it from the main loop)")
    elif lora_u_in_loop is not None:
        raise ValueError("lora_u_in_loop: expected only with lora_u_weight")
    if config is not None and config.get("SPLIT") and (epilogue != 2 or out_index is not None):
        raise ValueError("config: SPLIT applies to the activation-gradient epilogue (2) without out_index only")
    _check_operands(a, b, offsets_E, counts_E, num_rows, a_index, lora_u if lora_u_weight is None else lora_u_out,
                    lora_b, bias, out, out_index, row_scale, epilogue, gu)
    E, K = b.shape[0], b.shape[1]
    N = b.shape[2] // 2 if epilogue == 1 else b.shape[2]
    dtype = out_dtype or a.dtype
    device = a.device
    if epilogue == 0:
        if out is None:
            out = torch.empty(num_rows, N, device=device, dtype=dtype)
    elif epilogue == 1:
        out = torch.empty(num_rows, N, device=device, dtype=dtype)
        gu = torch.empty(num_rows, 2 * N, device=device, dtype=dtype)
    else:
        out = torch.empty(num_rows, 2 * N, device=device, dtype=dtype)
    in_loop = lora_u_weight is not None
    if in_loop:
        lora_u = lora_u_out  # written by the kernel, then read back in its own epilogue
    rank = lora_u.shape[1] if lora_u is not None else 1
    dummy = out
    z = (0, 0, 0)
    results = []  # epilogue 2: the partial dots [n_blocks, S] (fused) or the dots [S] (split)

    def launch(config: dict):
        if config.get("GLUON"):  # eligibility asked once, before the tuning step or of a caller's config
            hopper_gemm.sorted_gemm(a, b, offsets_E, counts_E, num_rows=num_rows,
                                    tile_ends=tile_schedule(counts_E, config["BLOCK_M"]), lora_u=lora_u, lora_b=lora_b,
                                    lora_u_weight=lora_u_weight if in_loop else None, lora_u_alpha=lora_u_alpha,
                                    alpha=alpha, bias=bias, out=out, out_index=out_index, row_scale=row_scale,
                                    config=config)
            return
        blocks = {k: v for k, v in config.items() if k not in ("SPLIT", "TMA_B", "TMA_A", "PERSISTENT")}
        split = config.get("SPLIT", False)
        epi = 0 if split else epilogue
        b_tma, b_desc = 0, dummy
        if config.get("TMA_B"):  # a gated interleaved tile is one box of BLOCK_N (gate, up) pairs
            box_n = 2 * blocks["BLOCK_N"] if epi == 1 and interleaved else blocks["BLOCK_N"]
            up_columns = N if epi == 1 and not interleaved else 0  # concat: the up columns' boxes start N in
            b_tma, b_desc = weight_descriptor(b, box_n, blocks["BLOCK_K"], up_columns)
            b_desc = dummy if b_desc is None else b_desc  # no TMA for this weight: pointer loads
        a_desc = None
        if config.get("TMA_A") and a_index is None:
            a_desc = rows_descriptor(a, K, blocks["BLOCK_M"], blocks["BLOCK_K"])
        c = torch.empty(num_rows, N, device=device, dtype=dtype) if split else out
        block_m = blocks["BLOCK_M"]
        n_blocks = cdiv(N, blocks["BLOCK_N"])
        dw = torch.empty(n_blocks, num_rows, device=device, dtype=torch.float32) if epi == 2 else None
        m_tiles = cdiv(num_rows, block_m) + E  # upper bound: each expert adds at most one partial tile
        programs = m_tiles * n_blocks
        per_sm = config.get("PERSISTENT", 0)
        if per_sm:  # a few programs per SM, each looping over tiles
            programs = min(programs, per_sm * multiprocessors(device))
        launch_kernel(
            grouped_gemm_kernel, (programs,),
            a, a.stride(0), a.stride(1),
            a_index if a_index is not None else dummy,
            b, b.stride(0), b.stride(1), b.stride(2),
            offsets_E, tile_schedule(counts_E, block_m),
            lora_u if lora_u is not None else dummy, *(lora_u.stride() if lora_u is not None else z[:2]),
            lora_u_weight if in_loop else dummy, *(lora_u_weight.stride() if in_loop else z),
            lora_b if lora_b is not None else dummy, *(lora_b.stride() if lora_b is not None else z),
            bias if bias is not None else dummy, *(bias.stride() if bias is not None else z[:2]),
            c, c.stride(0), c.stride(1),
            out_index if out_index is not None else dummy,
            row_scale if row_scale is not None and not split else dummy,
            gu if gu is not None else dummy, *(gu.stride() if gu is not None else z[:2]),
            dw if dw is not None else dummy, dw.stride(0) if dw is not None else 0,
            b_desc, a_desc if a_desc is not None else dummy,
            N, K, rank, E, m_tiles, float(alpha), float(lora_u_alpha), float(act[1]), float(act[2]),
            HAS_A_INDEX=a_index is not None, HAS_LORA=lora_u is not None, HAS_BIAS=bias is not None,
            HAS_OUT_INDEX=out_index is not None, HAS_ROW_SCALE=row_scale is not None and not split,
            EPILOGUE=epi, ACT=act[0], INTERLEAVED=interleaved,
            LOG2_E=max(1, int(E).bit_length()),
            DOT_PRECISION=dot_precision(a.dtype),
            EVEN_K=K % blocks["BLOCK_K"] == 0,
            EVEN_N=N % blocks["BLOCK_N"] == 0,
            BLOCK_R=_pow2_at_least(rank),
            GROUP_M=8, B_TMA=b_tma, TMA_GATE_UP=b_tma != 0 and epi == 1 and not interleaved,
            A_TMA=a_desc is not None, U_IN_LOOP=in_loop, PERSISTENT=bool(per_sm),
            **blocks,
        )
        if split:
            dots = torch.empty(num_rows, device=device, dtype=torch.float32)
            launch_kernel(
                gated_backward_kernel, (cdiv(num_rows, 16),),
                c, c.stride(0), gu, gu.stride(0), row_scale, out, out.stride(0), dots,
                num_rows, N, float(act[1]), float(act[2]),
                ACT=act[0], INTERLEAVED=interleaved, BLOCK_M=16, BLOCK_N=64, num_warps=4,
            )
            results[:] = [dots]
        elif dw is not None:
            results[:] = [dw]

    def _gluon_unsupported() -> str | None:
        """Why hopper_gemm's kernel cannot run this launch, or None: epilogue 0 over sorted rows (the LoRA input
        given or accumulated in the main loop), operands its TMA boxes can read."""
        if epilogue != 0 or a_index is not None:
            return "epilogue 0, no a_index"
        return hopper_gemm.sorted_gemm_supported(a, b, lora_u, lora_b, bias, out, out_index, row_scale,
                                                 lora_u_weight=lora_u_weight if in_loop else None)

    def tuning_key() -> tuple:
        key = _tune_key(epilogue, interleaved, a_index is not None, lora_u is not None, out_index is not None, N, K,
                        a.dtype, num_rows, E)
        if in_loop:  # another kernel variant, tuned apart; its shared memory grows with the rank (a UA tile per stage)
            key += ("u_in_loop", _pow2_at_least(rank))
        return key

    if signature is None:  # the caller's config
        if config.get("GLUON"):
            why = _gluon_unsupported()
            if why:
                raise ValueError(f"config: GLUON runs plain GEMMs over sorted rows only ({why})")
    elif decided is not None and decided[1] is not None:
        config, gluon = decided[1], decided[2]
    else:
        key = tuning_key()
        candidates = candidates_for(epilogue, num_rows, E, N, K, tma_candidates(device, a.dtype), a_index is not None)
        config = autotune.pick(TUNING, key, candidates, launch, device, num_rows, host_ms=_tma_host_ms)
        if persistent_candidates(device):  # then the same tile persistent, kept only if measured faster
            config = autotune.pick(PERSISTENT_TUNING, key, persistent_variants(config), launch, device, num_rows)
        gluon = N > 64 and gluon_candidates(device, a.dtype)
        _remember(signature, (lora_u_in_loop, config, gluon))
    # The third step asks whether the Gluon kernel can read these operands (alignment, strides) at every launch.
    if signature is not None and gluon and _gluon_unsupported() is None:
        config = autotune.pick(GLUON_TUNING, tuning_key(), gluon_variants(config), launch, device, num_rows,
                               host_ms=_gluon_host_ms)
    launch(config)
    if epilogue == 1:
        return out, gu
    if epilogue == 2:
        dots = results[0]
        return out, dots if dots.dim() == 1 else dots.sum(0)
    return out
