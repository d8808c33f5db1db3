"""The attention-sink kernels against transformers' ops (integrations/flex_attention.py's renormalisation, forward
and autograd) and a float64 reference.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 at gpt-oss-20b's size too).
"""

from __future__ import annotations

import pytest
import torch

from ..models.helpers import DEVICE, needs_triton, relative_error

pytestmark = needs_triton
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, H, T, D): one token, sizes that are no multiple of a block, a 256-wide head, several token blocks.
SHAPES = [(1, 4, 1, 16), (2, 3, 37, 24), (1, 2, 300, 64), (1, 2, 9, 256)]
# Gradients against float64 from the same inputs: relative error of a few roundings of the dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def apply_sinks(out, lse, sinks, value_dtype):
    from moetune.kernels.attention_sinks import apply_sinks

    return apply_sinks(out, lse, sinks, value_dtype)


def transformers_sinks(out, lse, sinks, value_dtype):
    """transformers' ops (flex_attention_forward after flex attention), as written there."""
    B, H, T, _ = out.shape
    lse_v = lse.to(value_dtype).unsqueeze(-1)
    combined = torch.logsumexp(torch.cat([lse_v, sinks.view(1, -1, 1, 1).expand(B, H, T, 1)], dim=-1), dim=-1,
                               keepdim=True)
    return (out * torch.exp(lse_v - combined)).to(out.dtype).transpose(1, 2).contiguous()


def make(shape, dtype, sink_dtype=None, transposed=False, seed=0, masked_rows=False):
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # flex attention's out has query's strides: [B, T, H, D] in memory where query is a view
        out = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2)
    else:
        out = torch.randn(B, H, T, D, generator=gen).to(dtype)
    lse = torch.randn(B, H, T, generator=gen) * 4 + 2
    if masked_rows:  # rows that saw no key: flex attention returns lse = -inf and out = 0
        lse[:, :, ::3] = float("-inf")
        out = out.clone()
        out[:, :, ::3] = 0
    sinks = (torch.randn(H, generator=gen) * 2).to(sink_dtype or dtype)
    dy = torch.randn(B, T, H, D, generator=gen).to(dtype)
    to = dict(device=DEVICE)
    return (out.to(**to).requires_grad_(), lse.to(**to).requires_grad_(), sinks.to(**to).requires_grad_(),
            dy.to(**to))


def ulps(a, b, dtype):
    """The largest difference in units of dtype's epsilon times b's magnitude (one rounding apart: <= 1)."""
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    a, b = a[torch.isfinite(b)].double(), b[torch.isfinite(b)].double()
    if a.numel() == 0:
        return 0.0
    scale = b.abs().clamp_min(torch.finfo(dtype).tiny) * torch.finfo(dtype).eps
    return ((a - b).abs() / scale).max().item()


def float64_gradients(out, lse, sinks, dy):
    leaves = [t.detach().double().requires_grad_() for t in (out, lse, sinks)]
    y = transformers_sinks(*leaves, torch.float64)
    y.backward(dy.double())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["out-contiguous", "out-query-strides"])
def test_forward_rounds_where_transformers_rounds(shape, dtype, transposed):
    out, lse, sinks, _ = make(shape, dtype, transposed=transposed)
    y = apply_sinks(out, lse, sinks, dtype)
    expected = transformers_sinks(out, lse, sinks, dtype)
    assert y.shape == expected.shape and y.is_contiguous() and y.dtype == dtype
    # fp32: torch's exp / log and Triton's differ in the last bits; fp16 / bf16: within one rounding
    assert ulps(y.detach(), expected.detach(), dtype) <= (16.0 if dtype == torch.float32 else 1.0)
    if dtype != torch.float32:
        same = (y == expected).float().mean().item()
        assert same > 0.99, same


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_float64(shape, dtype):
    out, lse, sinks, dy = make(shape, dtype, transposed=True, seed=1)
    apply_sinks(out, lse, sinks, dtype).backward(dy)
    expected = float64_gradients(out, lse, sinks, dy)
    for name, got, want in zip(("out", "lse", "sinks"), (out.grad, lse.grad, sinks.grad), expected):
        assert got.dtype == {"out": dtype, "lse": torch.float32, "sinks": dtype}[name]
        assert relative_error(got, want) < TOLERANCE[dtype], name
    assert out.grad.stride() == out.stride()  # flex attention's backward gets its output's layout back


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_as_close_to_float64_as_transformers_autograd(dtype):
    """Autograd through transformers' ops rounds each intermediate gradient to the dtype (its lse gradient is 1 - r
    after r's rounding: in fp16 ~7x further from float64 than the kernel's); the kernel is no further off."""
    out, lse, sinks, dy = make((2, 4, 70, 64), dtype, seed=2)
    apply_sinks(out, lse, sinks, dtype).backward(dy)
    leaves = [t.detach().clone().requires_grad_() for t in (out, lse, sinks)]
    transformers_sinks(*leaves, dtype).backward(dy)
    expected = float64_gradients(out, lse, sinks, dy)
    for got, leaf, want in zip((out.grad, lse.grad, sinks.grad), leaves, expected):
        assert relative_error(got, want) <= max(1.5 * relative_error(leaf.grad, want), TOLERANCE[dtype] / 4)


