"""Row-grouped GEMM over expert-sorted rows with fused gather, split-LoRA, bias, activation and scatter.

Shape legend: S sorted rows, E experts, K reduction dim, N output columns, R LoRA rank.

For each sorted row i of expert e (rows of one expert are contiguous, ends in offsets_E):

    acc[i, :] = alpha * ( A[a_row(i), :] @ B[e]  +  U[i, :] @ LB[e] )  (+ bias[e])

  A        [rows_A, K]   read at a_row(i) = a_index[i] (gather fused into the loads) or i
  B        [E, K, N]     any strides (a transposed view of a [E, N, K] weight costs nothing)
  U, LB    [S, R], [E, R, N]   the split-LoRA second product, added in the epilogue
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

Scheduling: grid (M tiles upper bound, N blocks). M tile t belongs to the expert e with
tile_ends[e-1] <= t < tile_ends[e] (binary search over E); tiles past the last exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_backward, act_forward


@triton.jit
def _find_tile(pid_m, tile_ends_ptr, offsets_ptr, E, LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert of M tile pid_m and its row range; e == E means 'past the last tile'."""
    lo = pid_m * 0
    hi = lo + E
    for _ in tl.static_range(LOG2_E):  # smallest e with tile_ends[e] > pid_m, or E
        active = lo < hi
        mid = (lo + hi) // 2
        ends = tl.load(tile_ends_ptr + tl.minimum(mid, E - 1))
        lo = tl.where(active & (ends <= pid_m), mid + 1, lo)
        hi = tl.where(active & (ends > pid_m), mid, hi)
    e = lo
    e_safe = tl.minimum(e, E - 1)
    prev = tl.maximum(e_safe - 1, 0)
    tile_start = tl.where(e_safe > 0, tl.load(tile_ends_ptr + prev), 0)
    row_start = tl.where(e_safe > 0, tl.load(offsets_ptr + prev), 0)
    row_end = tl.load(offsets_ptr + e_safe)
    first_row = row_start + (pid_m - tile_start) * BLOCK_M
    return e, e_safe, first_row, row_end


