"""`triton`: moetune's fused kernels (moetune/kernels) behind one autograd Function.

Shape legend: T tokens, K top-k, E experts, H hidden, I expert width, R rank, S = T*K rows.

Forward (2 to 4 launches + a sum over k):
    su1    = s * x[token] A1^T                      gather fused (or in the next launch's main loop)  [S, R]
    gu, h  = x[token] W1^T + su1 B1^T (+ b1); act    LoRA, bias, activation in epilogue   [S, 2I], [S, I]
    su2    = s * h A2^T                             (or in the next launch's main loop)               [S, R]
    y_pair = w * (h W2^T + su2 B2^T (+ b2))          rows stored in (token, slot) order    [S, H]
    out    = sum over k of y_pair.view(T, K, H)      one launch (kernels/sum_over_k.py); deterministic, no atomics

Saved: gu [S, 2I], su1, su2 [S, R] (as the grouped_mm backend). h is never stored for
backward; the down-projection backward recomputes it in its epilogue from gu.
only_for_backward (a checkpoint's recompute): stops after su2, everything backward reads; the down
projection and the sum over k (a quarter of the forward's GEMM work at Qwen3's shape) are skipped.

Backward:
    sv2         = s * d_out[token] B2                 (or in the next launch's main loop)           [S, R]
    d_gu, dots  = act'(gu) * w * (d_out[token] W2 + sv2 A2); dots = <act(gu), g>          fused epilogue
    dB2, dA2    = K-grouped sums (d_out[token] x w*su2), (sv2 x w*act(gu))                 gather / act on load
    sv1         = s * d_gu B1                         (or, if dx is needed, in the next launch's main loop)
    dx_pair     = d_gu W1 + sv1 A1                    rows stored in (token, slot) order
    dx          = sum over k of dx_pair.view(T, K, H)
    dB1, dA1    = (d_gu x su1), (sv1 x x[token])
No base-weight gradient is computed.

With WGRAD_SIDE_STREAM, on a GPU the four LoRA weight gradients (bandwidth-bound reductions, ~0.5 ms at Qwen3 16K)
run on a second stream (side_stream.py), beside the compute-bound dx GEMM and the sum over k on the block's own
stream; they are allocated and tuned on the block's stream first, and the two streams join before backward returns.

The LoRA inputs su1, su2, sv2, sv1 are read by the next GEMM only: grouped_gemm's lora_u_weight may accumulate each
in that GEMM's main loop, from the A tiles it loads anyway, instead of a launch of its own (one pass over x or d_out
gathered, h or d_gu, fewer; R more columns of MMA). Which way is faster depends on the launch and shape (run 48), so
grouped_gemm measures both once per shape and GPU, as it tunes its configs.
"""

from __future__ import annotations

import functools
import os

import torch
from packaging.version import Version

from ... import saved_tensors
from ..lora import cast_factors, grads_in, refuse_create_graph
from . import side_stream

# The sums over k by moetune's kernel (False: torch's `sum(dim=1)`; `switch_ab.py --switch sum` times both). Both
# sum in fp32 and round once, the kernel in slot order; torch's reduction read [T, 4, H] bf16 at ~2.2 TB/s on an
# H100 (run 57e).
SUM_KERNEL = True

# MOETUNE_WGRAD_SIDE_STREAM=1: the LoRA weight gradients on a second stream, beside the dx GEMM (off: all on the
# block's stream; the same kernels in the same order on their stream, so the same bits). Off by default: it measured
# no faster on an H100 (run 91, `switch_ab.py --switch wgrad_stream`, 7 alternating rounds: Qwen3 16K median 7.68
# ms both ways, GLM 16K 7.17 against 7.05), nor with those launches issued after the dx GEMM (run 91b).
WGRAD_SIDE_STREAM = os.environ.get("MOETUNE_WGRAD_SIDE_STREAM", "0") == "1"


