"""The MLA query/key/value kernels against a float64 reference and, bitwise, against transformers' own code.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 at GLM-4.7-Flash's head shapes too).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.glm4_moe_lite import modeling_glm4_moe_lite as modeling

from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (batch, tokens, heads, nope, rope, v, cos batch): T = 1, one head, head counts above and not multiples of the
# head block, widths that are not powers of two, rope 2, cos per batch row, GLM-4.7-Flash's widths.
SHAPES = [
    (1, 1, 1, 4, 2, 4, 1),
    (2, 7, 3, 6, 4, 10, 1),
    (1, 33, 5, 12, 8, 16, 1),
    (3, 5, 20, 24, 16, 32, 3),
    (1, 9, 20, 192, 64, 256, 1),
]


def make(shape, dtype, seed=0):
    """q_states, kv, k_rot as the projections give them (k_rot a slice of a wider row), cos and sin."""
    B, T, Hh, nope, rope, v, Bc = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hh * (nope + rope), generator=gen).view(B, T, Hh, nope + rope)
    kv = torch.randn(B, T, Hh * (nope + v), generator=gen).view(B, T, Hh, nope + v)
    k_rot = torch.randn(B, T, 5 + rope, generator=gen)[..., 5:]  # kv_a_proj_with_mqa's output, split
    angles = torch.rand(Bc, T, rope // 2, generator=gen) * 6.3
    angles = torch.cat((angles, angles), -1)  # transformers' table: cat(freqs, freqs)
    cos, sin = angles.cos(), angles.sin()
    inputs = [x.to(DEVICE, dtype) for x in (q, kv, k_rot, cos, sin)]
    for x in inputs[:3]:
        x.requires_grad_()
    return inputs


def transformers_qkv(q, kv, k_rot, cos, sin, nope, interleave):
    """What Glm4MoeLiteAttention.forward and expand_kv compute, returned as [B, T, heads, D]."""
    q_t = q.transpose(1, 2)
    q_pass, q_rot = q_t[..., :nope], q_t[..., nope:]
    k_rot = k_rot.unsqueeze(1)
    rope = modeling.apply_rotary_pos_emb_interleave if interleave else modeling.apply_rotary_pos_emb
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin)
    query = torch.cat((q_pass, q_rot), dim=-1)
    kv_t = kv.transpose(1, 2)
    k_nope, value = kv_t[..., :nope], kv_t[..., nope:]
    key = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def reference(q, kv, k_rot, cos, sin, nope, interleave):
    """Written from the math on float64 inputs: pairs (x1, x2) rotated by (c, s), results in halves."""
    half = k_rot.shape[-1] // 2
    c, s = cos[..., :half].unsqueeze(2), sin[..., :half].unsqueeze(2)
    c2, s2 = (c, s) if interleave else (cos[..., half:].unsqueeze(2), sin[..., half:].unsqueeze(2))

    def rotate(x):
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
        return torch.cat((x1 * c - x2 * s, x2 * c2 + x1 * s2), -1)

    heads = q.shape[2]
    query = torch.cat((q[..., :nope], rotate(q[..., nope:])), -1)
    key = torch.cat((kv[..., :nope], rotate(k_rot.unsqueeze(2)).expand(-1, -1, heads, -1)), -1)
    return query, key, kv[..., nope:]


def run(shape, dtype, interleave, seed=0):
    from moetune.kernels.mla_inputs import mla_inputs

    nope = shape[3]
    q, kv, k_rot, cos, sin = make(shape, dtype, seed)
    outs = mla_inputs(q, kv, k_rot, cos, sin, nope, interleave)
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1 + i)).to(DEVICE, dtype)
             for i, o in enumerate(outs)]
    got = torch.autograd.grad(outs, (q, kv, k_rot), grads)
    return (q, kv, k_rot, cos, sin), outs, grads, got


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_float64_reference(shape, dtype, interleave):
    inputs, outs, grads, got = run(shape, dtype, interleave)
    nope = shape[3]
    # forward
    expected = reference(*(x.detach().double() for x in inputs), nope, interleave)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for o, e in zip(outs, expected):
        assert o.is_contiguous()
        torch.testing.assert_close(o.double(), e, rtol=tol, atol=tol)
    # backward: the float64 graph's gradients
    q, kv, k_rot = (x.detach().double().requires_grad_() for x in inputs[:3])
    ref_outs = reference(q, kv, k_rot, inputs[3].double(), inputs[4].double(), nope, interleave)
    expected_grads = torch.autograd.grad(ref_outs, (q, kv, k_rot), [g.double() for g in grads])
    heads = shape[2]
    for name, g, e in zip(("q", "kv", "k_rot"), got, expected_grads):
        scale = heads if name == "k_rot" else 1  # summed over heads
        torch.testing.assert_close(g.double(), e, rtol=tol * scale, atol=tol * scale, msg=name)


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_transformers(dtype, interleave):
    """Forward bitwise; q's and kv's gradients bitwise; k_rot's (a sum over heads, order-dependent) to one ulp."""
    shape = SHAPES[3]
    inputs, outs, grads, got = run(shape, dtype, interleave)
    nope = shape[3]
    q, kv, k_rot = (x.detach().clone().requires_grad_() for x in inputs[:3])
    ref = transformers_qkv(q, kv, k_rot, inputs[3], inputs[4], nope, interleave)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    ref_grads = torch.autograd.grad(ref, (q, kv, k_rot), grads)
    torch.testing.assert_close(got[0], ref_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref_grads[1], rtol=0, atol=0)
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got[2], ref_grads[2], rtol=ulp, atol=ulp * shape[2])


def test_gradients_of_strided_outputs():
    """Attention hands back gradients of the transposed views; any strides with a contiguous last dim work."""
    from moetune.kernels.mla_inputs import mla_inputs

    shape = SHAPES[2]
    q, kv, k_rot, cos, sin = make(shape, torch.float32)
    outs = mla_inputs(q, kv, k_rot, cos, sin, shape[3], True)
    grads = [torch.randn(o.transpose(1, 2).shape, device=DEVICE).transpose(1, 2) for o in outs]
    got = torch.autograd.grad(outs, (q, kv, k_rot), grads, retain_graph=True)
    want = torch.autograd.grad(outs, (q, kv, k_rot), [g.contiguous() for g in grads])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_bad_inputs_are_named():
    from moetune.kernels.mla_inputs import mla_inputs

    q, kv, k_rot, cos, sin = make(SHAPES[1], torch.float32)
    with pytest.raises(ValueError, match="mla_inputs: shapes"):
        mla_inputs(q, kv, k_rot, cos, sin, 5, True)  # nope + rope != q's width
    with pytest.raises(ValueError, match="mla_inputs: dtypes"):
        mla_inputs(q, kv, k_rot, cos.half(), sin.half(), 6, True)
    with pytest.raises(ValueError, match="must not require grad"):
        mla_inputs(q, kv, k_rot, cos.requires_grad_(), sin, 6, True)
