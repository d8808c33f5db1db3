"""Causal attention with sinks on torch's fused attention (moetune/kernels/causal_sink_attention.py) against a float64
reference: eager attention with the sink as one more softmax column, forward and backward (q, k, v, the sinks).

On CPU: torch's flash attention for CPU with the sink kernels in Triton's interpreter (fp32 / fp16); on a GPU:
cuDNN (bf16 too).
"""

from __future__ import annotations

import pytest
import torch

from ..models.helpers import DEVICE, needs_triton, relative_error

pytestmark = needs_triton
# cuDNN computes in fp16 / bf16 only; torch's flash attention for CPU takes fp32 and fp16 (bf16 is unreliable in
# Triton's interpreter).
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
DTYPE = DTYPES[-1] if DEVICE == "cuda" else torch.float32  # for the tests of one dtype
# (B, H, KV, T, D): a length that is no multiple of any tile, shared key/value heads, one key/value head, as many as
# the queries; on CPU one token (cuDNN's backward refuses it: test_shapes_the_fused_kernels_cannot_take_...); on a
# GPU gpt-oss-20b's heads (64 / 8, D 64) over 1K tokens (cuDNN plans per shape).
SHAPES = [(2, 4, 2, 77, 64), (1, 8, 1, 130, 32), (1, 2, 2, 40, 64)]
SHAPES += [(1, 64, 8, 1024, 64)] if DEVICE == "cuda" else [(1, 4, 2, 1, 16)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference64(q, k, v, sinks, scale):
    """y [B, T, H, D] and lse [B, H, T] in float64 (the lse over the keys alone, as attention returns it)."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(torch.cat([scores, sinks.double().view(1, H, 1, 1).expand(B, H, T, 1)], -1), -1)
    return (probs[..., :-1] @ v).transpose(1, 2), lse


def make(shape, dtype, seed=0, rows_major=True):
    B, H, KV, T, D = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, scale=1.0):
        t = torch.randn(B, T, heads, D, generator=gen) * scale
        t = t.transpose(1, 2) if rows_major else t.transpose(1, 2).contiguous()  # transformers' projections: rows
        return t.to(device=DEVICE, dtype=dtype).requires_grad_()

    q, k, v = rand(H, 2.0), rand(KV), rand(KV)
    sinks = (torch.randn(H, generator=gen) * 2).to(device=DEVICE, dtype=dtype).requires_grad_()
    dy = torch.randn(B, T, H, D, generator=gen).to(device=DEVICE, dtype=dtype)
    return q, k, v, sinks, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype):
    from moetune.kernels.causal_sink_attention import causal_sink_attention

    q, k, v, sinks, dy = make(shape, dtype)
    scale = shape[-1] ** -0.5
    y, lse = causal_sink_attention(q, k, v, sinks, scale, dtype)
    expected_y, expected_lse = reference64(q, k, v, sinks, scale)
    assert y.shape == expected_y.shape and y.dtype == dtype and y.is_contiguous()  # [B, T, H, D] as transformers'
    assert relative_error(y.double(), expected_y) < TOLERANCE[dtype]
    assert relative_error(lse.double(), expected_lse) < TOLERANCE[dtype] and not lse.requires_grad
    got = torch.autograd.grad(y, (q, k, v, sinks), dy)
    expected = torch.autograd.grad(expected_y, (q, k, v, sinks), dy.double())
    for name, a, b in zip(("q", "k", "v", "sinks"), got, expected):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert relative_error(a.double(), b) < 4 * TOLERANCE[dtype], name


def test_shapes_the_fused_kernels_cannot_take_are_refused_in_one_line_before_the_call():
    from moetune.kernels.causal_sink_attention import MIN_TOKENS, causal_sink_attention, supports

    q, k, v, sinks, _ = make((1, 4, 2, 8, 16), DTYPE)
    assert supports(q, k, v)
    one = make((1, 4, 2, 1, 16), DTYPE)
    cases = {"head dim 12": make((1, 4, 2, 8, 12), DTYPE)[:3], "3 heads over 2": (q[:, :3], k, v),
             "more keys than queries": (q[:, :, :4], k, v), "no tokens": (q[:, :, :0], k[:, :, :0], v[:, :, :0]),
             "two batches over one": (torch.cat((q, q)), k, v), "3-D": (q[0], k[0], v[0]),
             "key of another dtype": (q, k.double(), v)}
    if MIN_TOKENS[DEVICE] > 1:  # cuDNN: one query over one key
        cases["one token"] = one[:3]
    else:
        assert supports(*one[:3])
    for name, (q_, k_, v_) in cases.items():
        assert not supports(q_, k_, v_), name
        with pytest.raises(ValueError, match=r"^causal_sink_attention: q .* expected CUDA or CPU tensors"):
            causal_sink_attention(q_, k_, v_, sinks, 0.25, DTYPE)


def test_heads_major_inputs_are_laid_out_as_the_fused_kernels_read_them():
    """q, k, v contiguous as [B, H, T, D] (not views of the projections' rows) give the same result."""
    from moetune.kernels.causal_sink_attention import causal_sink_attention

    results = []
    for rows_major in (True, False):
        q, k, v, sinks, dy = make((1, 4, 2, 33, 16), DTYPE, rows_major=rows_major)
        y, _ = causal_sink_attention(q, k, v, sinks, 0.25, DTYPE)
        results.append((y, *torch.autograd.grad(y, (q, k, v, sinks), dy)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_frozen_sinks_get_no_gradient_and_q_alone_can_be_asked():
    from moetune.kernels.causal_sink_attention import causal_sink_attention

    q, k, v, sinks, dy = make((1, 4, 2, 20, 16), DTYPE)
    sinks.requires_grad_(False)
    y, _ = causal_sink_attention(q, k, v, sinks, 0.25, DTYPE)
    (dq,) = torch.autograd.grad(y, (q,), dy)
    expected_y, _ = reference64(q, k, v, sinks, 0.25)
    (expected,) = torch.autograd.grad(expected_y, (q,), dy.double())
    assert relative_error(dq.double(), expected) < 4 * TOLERANCE[DTYPE]


def test_the_probe_passes_here_and_refuses_a_device_without_the_ops():
    from moetune.kernels.causal_sink_attention import probe

    assert probe(DEVICE, 0 if DEVICE == "cuda" else None, DTYPE) is None
    assert "no fused attention" in probe("meta", None, torch.float32)
    assert "no fused attention" in probe("cuda", 0, torch.float32)  # cuDNN: fp16 / bf16 only


def test_the_probe_runs_from_inside_a_checkpointed_forward_under_no_grad_and_autocast():
    """Where its first call comes from: a model's forward, in a checkpointed layer, in eval, under autocast or in
    inference mode."""
    from torch.utils.checkpoint import checkpoint

    from moetune.kernels import causal_sink_attention as module

    results = []

    def layer(x):
        module.probe.cache_clear()
        results.append(module.probe(DEVICE, 0 if DEVICE == "cuda" else None, DTYPE))
        return x * x  # saves x: the backward recomputes the layer

    x = torch.ones(3, device=DEVICE, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()  # the forward, then the recompute
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        layer(x)
    with torch.inference_mode():
        layer(x)
    assert results == [None] * 4
    module.probe.cache_clear()


def test_a_failing_probe_warns_and_says_why(monkeypatch):
    from moetune.kernels import causal_sink_attention as module

    def broken(*args):
        raise RuntimeError("cuDNN refused\nsecond line")

    monkeypatch.setitem(module._OPS, DEVICE, (broken, broken))
    module.probe.cache_clear()
    try:
        with pytest.warns(UserWarning, match="stays on flex attention"):
            problem = module.probe(DEVICE, 0 if DEVICE == "cuda" else None, DTYPE)
        assert problem == "RuntimeError: cuDNN refused"
    finally:
        module.probe.cache_clear()
