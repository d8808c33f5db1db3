"""`grouped_mm`: torch's grouped GEMM over expert-sorted rows, with a custom autograd Function.

Shape legend: T tokens, K top-k, E experts, H hidden, I expert width, R rank, S = T*K rows.

Forward, per sorted row (s = LoRA scaling):
    x_SH   = x[token]                                     gather (freed before the down GEMM)
    gu_S2I = gmm(x_SH, W1^T) + gmm(s * x_SH A1^T, B1^T) (+ b1)
    h_SI   = act(gu_S2I)
    y_SH   = gmm(h_SI, W2^T) + gmm(s * h_SI A2^T, B2^T) (+ b2)
    out_TH = sum_j w[t, j] * y(t, j)                       deterministic (no atomics)

Saved for backward: gu_S2I (the only [S, .] activation) and the two [S, R] LoRA inputs.
Recomputed in backward: x_SH (a gather, only when gate_up has LoRA) and h_SI (elementwise).
Not saved: y_SH. The routing-weight gradient <y, d_out> is rewritten as <h, g> with
g = W2^T d_out + s A2^T B2^T d_out, which backward computes anyway (g * w is d_h).

Backward never computes a frozen-base weight gradient: W1, W2 (and biases) only appear
as the B operand of dgrad GEMMs. LoRA gradients are K-grouped GEMMs (2-D x 2-D with offsets).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ... import saved_tensors
from ..lora import cast_factors, grads_in, refuse_create_graph
from ..routing import RoutingPlan

_STRIDE_BYTES = 16  # grouped_mm needs 16-byte aligned leading strides on every operand and output

_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(n: int, elem_size: int) -> int:
    multiple = _STRIDE_BYTES // elem_size
    return -(-n // multiple) * multiple


def _dense_layout_ok(b: torch.Tensor) -> bool:
    """b [E, K, N] row-major or column-major per matrix, 16-byte aligned leading dimension."""
    es = b.element_size()
    if b.stride(2) == 1:
        return (b.stride(1) * es) % _STRIDE_BYTES == 0
    if b.stride(1) == 1:
        return (b.stride(2) * es) % _STRIDE_BYTES == 0
    return False


def _aligned_ptr(t: torch.Tensor) -> torch.Tensor:
    """grouped_mm also wants 16-byte aligned base pointers (torch <= 2.10 checks it on CPU);
    views into memory-mapped safetensors can be off. A fresh copy is aligned."""
    return t if t.data_ptr() % _STRIDE_BYTES == 0 else t.contiguous().clone()


def gmm(a_SK: torch.Tensor, b_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Row-grouped product: rows of group e of a [S, K] times b[e] [K, N] -> [S, N].

    Pads K or N with zeros where grouped_mm's stride alignment needs it (odd H, I or rank).
    Real model shapes are aligned and take the direct path with no copy.
    """
    num_k, num_n = a_SK.shape[1], b_EKN.shape[2]
    es = a_SK.element_size()
    k_pad, n_pad = _aligned(num_k, es) - num_k, _aligned(num_n, es) - num_n
    if k_pad or n_pad:
        a_SK = F.pad(a_SK, (0, k_pad))
        b_EKN = F.pad(b_EKN, (0, n_pad, 0, k_pad))
    elif not _dense_layout_ok(b_EKN):
        b_EKN = b_EKN.contiguous()
    if a_SK.stride(1) != 1:
        a_SK = a_SK.contiguous()
    out = _grouped_mm_op(_aligned_ptr(a_SK), _aligned_ptr(b_EKN), offs=offsets_E)
    return out[:, :num_n] if n_pad else out


def gmm_wgrad(a_SM: torch.Tensor, b_SN: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """K-grouped product: for each expert e, a[rows_e]^T b[rows_e] -> [E, M, N] (zero for empty experts)."""
    num_m, num_n = a_SM.shape[1], b_SN.shape[1]
    es = a_SM.element_size()
    m_pad, n_pad = _aligned(num_m, es) - num_m, _aligned(num_n, es) - num_n
    if m_pad or a_SM.stride(1) != 1:
        a_SM = F.pad(a_SM, (0, m_pad)) if m_pad else a_SM.contiguous()
    if n_pad or b_SN.stride(1) != 1:
        b_SN = F.pad(b_SN, (0, n_pad)) if n_pad else b_SN.contiguous()
    out = _grouped_mm_op(_aligned_ptr(a_SM).t(), _aligned_ptr(b_SN), offs=plan.offsets_E)
    # Empty groups are not written by every grouped_mm kernel (seen on Blackwell and ROCm).
    out = out.masked_fill((plan.counts_E == 0).view(-1, 1, 1), 0)
    return out[:, :num_m, :num_n] if (m_pad or n_pad) else out


@functools.lru_cache(maxsize=None)
def probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> str | None:
    """None if grouped_mm runs on this device and dtype, else the reason it does not."""
    if _grouped_mm_op is None:
        return f"torch {torch.__version__} has no grouped_mm (needs torch >= 2.9)"
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "torch's grouped_mm needs a CUDA GPU of compute capability 8.0 or newer"
    try:
        a = torch.ones(4, 16, dtype=dtype, device=device)
        b = torch.ones(2, 16, 8, dtype=dtype, device=device)
        out = _grouped_mm_op(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=device))
        if not torch.all(out == 16):
            return f"grouped_mm gave a wrong result for {dtype} on {device}"
    except (RuntimeError, NotImplementedError) as err:
        return f"grouped_mm does not run for {dtype} on {device}: {str(err).splitlines()[0]}"
    return None


