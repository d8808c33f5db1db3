"""Causal attention with gpt-oss's sinks on torch's fused attention kernel (cuDNN), the sinks applied after it.

gpt-oss runs flex attention because sdpa has no sinks; its full-attention layers (half of them; the others slide a
128-token window, where flex's block sparsity pays) are plain causal attention at head dim 64, where flex attention's
compiled kernels are slower than cuDNN's (run 62: flex ~110 ms of a 476 ms whole gpt-oss-20b step at 8K on an H100).
The sinks need only attention's output o and its log-sum-exp, which torch's fused kernels return too:

    y = r * o,  r = sigmoid(lse - sink)          per query row and head (attention_sinks.py, rounded as transformers)

Backward, without an lse gradient into the fused kernel (torch's backward ops take none): with P' the softmax that
includes the sink (P' = r P, the sink's own column has no value), the true score gradient is
dS = r P (dy . v - dy . y). Attention's standard backward, given out = y and grad_out = r * dy, computes
P (r dy . v - rowsum(r dy * y)) = the same, and dV = P^T (r dy) = P'^T dy. So the backward is the sink kernel
(d_out = r * dy and d_sink = -sum_T (1 - r) sum_D dy * y, one launch) and then the fused kernel's own backward with
(y, r * dy, lse): exact, nothing recomputed, and o is never kept (y, the layer's output, is).

Backends: CUDA: aten._scaled_dot_product_cudnn_attention and its backward (key/value heads shared natively).
CPU: aten._scaled_dot_product_flash_attention_for_cpu and its backward: the same contract, so the tests check this
module end to end in Triton's interpreter. These are torch's private ops, so `probe` checks the whole path once per
device and dtype against a float32 reference, and a caller falls back where it fails (moetune/models/fast_sinks.py).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from .attention_sinks import DTYPES, dtype_codes, sinks_backward, sinks_forward

__all__ = ["CausalSinkAttention", "causal_sink_attention", "enabled", "probe", "reference", "supports"]

HEAD_DIMS = range(8, 129, 8)  # what cuDNN's fused attention takes on every GPU it runs on (gpt-oss: 64)
# cuDNN's backward refuses one query over one key ("s_q = s_kv = 1 is not supported", run 63a on an H100) although
# its forward runs; torch's flash attention for CPU takes it.
MIN_TOKENS = {"cuda": 2, "cpu": 1}


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors (host-side checks, no sync): 4-D, one batch size, dtype and
    device, as many keys as queries, at least MIN_TOKENS of them, one head dim of HEAD_DIMS, key/value heads that
    divide the query heads. Whether the dtype works on the device is probe's answer."""
    if not (q.dim() == k.dim() == v.dim() == 4 and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return False
    tokens = q.shape[2]
    return (
        q.device.type in MIN_TOKENS
        and q.shape[0] == k.shape[0] == v.shape[0]
        and tokens == k.shape[2] == v.shape[2]
        and tokens >= MIN_TOKENS[q.device.type]
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.shape[-1] in HEAD_DIMS
        and k.shape[1] == v.shape[1]
        and q.shape[1] % k.shape[1] == 0
    )


def _cudnn_forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)


def _cudnn_backward(d_out, q, k, v, out, lse, scale, state):
    seed, offset, cum_q, cum_k, max_q, max_k = state
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        d_out, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)