@functools.lru_cache(maxsize=None)
def probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> str | None:
    """None if the Triton kernels can run on this device and dtype, else why not."""
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install triton; Linux only)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cpu":
        if not interpreted:
            return "Triton runs on CPU only through its interpreter (TRITON_INTERPRET=1), meant for tests"
        # Seen 2026-11: the 3.5 and 3.6 interpreters fail on scalar kernel arguments with numpy 2.4.
        if Version(triton.__version__).release < (3, 9):
            return f"the Triton {triton.__version__} interpreter cannot run these kernels; it needs triton >= 3.9"
        if dtype not in (torch.float32, torch.float16):
            return f"the Triton interpreter is unreliable for {dtype}; use float32 or float16"
        return None
    if device_type != "cuda":
        return f"no Triton kernels for {device_type}"
    device = torch.device(device_type, device_index)
    if torch.cuda.get_device_capability(device) < (7, 5):
        return "moetune's Triton kernels need a GPU of compute capability 7.5 (T4) or newer"
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return "bfloat16 needs compute capability 8.0 or newer; use float16 on this GPU"
    return None


class TritonExpertsFunction(torch.autograd.Function):
    """One MoE experts block with split LoRA on the fused Triton kernels. See the module docstring."""

    @staticmethod
    def forward(ctx, x, topk_weights, gate_up, down, gate_up_bias, down_bias, A1, B1, A2, B2, plan, scaling, act,
                interleaved, only_for_backward=False):
        from ...kernels import act_code, grouped_gemm

        x = x.contiguous()
        dtype = x.dtype
        # What only the down projection reads (its factors' casts, the routing weights in sorted order) is made after
        # the gate_up launch: a step starts on a GPU waiting for its host's first large launch (run 55c).
        (A1, B1), first_dtypes = cast_factors((A1, B1), dtype)
        code = act_code(act)
        S, T, K = plan.num_rows, plan.num_tokens, plan.top_k
        common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)

        su1, lora1 = None, {}
        if A1 is not None:
            su1, lora1 = _lora_input(x, A1.transpose(1, 2), B1.transpose(1, 2), scaling, True, common,
                                     a_index=plan.token_S)
        h, gu = grouped_gemm(
            x, gate_up.transpose(1, 2), a_index=plan.token_S, bias=gate_up_bias,
            epilogue=1, act=code, interleaved=interleaved, **lora1, **common,
        )
        (A2, B2), down_dtypes = cast_factors((A2, B2), dtype)
        ctx.factor_dtypes = first_dtypes + down_dtypes
        w_S = topk_weights.reshape(-1).index_select(0, plan.perm_S).to(dtype)
        su2, lora2 = None, {}
        # A recompute has no down projection to fold su2 into: its own launch there (from MIN_TUNE_ROWS rows, tuned
        # apart, its K sums may round differently in the last bit from the loop's, so a checkpointed layer's dB2 can
        # differ from an unchecked one's by that much).
        if A2 is not None:
            su2, lora2 = _lora_input(h, A2.transpose(1, 2), B2.transpose(1, 2), scaling, not only_for_backward,
                                     common)
        # (su2 may be filled by the down projection's launch below, before backward reads it)
        saved_tensors.save(ctx, x, topk_weights, gate_up, down, down_bias, A1, B1, A2, B2, gu, su1, su2, w_S,
                           plan.buffer)
        ctx.plan_layout, ctx.scaling, ctx.code, ctx.interleaved = plan.layout, scaling, code, interleaved
        if only_for_backward:  # a recompute: backward needs only what is saved above
            return x.new_zeros(x.shape)

        y_pairs = grouped_gemm(
            h, down.transpose(1, 2), bias=down_bias, out_index=plan.perm_S, row_scale=w_S, **lora2, **common,
        )
        del h
        return _sum_over_k(y_pairs.view(T, K, -1))

    @staticmethod
    def backward(ctx, d_out):
        refuse_create_graph("triton")
        from ...kernels import grouped_gemm
        from ...kernels.grouped_wgrad import wgrad_launch

        x, topk_weights, gate_up, down, down_bias, A1, B1, A2, B2, gu, su1, su2, w_S, plan_buffer = \
            saved_tensors.load(ctx)
        plan, s, code, interleaved = ctx.plan_layout.plan(plan_buffer), ctx.scaling, ctx.code, ctx.interleaved
        need = ctx.needs_input_grad
        S, T, K = plan.num_rows, plan.num_tokens, plan.top_k
        common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
        d_out = d_out.to(x.dtype).contiguous()
        d_weights = d_x = None

        sv2, lora2 = None, {}
        if A2 is not None:
            sv2, lora2 = _lora_input(d_out, B2, A2, s, True, common, a_index=plan.token_S)
        d_gu, dots_S = grouped_gemm(
            d_out, down, a_index=plan.token_S, gu=gu, row_scale=w_S,
            epilogue=2, act=code, interleaved=interleaved, **lora2, **common,
        )
        # The LoRA weight gradients that read only what exists now (su2 and su1 from forward, sv2 written by the last
        # launch): allocated, scheduled and tuned on this stream (wgrad_launch), then launched, on the side stream
        # if it is on.
        first = {}
        if A2 is not None:
            if need[9]:
                first["dB2"] = wgrad_launch(d_out, su2, a_index=plan.token_S, scale=w_S, **common)
            if need[8]:
                first["dA2"] = wgrad_launch(sv2, gu, b_act=code, interleaved=interleaved, scale=w_S, **common)
        if A1 is not None and need[7]:
            first["dB1"] = wgrad_launch(d_gu, su1, **common)
        grads = {}  # (the launch functions keep their partials' slabs until backward returns, after the join)
        side = side_stream.SideStream(d_out, enabled=WGRAD_SIDE_STREAM)
        try:  # joined even if a launch fails: nothing freed below may still be read on the side stream
            with side.work():
                grads.update((name, launch()) for name, launch in first.items())
            if need[1]:
                d_weights = plan.routing_weight_grad(dots_S, d_out, down_bias, topk_weights.dtype)
            sv1, lora1 = None, {}
            if A1 is not None:  # in the dgrad's main loop only if there is a dgrad (dA1 reads sv1 either way)
                sv1, lora1 = _lora_input(d_gu, B1, A1, s, need[0], common)
            if need[0]:
                dx_pairs = grouped_gemm(d_gu, gate_up, out_index=plan.perm_S, **lora1, **common)
            if A1 is not None and need[6]:
                dA1_launch = wgrad_launch(sv1, x, b_index=plan.token_S, **common)
                with side.work():  # after the dx GEMM, which writes sv1 from its main loop
                    grads["dA1"] = dA1_launch()
            if need[0]:
                d_x = _sum_over_k(dx_pairs.view(T, K, -1))
        finally:
            side.join()
        dA1, dB1, dA2, dB2 = (grads.get(name) for name in ("dA1", "dB1", "dA2", "dB2"))

        lora_grads = grads_in((dA1, dB1, dA2, dB2), ctx.factor_dtypes)
        return (d_x, d_weights, None, None, None, None, *lora_grads, None, None, None, None, None)


def _sum_over_k(y_TKH: torch.Tensor) -> torch.Tensor:
    if not SUM_KERNEL:
        return y_TKH.sum(dim=1)
    from ...kernels.sum_over_k import sum_over_k

    return sum_over_k(y_TKH)


def _lora_input(a, weight, lora_b, scaling, foldable: bool, common: dict, a_index=None):
    """(u, grouped_gemm's arguments that apply it) for u = scaling * a[a_index] @ weight [S, R]: computed by a launch
    of its own, or (foldable: a GEMM over the same rows of a reads it) left to that GEMM's launch, which writes it
    into u, from its main loop or a launch of its own, whichever measured faster."""
    from ...kernels import grouped_gemm

    if foldable:
        u = a.new_empty(common["num_rows"], weight.shape[2])
        return u, dict(lora_u_weight=weight, lora_u_alpha=scaling, lora_u_out=u, lora_b=lora_b)
    u = grouped_gemm(a, weight, a_index=a_index, alpha=scaling, **common)
    return u, dict(lora_u=u, lora_b=lora_b)