def test_rows_that_saw_no_key_give_zeros_and_finite_gradients():
    out, lse, sinks, dy = make((1, 2, 10, 16), torch.float32, masked_rows=True)
    y = apply_sinks(out, lse, sinks, torch.float32)
    expected = transformers_sinks(out, lse, sinks, torch.float32)
    assert torch.equal(y[:, ::3], torch.zeros_like(y[:, ::3])) and torch.allclose(y, expected, rtol=1e-5, atol=1e-6)
    y.backward(dy)
    assert all(torch.isfinite(t.grad).all() for t in (out, lse, sinks))
    expected = float64_gradients(out, lse, sinks, dy)
    for got, want in zip((out.grad, lse.grad, sinks.grad), expected):
        assert relative_error(got, want) < 1e-5


def test_sinks_in_float32_beside_a_half_precision_model():
    """A model cast to fp16 whose sinks stayed fp32: torch.cat promotes, so r is fp32 and y rounds once to fp16."""
    out, lse, sinks, dy = make((1, 4, 33, 32), torch.float16, sink_dtype=torch.float32, seed=3)
    y = apply_sinks(out, lse, sinks, torch.float16)
    expected = transformers_sinks(out, lse, sinks, torch.float16)
    assert y.dtype == torch.float16
    assert (y == expected).float().mean().item() > 0.99
    y.backward(dy)
    assert sinks.grad.dtype == torch.float32
    assert relative_error(sinks.grad, float64_gradients(out, lse, sinks, dy)[2]) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("wants", [(True, False, False), (True, True, False), (True, False, True)],
                         ids=["out-only", "lse-too", "sinks-too"])
def test_only_the_asked_gradients(wants):
    out, lse, sinks, dy = make((1, 2, 20, 16), torch.float32, seed=4)
    for tensor, want in zip((out, lse, sinks), wants):
        tensor.requires_grad_(want)
    apply_sinks(out, lse, sinks, torch.float32).backward(dy)
    expected = float64_gradients(out, lse, sinks, dy)
    for tensor, want, reference in zip((out, lse, sinks), wants, expected):
        assert (tensor.grad is not None) == want
        if want:
            assert relative_error(tensor.grad, reference) < 1e-5


def test_no_tokens():
    out, lse, sinks, dy = make((1, 2, 0, 16), torch.float32)
    y = apply_sinks(out, lse, sinks, torch.float32)
    assert y.shape == (1, 0, 2, 16)
    y.backward(dy)
    assert out.grad.shape == out.shape and torch.equal(sinks.grad, torch.zeros_like(sinks))


def test_double_backward_is_refused():
    out, lse, sinks, dy = make((1, 2, 4, 16), torch.float32)
    y = apply_sinks(out, lse, sinks, torch.float32)
    (grad,) = torch.autograd.grad(y, out, dy, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("change, expected", [
    (lambda o, l, s: (o, l[..., :-1], s), "expected [B, H, T, D], [B, H, T] and [H]"),
    (lambda o, l, s: (o, l, s[:-1]), "expected [B, H, T, D], [B, H, T] and [H]"),
    (lambda o, l, s: (o, l.half(), s), "an fp32 lse"),
    (lambda o, l, s: (o.int(), l, s), "expected fp32 / fp16 / bf16"),
    (lambda o, l, s: (o[..., ::2], l, s), "contiguous"),
])
def test_bad_inputs_get_a_one_line_error(change, expected):
    out, lse, sinks, _ = make((1, 2, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="apply_sinks") as error:
        apply_sinks(*change(out.detach(), lse.detach(), sinks.detach()), torch.float32)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt_oss_size_in_bfloat16():
    """gpt-oss-20b at 8K tokens: 64 heads of 64, out with query's strides, bf16."""
    out, lse, sinks, dy = make((1, 64, 8192, 64), torch.bfloat16, transposed=True, seed=5)
    y = apply_sinks(out, lse, sinks, torch.bfloat16)
    expected = transformers_sinks(out, lse, sinks, torch.bfloat16)
    assert (y == expected).float().mean().item() > 0.99
    assert ulps(y.detach(), expected.detach(), torch.bfloat16) <= 1.0
    y.backward(dy)
    expected = float64_gradients(out, lse, sinks, dy)
    for got, want in zip((out.grad, lse.grad, sinks.grad), expected):
        assert relative_error(got, want) < TOLERANCE[torch.bfloat16]