@triton.jit
def grouped_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    a_index_ptr,
    b_ptr, stride_be, stride_bk, stride_bn,
    offsets_ptr, tile_ends_ptr,
    u_ptr, stride_um, stride_ur,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    bias_ptr, stride_biase, stride_biasn,
    c_ptr, stride_cm, stride_cn,
    out_index_ptr, row_scale_ptr,
    gu_ptr, stride_gum, stride_gun,
    dw_ptr, stride_dwn,
    N, K, R, E, alpha, act_alpha, act_limit,
    HAS_A_INDEX: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
    LOG2_E: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, e_safe, first_row, row_end = _find_tile(pid_m, tile_ends_ptr, offsets_ptr, E, LOG2_E, BLOCK_M)
    if e >= E:
        return

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    if HAS_A_INDEX:
        a_rows = tl.load(a_index_ptr + rows64, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if EPILOGUE == 1:
        if INTERLEAVED:
            gate_cols = 2 * cols
            up_cols = 2 * cols + 1
        else:
            gate_cols = cols
            up_cols = cols + N
    else:
        gate_cols = cols
        up_cols = cols
    ks = tl.arange(0, BLOCK_K)
    b_base = b_ptr + e_safe.to(tl.int64) * stride_be

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk + gate_cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            b_up = tl.load(b_base + k[:, None] * stride_bk + up_cols[None, :] * stride_bn,
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)

    if HAS_LORA:
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        u = tl.load(u_ptr + rows64[:, None] * stride_um + rs[None, :] * stride_ur,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        lb_base = lb_ptr + e_safe.to(tl.int64) * stride_lbe
        lb = tl.load(lb_base + rs[:, None] * stride_lbr + gate_cols[None, :] * stride_lbn,
                     mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(u, lb, acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            lb_up = tl.load(lb_base + rs[:, None] * stride_lbr + up_cols[None, :] * stride_lbn,
                            mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = tl.dot(u, lb_up, acc_up, input_precision=DOT_PRECISION)
    acc = acc * alpha
    if HAS_BIAS:
        bias_base = bias_ptr + e_safe.to(tl.int64) * stride_biase
        acc += tl.load(bias_base + gate_cols * stride_biasn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            acc_up += tl.load(bias_base + up_cols * stride_biasn, mask=col_mask, other=0.0).to(tl.float32)[None, :]

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
        gate = acc.to(gu_ptr.dtype.element_ty)
        up = acc_up.to(gu_ptr.dtype.element_ty)
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        tl.store(gu_rows + gate_cols[None, :] * stride_gun, gate, mask=mask)
        tl.store(gu_rows + up_cols[None, :] * stride_gun, up, mask=mask)
        # h from the rounded gu, exactly as backward will recompute it
        h = act_forward(gate.to(tl.float32), up.to(tl.float32), ACT, act_alpha, act_limit)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn,
                 h.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        if INTERLEAVED:
            g_cols = 2 * cols
            u_cols = 2 * cols + 1
        else:
            g_cols = cols
            u_cols = cols + N
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        gate = tl.load(gu_rows + g_cols[None, :] * stride_gun, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_rows + u_cols[None, :] * stride_gun, mask=mask, other=0.0).to(tl.float32)
        h = act_forward(gate, up, ACT, act_alpha, act_limit)
        dot = tl.sum(tl.where(mask, h * acc, 0.0), axis=1)
        tl.store(dw_ptr + pid_n * stride_dwn + rows64, dot, mask=row_mask)
        w = tl.load(row_scale_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        d_gate, d_up = act_backward(gate, up, acc * w[:, None], ACT, act_alpha, act_limit)
        c_rows = c_ptr + rows64[:, None] * stride_cm
        tl.store(c_rows + g_cols[None, :] * stride_cn, d_gate.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c_rows + u_cols[None, :] * stride_cn, d_up.to(c_ptr.dtype.element_ty), mask=mask)


# --- launcher ----------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 by default (~1e-3 relative): keep fp32 exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def tile_schedule(counts_E: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative M-tile counts per expert (int32 [E]); computed on the device, no sync."""
    return torch.cumsum((counts_E + block_m - 1) // block_m, 0).to(torch.int32)


def pick_blocks(num_rows: int, E: int, N: int, K: int, gated: bool) -> dict:
    """Block sizes by shape. Chosen on an H100 for the Qwen3/GLM/gpt-oss expert shapes
    (benchmarks/NOTES.md); narrow N (LoRA rank) and tiny problems get small blocks."""
    rows_per_expert = num_rows / max(E, 1)
    block_m = 128 if rows_per_expert >= 256 else 64 if rows_per_expert >= 48 else 32
    if N <= 64:
        block_n = _pow2_at_least(N)
    else:
        block_n = 64 if gated else 128
    block_k = 64 if K >= 64 else _pow2_at_least(K)
    warps = 8 if block_m * block_n >= 128 * 128 or (gated and block_m >= 128) else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. Returns C (epilogue 0 and 2), (h, gu) (epilogue 1), (d_gu, dots_S) (2).

    b is [E, K, N_b]: for epilogue 1, N_b = 2N (gate/up pairs) and C has N columns.
    """
    E, K = b.shape[0], b.shape[1]
    N = b.shape[2] // 2 if epilogue == 1 else b.shape[2]
    dtype = out_dtype or a.dtype
    device = a.device
    blocks = pick_blocks(num_rows, E, N, K, gated=epilogue != 0)
    block_m = blocks["BLOCK_M"]
    tile_ends = tile_schedule(counts_E, block_m)
    m_tiles = triton.cdiv(num_rows, block_m) + E
    n_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    dw = None
    if epilogue == 0:
        if out is None:
            out = torch.empty(num_rows, N, device=device, dtype=dtype)
    elif epilogue == 1:
        out = torch.empty(num_rows, N, device=device, dtype=dtype)
        gu = torch.empty(num_rows, 2 * N, device=device, dtype=dtype)
    else:
        assert gu is not None and row_scale is not None
        out = torch.empty(num_rows, 2 * N, device=device, dtype=dtype)
        dw = torch.empty(n_blocks, num_rows, device=device, dtype=torch.float32)
    rank = lora_u.shape[1] if lora_u is not None else 1
    dummy = out
    z = (0, 0, 0)
    grouped_gemm_kernel[(m_tiles, n_blocks)](
        a, a.stride(0), a.stride(1),
        a_index if a_index is not None else dummy,
        b, b.stride(0), b.stride(1), b.stride(2),
        offsets_E, tile_ends,
        lora_u if lora_u is not None else dummy, *(lora_u.stride() if lora_u is not None else z[:2]),
        lora_b if lora_b is not None else dummy, *(lora_b.stride() if lora_b is not None else z),
        bias if bias is not None else dummy, *(bias.stride() if bias is not None else z[:2]),
        out, out.stride(0), out.stride(1),
        out_index if out_index is not None else dummy,
        row_scale if row_scale is not None else dummy,
        gu if gu is not None else dummy, *(gu.stride() if gu is not None else z[:2]),
        dw if dw is not None else dummy, dw.stride(0) if dw is not None else 0,
        N, K, rank, E, float(alpha), float(act[1]), float(act[2]),
        HAS_A_INDEX=a_index is not None, HAS_LORA=lora_u is not None, HAS_BIAS=bias is not None,
        HAS_OUT_INDEX=out_index is not None, HAS_ROW_SCALE=row_scale is not None,
        EPILOGUE=epilogue, ACT=act[0], INTERLEAVED=interleaved,
        LOG2_E=max(1, int(E).bit_length()),
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_R=_pow2_at_least(rank),
        **blocks,
    )
    if epilogue == 1:
        return out, gu
    if epilogue == 2:
        return out, dw.sum(0)
    return out