def _cpu_forward(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _cpu_backward(d_out, q, k, v, out, lse, scale, state):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(d_out, q, k, v, out, lse, 0.0, True,
                                                                              scale=scale)


_OPS = {"cuda": (_cudnn_forward, _cudnn_backward), "cpu": (_cpu_forward, _cpu_backward)}
# torch's SDPA backend flags for the op above on each device (on CPU flash attention for CPU, the tests' stand-in)
_BACKEND_FLAGS = {"cuda": torch.backends.cuda.cudnn_sdp_enabled, "cpu": torch.backends.cuda.flash_sdp_enabled}


def enabled(device_type: str) -> bool:
    """Whether torch lets this module's op run now (flag reads, no sync): not in deterministic mode (torch refuses
    cuDNN attention there), and not turned off by the user (torch.backends.cuda.enable_cudnn_sdp(False), or an
    sdpa_kernel context without that backend: the usual way out where cuDNN attention misbehaves)."""
    flag = _BACKEND_FLAGS.get(device_type)
    return flag is not None and flag() and not torch.are_deterministic_algorithms_enabled()


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D] over [B, T, H, D] memory (transformers' projections give that; a copy only where not): the fused
    kernels lay their output out like the query, and the backward reads out and grad_out in that layout, which is
    the sink kernel's y, transposed."""
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


class CausalSinkAttention(torch.autograd.Function):
    """(y [B, T, H, D], lse [B, H, T]) of causal attention over q [B, H, T, D], k / v [B, KV, T, D] with the sinks
    [H]; value_dtype: the dtype transformers rounds the lse to (value's). See the module docstring. Kept for backward:
    q, k, v, y (the output), lse, the sinks. The lse is returned without a gradient (transformers returns it as the
    attention weights, which training does not use; its flex path would differentiate it)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, value_dtype):
        forward, _ = _OPS[q.device.type]
        q, k, v = _rows_major(q), _rows_major(k), _rows_major(v)
        out, lse_kernel, state = forward(q, k, v, scale)
        lse = lse_kernel.view(lse_kernel.shape[:3])  # cuDNN returns [B, H, T, 1]
        ctx.codes = dtype_codes(value_dtype, sinks.dtype)
        y = sinks_forward(out, lse, sinks, ctx.codes)
        saved_tensors.save(ctx, q, k, v, y, lse_kernel, sinks)
        ctx.scale, ctx.state = scale, state
        ctx.mark_non_differentiable(lse)
        return y, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _):
        q, k, v, y, lse_kernel, sinks = saved_tensors.load(ctx)
        _, backward = _OPS[q.device.type]
        y_heads = y.transpose(1, 2)
        # d_out comes in y's layout: the fused backward reads out and grad_out in the one layout
        d_out, _, d_sink = sinks_backward(dy, y_heads, lse_kernel.view(lse_kernel.shape[:3]), sinks, ctx.codes,
                                          want_lse=False, want_sink=ctx.needs_input_grad[3], scaled_out=True)
        if y.numel():
            dq, dk, dv = backward(d_out, q, k, v, y_heads, lse_kernel, ctx.scale, ctx.state)
        else:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return dq, dk, dv, d_sink, None, None


def causal_sink_attention(q, k, v, sinks, scale: float, value_dtype: torch.dtype):
    """(y [B, T, H, D], lse [B, H, T]): transformers' gpt-oss attention with sinks for a plain causal mask, on
    torch's fused attention kernel. CUDA, or CPU with the sink kernels in Triton's interpreter. Shapes as `supports`
    takes them (a ValueError otherwise, rather than a refusal deep in the backward)."""
    if not supports(q, k, v):
        raise ValueError(f"causal_sink_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} on "
                         f"{q.device.type}: expected CUDA or CPU tensors [B, H, T, D] / [B, KV, T, D] of one dtype "
                         f"and device with KV dividing H, D in 8..128 step 8 and T >= "
                         f"{MIN_TOKENS.get(q.device.type, 1)}")
    return CausalSinkAttention.apply(q, k, v, sinks, scale, value_dtype)


def reference(q, k, v, sinks, scale: float) -> torch.Tensor:
    """y [B, T, H, D] in q's dtype, computed in float32 as eager attention with the sink as one more softmax column
    (transformers' eager_attention_forward for gpt-oss)."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    scores = torch.cat([scores, sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)], -1)
    probs = torch.softmax(scores, -1)[..., :-1]
    return (probs @ v).to(q.dtype).transpose(1, 2)


_TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


# torch's own SDPA dispatch checks these before it picks cuDNN; calling the op directly skips the checks.
_FUSED_DTYPES = {"cuda": (torch.float16, torch.bfloat16), "cpu": DTYPES}  # cuDNN computes in fp16 / bf16 only


@functools.cache
def probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> str | None:
    """Why causal_sink_attention cannot serve this device and dtype (None when it can): torch's private fused
    attention ops may be missing, refuse the call or differ across versions, so a small problem (grouped key/value
    heads, a length off every tile) runs forward and backward against `reference` once. Warns once on failure."""
    if dtype not in _FUSED_DTYPES.get(device_type, ()):
        return f"{device_type} / {dtype}: no fused attention with a log-sum-exp here"
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    B, H, KV, T, D = 1, 4, 2, 77, 64
    try:
        # The first call comes from inside a model's forward: maybe under no_grad, inference_mode or autocast, or in
        # a checkpointed layer whose saved-tensor hooks would take this check's saved tensors (identity hooks on top
        # win; without them the check's backward recomputes the layer).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            gen = torch.Generator(device=device).manual_seed(0)

            def rand(*shape):
                return torch.randn(*shape, device=device, generator=gen).to(dtype)

            q, k, v = (rand(B, T, n, D).transpose(1, 2).requires_grad_() for n in (H, KV, KV))
            sinks, dy = rand(H).requires_grad_(), rand(B, T, H, D)
            y, _ = causal_sink_attention(q, k, v, sinks, D**-0.5, dtype)
            got = torch.autograd.grad(y, (q, k, v, sinks), dy)
            expected_y = reference(q, k, v, sinks, D**-0.5)
            expected = torch.autograd.grad(expected_y, (q, k, v, sinks), dy)
            problem = None
            for name, a, b in zip(("y", "dq", "dk", "dv", "d_sink"), (y, *got), (expected_y, *expected)):
                error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                if not error < _TOLERANCE[dtype]:
                    problem = f"{name} differs from the reference by {error:.2e} (relative)"
                    break
    except Exception as error:  # noqa: BLE001 - any failure of a private op means: not here
        problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    if problem is not None:
        warnings.warn(f"moetune: gpt-oss's causal attention with sinks stays on flex attention on {device_type} "
                      f"({dtype}): the fused attention check failed ({problem})", stacklevel=2)
    return problem