class GroupedExpertsFunction(torch.autograd.Function):
    """One MoE experts block with split LoRA. See the module docstring for what is saved."""

    @staticmethod
    def forward(ctx, x, topk_weights, gate_up, down, gate_up_bias, down_bias, A1, B1, A2, B2, plan, scaling, act,
                interleaved, only_for_backward=False):
        dtype = x.dtype
        (A1, B1, A2, B2), ctx.factor_dtypes = cast_factors((A1, B1, A2, B2), dtype)
        offs = plan.offsets_E

        x_SH = plan.gather_rows(x)
        gu = gmm(x_SH, gate_up.transpose(1, 2), offs)
        su1 = None
        if A1 is not None:
            su1 = gmm(x_SH, A1.transpose(1, 2), offs).mul_(scaling)
            gu.add_(gmm(su1, B1.transpose(1, 2), offs))
        del x_SH
        if gate_up_bias is not None:
            gu.add_(gate_up_bias.index_select(0, plan.expert_S))
        # h feeds the down projection and its LoRA input su2; a recompute (only_for_backward) needs only su2.
        h = act.forward(gu, interleaved) if A2 is not None or not only_for_backward else None
        su2 = None
        if A2 is not None:
            su2 = gmm(h, A2.transpose(1, 2), offs).mul_(scaling)
        saved_tensors.save(ctx, x, topk_weights, gate_up, down, down_bias, A1, B1, A2, B2, gu, su1, su2, plan.buffer)
        ctx.plan_layout, ctx.scaling, ctx.act, ctx.interleaved = plan.layout, scaling, act, interleaved
        if only_for_backward:  # a recompute: backward needs only what is saved above
            return x.new_zeros(x.shape)

        y = gmm(h, down.transpose(1, 2), offs)
        if A2 is not None:
            y.add_(gmm(su2, B2.transpose(1, 2), offs))
        del h
        if down_bias is not None:
            y.add_(down_bias.index_select(0, plan.expert_S))
        return plan.sum_rows(y, topk_weights)

    @staticmethod
    def backward(ctx, d_out):
        refuse_create_graph("grouped_mm")
        x, topk_weights, gate_up, down, down_bias, A1, B1, A2, B2, gu, su1, su2, plan_buffer = saved_tensors.load(ctx)
        plan, s, act, interleaved = ctx.plan_layout.plan(plan_buffer), ctx.scaling, ctx.act, ctx.interleaved
        need = ctx.needs_input_grad
        offs = plan.offsets_E
        d_out = d_out.to(x.dtype)
        w_S1 = topk_weights.reshape(-1).index_select(0, plan.perm_S).to(x.dtype).unsqueeze(1)
        dA1 = dB1 = dA2 = dB2 = d_weights = d_x = None

        # Down projection, with the UNweighted output gradient of each row: g = dh / w.
        dout_SH = plan.gather_rows(d_out)
        g = gmm(dout_SH, down, offs)
        if A2 is not None:
            sv2 = gmm(dout_SH, B2, offs).mul_(s)
            g.add_(gmm(sv2, A2, offs))
        h = act.forward(gu, interleaved)
        if need[1]:
            dots_S = torch.sum(h * g, dim=-1, dtype=torch.float32)
            d_weights = plan.routing_weight_grad(dots_S, d_out, down_bias, topk_weights.dtype)
        if A2 is not None:
            if need[9]:
                dB2 = gmm_wgrad(dout_SH, su2 * w_S1, plan)
            if need[8]:
                dA2 = gmm_wgrad(sv2 * w_S1, h, plan)
        del dout_SH, h

        # Gate/up projection.
        d_gu = act.backward(gu, g.mul_(w_S1), interleaved)
        del g
        if need[0]:
            dx_SH = gmm(d_gu, gate_up, offs)
        if A1 is not None:
            sv1 = gmm(d_gu, B1, offs).mul_(s)
            if need[0]:
                dx_SH.add_(gmm(sv1, A1, offs))
            if need[7]:
                dB1 = gmm_wgrad(d_gu, su1, plan)
            if need[6]:
                dA1 = gmm_wgrad(sv1, plan.gather_rows(x), plan)
        if need[0]:
            d_x = plan.sum_rows(dx_SH)

        lora_grads = grads_in((dA1, dB1, dA2, dB2), ctx.factor_dtypes)
        return (d_x, d_weights, None, None, None, None, *lora_grads, None, None, None, None, None)

