"""Attention sinks applied to flex attention's output, forward and backward in one kernel each.

gpt-oss adds a learned logit per head (its "sink") to every softmax. Flex attention cannot express it, so
transformers renormalises flex's output with its log-sum-exp afterwards (integrations/flex_attention.py):

    lse_v    = lse.to(value.dtype)                                    lse: [B, H, T] fp32, from flex attention
    combined = logsumexp(cat([lse_v, sink]), -1)                      sink: [H], per head
    r        = exp(lse_v - combined)                                  the share of the softmax the keys keep
    y        = (out * r).to(query.dtype).transpose(1, 2).contiguous() out: [B, H, T, D] -> y: [B, T, H, D]

about a dozen launches forward (the cast, cat, logsumexp's amax / sub / exp / sum / log / add, sub, exp, mul, the
transposing copy), again in a checkpointed layer's recompute, and as many backward, two of them reading and writing
all of [B, H, T, D] twice. In a whole gpt-oss-20b step at 8K: ~14 ms of GPU time (NOTES, run 61g). Here one launch
each way: forward reads out and lse once and writes y transposed; backward reads dy and out once and writes d_out
(in out's layout), d_lse and per-block partial sums of d_sink.

Rounding, where torch rounds (V = value's dtype, C = the promotion of V and the sink's dtype, Q = out's dtype):
    lse_v = round_V(lse);  m = max(lse_v, sink) (0 where infinite)
    combined = round_C(round_C(log(round_C(round_C(exp(round_C(lse_v - m))) + round_C(exp(round_C(sink - m)))))) + m)
    r = round_C(exp(round_C(lse_v - combined)));  y = round_Q(out * r)   (promote(Q, C) is never narrower than Q)
Each value is computed in fp32 from the same rounded inputs as torch's; Triton's exp / log and torch's may differ in
the last fp32 bit, so an element can differ from torch's by one rounding (tests/kernels/test_attention_sinks.py).
Backward computes in fp32 from the forward's rounded r (autograd rounds its intermediate gradients to C as well;
those roundings are not reproduced):
    d_out  = round_Q(dy * r)
    g      = sum_D(dy * out) * r                                      the gradient of lse_v - combined
    w      = 1 / (1 + exp(lse_v - sink))                              the sink's share, 1 - exp(lse_v - combined)
    d_lse  = round_V(g * w)                                           fp32, as lse
    d_sink = -sum_{B, T} g * w                                        fp32 partial sums per block, summed by torch
w is computed from lse_v and the sink directly: 1 - r cancels where r is near 1, so much that in fp16 it loses d_lse
of rows whose sink is small to 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from .launch import launch as launch_kernel
from .sizes import cdiv

__all__ = ["SinksFunction", "apply_sinks", "check_inputs", "sinks_backward", "sinks_forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the rounding a kernel applies, as a constexpr
MAX_HEAD_DIM = 256
TILE_ELEMENTS = 4096  # tokens x head dims a program (BLOCK_T x BLOCK_D)


@triton.jit
def _round(v, code: tl.constexpr):
    """v rounded to the dtype `code` names (0 fp32, 1 fp16, 2 bf16), back in fp32."""
    if code == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif code == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _tile(lse_ptr, sink_ptr, s_lb, s_lh, s_lt, T, D, V: tl.constexpr, C: tl.constexpr, BLOCK_T: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """This program's tokens (BLOCK_T of head h in sequence b) and head dims, their masks, and per token lse_v, the
    sink and r, rounded as transformers' ops round them."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_mask = t < T
    mask = t_mask[:, None] & (d < D)[None, :]
    lse = _round(tl.load(lse_ptr + b * s_lb + h * s_lh + t * s_lt, mask=t_mask, other=0.0), V)
    sink = tl.load(sink_ptr + h).to(tl.float32)
    m = tl.maximum(lse, sink)
    m = tl.where(tl.abs(m) == float("inf"), 0.0, m)  # logsumexp's guard for infinite maxima
    total = _round(tl.exp(_round(lse - m, C)), C) + _round(tl.exp(_round(sink - m, C)), C)
    combined = _round(_round(tl.log(_round(total, C)), C) + m, C)
    r = _round(tl.exp(_round(lse - combined, C)), C)
    return pid_t, h, b, t, d, t_mask, mask, lse, sink, r


@triton.jit
def sinks_forward_kernel(out_ptr, s_ob, s_oh, s_ot, lse_ptr, s_lb, s_lh, s_lt, sink_ptr, y_ptr, s_yb, s_yt, s_yh,
                         T, D, V: tl.constexpr, C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    _, h, b, t, d, _, mask, _, _, r = _tile(lse_ptr, sink_ptr, s_lb, s_lh, s_lt, T, D, V, C, BLOCK_T, BLOCK_D)
    out = tl.load(out_ptr + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=mask, other=0.0)
    # out * r rounds to promote(out, r)'s dtype, then to out's: never narrower than out's, so once to out's dtype
    y = out.to(tl.float32) * r[:, None]
    tl.store(y_ptr + b * s_yb + t[:, None] * s_yt + h * s_yh + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sinks_backward_kernel(dy_ptr, s_gb, s_gt, s_gh, out_ptr, s_ob, s_oh, s_ot, lse_ptr, s_lb, s_lh, s_lt, sink_ptr,
                          d_out_ptr, s_db, s_dh, s_dt, d_lse_ptr, d_sink_ptr, T, D, H,
                          V: tl.constexpr, C: tl.constexpr, WANT_LSE: tl.constexpr, WANT_SINK: tl.constexpr,
                          SCALED_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t, h, b, t, d, t_mask, mask, lse, sink, r = _tile(lse_ptr, sink_ptr, s_lb, s_lh, s_lt, T, D, V, C, BLOCK_T,
                                                          BLOCK_D)
    dy = tl.load(dy_ptr + b * s_gb + t[:, None] * s_gt + h * s_gh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    d_out = dy * r[:, None]
    tl.store(d_out_ptr + b * s_db + h * s_dh + t[:, None] * s_dt + d[None, :],
             d_out.to(d_out_ptr.dtype.element_ty), mask=mask)
    if WANT_LSE or WANT_SINK:
        out = tl.load(out_ptr + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :], mask=mask, other=0.0)
        g = tl.sum(dy * out.to(tl.float32), axis=1)
        if not SCALED_OUT:  # out is attention's output before the sinks (else y = out * r, as saved by the caller)
            g = g * r
        g = tl.where(t_mask, g, 0.0)
        # the sink's share of the softmax, 1 - exp(lse_v - combined), without the cancellation where r is near 1
        w = 1.0 / (1.0 + tl.exp(lse - sink))
        if WANT_LSE:
            tl.store(d_lse_ptr + (b * H + h) * T + t, _round(g * w, V), mask=t_mask)
        if WANT_SINK:
            partial = -tl.sum(tl.where(t_mask, g * w, 0.0), axis=0)
            tl.store(d_sink_ptr + (b * tl.num_programs(0) + pid_t) * H + h, partial)


def _blocks(head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(head_dim, 16))
    return max(TILE_ELEMENTS // block_d, 16), block_d


def check_inputs(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None when they can)."""
    if out.dim() != 4 or lse.shape != out.shape[:3] or sinks.shape != (out.shape[1],):
        return f"out {list(out.shape)}, lse {list(lse.shape)}, sinks {list(sinks.shape)}: expected [B, H, T, D], " \
               "[B, H, T] and [H]"
    if out.dtype not in DTYPES or sinks.dtype not in DTYPES or lse.dtype != torch.float32:
        return f"out {out.dtype}, sinks {sinks.dtype}, lse {lse.dtype}: expected fp32 / fp16 / bf16 and an fp32 lse"
    if not (out.device == lse.device == sinks.device):
        return "out, lse and sinks must be on one device"
    if out.shape[-1] > MAX_HEAD_DIM or out.stride(-1) != 1:
        return f"head dim {out.shape[-1]} with stride {out.stride(-1)}: expected at most {MAX_HEAD_DIM}, contiguous"
    return None


def sinks_forward(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, codes: tuple[int, int]) -> torch.Tensor:
    """y [B, T, H, D] (contiguous) from out [B, H, T, D], lse [B, H, T] and the sinks, in one launch; codes: the
    roundings (V, C) of the module docstring (dtype_codes)."""
    B, H, T, D = out.shape
    y = torch.empty((B, T, H, D), dtype=out.dtype, device=out.device)
    block_t, block_d = _blocks(D)
    if y.numel():
        launch_kernel(sinks_forward_kernel, (cdiv(T, block_t), H, B), out, *out.stride()[:3], lse, *lse.stride(),
                      sinks, y, y.stride(0), y.stride(1), y.stride(2), T, D, V=codes[0], C=codes[1],
                      BLOCK_T=block_t, BLOCK_D=block_d)
    return y


def sinks_backward(dy: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor,
                   codes: tuple[int, int], want_lse: bool, want_sink: bool, scaled_out: bool = False):
    """(d_out, d_lse or None, d_sink or None) for dy [B, T, H, D], in one launch. out [B, H, T, D]: attention's
    output before the sinks, or with scaled_out the sinks' result y itself (viewed [B, H, T, D]; the lse gradient is
    then sum_D(dy * y) * w, the same value without the multiplication by r). d_out = dy * r comes in out's layout
    (dense): what the attention backward that follows reads."""
    B, H, T, D = out.shape
    V, C = codes
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    d_out = torch.empty_like(out)
    block_t, block_d = _blocks(D)
    d_lse = torch.empty((B, H, T), dtype=torch.float32, device=out.device) if want_lse else None
    n_blocks = cdiv(T, block_t)
    partial = torch.empty((B, n_blocks, H), dtype=torch.float32, device=out.device) if want_sink else None
    if out.numel():
        launch_kernel(sinks_backward_kernel, (n_blocks, H, B), dy, *dy.stride()[:3], out, *out.stride()[:3],
                      lse, *lse.stride(), sinks, d_out, *d_out.stride()[:3],
                      d_lse if want_lse else lse, partial if want_sink else lse, T, D, H,
                      V=V, C=C, WANT_LSE=want_lse, WANT_SINK=want_sink, SCALED_OUT=scaled_out,
                      BLOCK_T=block_t, BLOCK_D=block_d)
    d_sink = None
    if want_sink:
        d_sink = partial.sum((0, 1)) if out.numel() else torch.zeros(H, device=out.device)
        d_sink = d_sink.to(sinks.dtype)
    if want_lse and not out.numel():
        d_lse.zero_()
    return d_out, d_lse, d_sink


def dtype_codes(value_dtype: torch.dtype, sinks_dtype: torch.dtype) -> tuple[int, int]:
    """The roundings (V, C) transformers' ops apply: lse cast to value's dtype, then computed in the promotion of
    value's and the sinks' dtypes."""
    return _CODES[value_dtype], _CODES[torch.promote_types(value_dtype, sinks_dtype)]


class SinksFunction(torch.autograd.Function):
    """y [B, T, H, D] from flex attention's out [B, H, T, D] (any strides, the last dim contiguous), its lse [B, H,
    T] (fp32) and the sinks [H]; value_dtype: the dtype transformers casts lse to (value's). See the module
    docstring. Kept for backward: out, lse, sinks (flex attention's backward keeps out and lse itself)."""

    @staticmethod
    def forward(ctx, out, lse, sinks, value_dtype):
        ctx.codes = dtype_codes(value_dtype, sinks.dtype)
        y = sinks_forward(out, lse, sinks, ctx.codes)
        saved_tensors.save(ctx, out, lse, sinks)  # a frozen sink parameter rides on ctx (no hook calls)
        return y

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True) raises instead of silently losing its graph
    def backward(ctx, dy):
        out, lse, sinks = saved_tensors.load(ctx)
        d_out, d_lse, d_sink = sinks_backward(dy, out, lse, sinks, ctx.codes, ctx.needs_input_grad[1],
                                              ctx.needs_input_grad[2])
        return d_out, d_lse, d_sink, None


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """transformers' sink renormalisation of flex attention's output, transposed to [B, T, H, D], in one launch
    (and one for its gradients). CUDA, or CPU under TRITON_INTERPRET=1 (fp32/fp16)."""
    problem = check_inputs(out, lse, sinks)
    if problem is None and value_dtype not in DTYPES:
        problem = f"value_dtype {value_dtype}: expected fp32, fp16 or bf16"
    if problem is not None:
        raise ValueError(f"apply_sinks: {problem}")
    return SinksFunction.apply(out, lse, sinks, value_dtype)
