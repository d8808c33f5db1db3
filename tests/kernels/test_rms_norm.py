"""The fused RMSNorm kernels against a float64 reference and against transformers' own arithmetic.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one. The bf16 comparison with transformers'
modules at real hidden sizes is in tests/models/test_fast_norms.py.
"""

from __future__ import annotations

import pytest
import torch

from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
EPS = 1e-6
# Relative error (Frobenius) against float64. fp32: observed ~6e-8; fp16: ~3e-4 (one rounding of the output).
RTOL = {torch.float32: 1e-6, torch.float16: 1e-3}


def rms_norm(*args, **kwargs):
    from moetune.kernels.rms_norm import rms_norm

    return rms_norm(*args, **kwargs)


def transformers_rms_norm(x, weight, eps, cast_before_weight):
    """transformers' forward, statement for statement (Llama form, or gpt-oss's with cast_before_weight=False)."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    if cast_before_weight:
        return weight * hidden_states.to(input_dtype)
    return (weight * hidden_states).to(input_dtype)


def reference_grads(x, weight, dy):
    """(y, dx, dw) in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS))
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


def inputs(num_rows, hidden, dtype, seed=0, leading=None):
    gen = torch.Generator().manual_seed(seed)
    shape = leading or (num_rows,)
    x = (torch.randn(*shape, hidden, generator=gen) * 3).to(DEVICE, dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    return x, weight, gen


def close(got, ref, dtype):
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < RTOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cast_before_weight", [True, False])
@pytest.mark.parametrize(
    "hidden, num_rows, block_rows",
    [
        (7, 5, 2),  # odd H far below its block (8), a partial last row block
        (130, 9, 2),  # H just past a power of 2 (block 256); 5 row blocks on 4 dw programs: one program loops twice
        (2880, 3, 0),  # gpt-oss hidden size, default blocks (one row per program)
        (128, 1, 0),  # one row (head_dim)
    ],
)
def test_forward_and_backward_match_float64(dtype, cast_before_weight, hidden, num_rows, block_rows):
    x, weight, gen = inputs(num_rows, hidden, dtype)
    x.requires_grad_()
    weight.requires_grad_()
    y = rms_norm(x, weight, EPS, cast_before_weight=cast_before_weight, block_rows=block_rows)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    y_ref, dx_ref, dw_ref = reference_grads(x, weight, dy)
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    assert dx.dtype == dtype and dw.dtype == dtype


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cast_before_weight", [True, False])
def test_forward_rounds_as_transformers(weight_dtype, cast_before_weight):
    """fp16 input: the output is transformers' bit for bit but for rare one-ulp flips (fp32 sums in another order),
    and clearly not the other form's. The output dtype follows torch's promotion (fp16 x, fp32 w -> fp32 for Llama)."""
    x, weight, _ = inputs(64, 130, torch.float16)
    weight = weight.to(weight_dtype)
    y = rms_norm(x, weight, EPS, cast_before_weight=cast_before_weight)
    own = transformers_rms_norm(x, weight, EPS, cast_before_weight)
    other = transformers_rms_norm(x, weight, EPS, not cast_before_weight)
    assert y.dtype == own.dtype
    assert (y.float() != own.float()).float().mean() < 0.01
    assert (y.float() - own.float()).abs().max() <= 2 ** -10 * own.float().abs().max()
    assert (y.float() != other.float()).float().mean() > 0.1


def test_frozen_weight_gets_no_gradient_and_the_same_dx():
    x, weight, gen = inputs(6, 40, torch.float32)
    x.requires_grad_()
    dy = torch.randn(6, 40, generator=gen).to(DEVICE)
    (dx_frozen,) = torch.autograd.grad(rms_norm(x, weight, EPS), (x,), dy)
    weight.requires_grad_()
    dx, _ = torch.autograd.grad(rms_norm(x, weight, EPS), (x, weight), dy)
    torch.testing.assert_close(dx_frozen, dx, rtol=0, atol=0)


def test_a_frozen_weight_parameter_is_not_saved_a_trainable_one_is():
    """A frozen weight parameter rides on ctx (no checkpoint hook calls for it); a trainable one is saved, so
    autograd still catches an in-place change to it before backward."""
    x, weight, _ = inputs(4, 16, torch.float32)
    x.requires_grad_()
    weight = torch.nn.Parameter(weight, requires_grad=False)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        rms_norm(x, weight, EPS)
        assert not any(t is weight for t in packed) and len(packed) == 2
        packed.clear()
        weight.requires_grad_()
        rms_norm(x, weight, EPS)
        assert any(t is weight for t in packed)
    y = rms_norm(x, weight, EPS)  # outside the hooks, which skip autograd's version check
    with torch.no_grad():
        weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _views(hidden=24, seed=0):
    """(name, strided view, its contiguous copy) for each row layout the launcher addresses."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(10, hidden + 5, generator=gen).to(DEVICE)
    heads_first = torch.randn(1, 3, 7, hidden, generator=gen).to(DEVICE)  # [B=1, heads, T, D]
    batched = torch.randn(2, 3, 7, hidden, generator=gen).to(DEVICE)
    views = {
        # deepseek's kv_a_layernorm: the first columns of a split, row stride H + rope dim
        "column_slice": wide[:, :hidden],
        # the gradient a q/k norm gets back through .transpose(1, 2): [1, T, heads, D], strides (., D, T*D, 1)
        "transposed_heads": heads_first.transpose(1, 2),
        # the same with a batch of 2: three leading dims that no two strides describe -> copied
        "transposed_batched": batched.transpose(1, 2),
        # strided last dim -> copied
        "strided_columns": torch.randn(5, 2 * hidden, generator=gen).to(DEVICE)[:, ::2],
    }
    return {name: (v, v.contiguous()) for name, v in views.items()}


@pytest.mark.parametrize("layout", list(_views()))
def test_non_contiguous_input_and_gradient(layout):
    """A strided x (forward) and a strided dy (backward) give exactly the contiguous results."""
    from moetune.kernels.rms_norm import _row_layout

    x, x_contiguous = _views()[layout]
    copied = _row_layout(x)[0] is not x
    assert copied == (layout in ("transposed_batched", "strided_columns"))
    dy, dy_contiguous = _views(seed=1)[layout]
    gen = torch.Generator().manual_seed(2)
    weight = (1 + 0.5 * torch.randn(x.shape[-1], generator=gen)).to(DEVICE).requires_grad_()
    results = []
    for xi, dyi in ((x, dy), (x_contiguous, dy_contiguous)):
        xi = xi.detach().requires_grad_()  # a leaf with the same strides
        y = rms_norm(xi, weight, EPS, block_rows=2)
        results.append((y, *torch.autograd.grad(y, (xi, weight), dyi)))
    for strided, contiguous in zip(*results):
        torch.testing.assert_close(strided, contiguous, rtol=0, atol=0)
    y_ref, dx_ref, dw_ref = reference_grads(x_contiguous, weight, dy_contiguous)
    for got, ref in zip(results[0], (y_ref, dx_ref, dw_ref)):
        close(got, ref, torch.float32)


def test_no_rows():
    x = torch.empty(0, 3, 16, device=DEVICE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight, EPS)
    assert y.shape == x.shape
    dx, dw = torch.autograd.grad(y, (x, weight), torch.empty_like(y))
    assert dx.shape == x.shape and dw.abs().sum() == 0


def test_bad_shapes_raise():
    from moetune.kernels.rms_norm import rms_norm_forward

    with pytest.raises(ValueError, match="x, weight"):
        rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="block_rows"):
        rms_norm_forward(torch.ones(2, 8, device=DEVICE), torch.ones(8, device=DEVICE), EPS, True, 3)


def test_custom_ops_pass_opcheck():
    """The torch.compile path: schemas and fake implementations agree with the real ops."""
    from moetune.kernels.rms_norm import rms_norm_backward, rms_norm_forward

    x, weight, gen = inputs(5, 24, torch.float32, leading=(5, 1))
    torch.library.opcheck(rms_norm_forward, (x, weight, EPS, True, 0),
                          test_utils=("test_schema", "test_faketensor"))
    y, rstd = rms_norm_forward(x, weight, EPS, True)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    for compute_dw in (True, False):
        torch.library.opcheck(rms_norm_backward, (dy, x, weight, rstd, True, compute_dw, 0),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_a_weight_that_is_not_contiguous_reads_as_its_values(layout):
    x, weight, gen = inputs(7, 24, torch.float32, seed=3)
    x.requires_grad_()
    dy = torch.randn(7, 24, generator=gen).to(DEVICE)
    if layout == "strided":  # a column of a bigger buffer: stride 2
        w = torch.stack([weight, torch.full_like(weight, 9.0)], 1)[:, 0]
    else:  # one value for every column: stride 0
        weight = torch.full_like(weight, 1.5)
        w = weight[:1].expand(weight.shape[0])
    w.requires_grad_()
    y = rms_norm(x, w, EPS)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, dx64, dw64 = reference_grads(x, weight, dy)
    close(y, y64, torch.float32)
    close(dx, dx64, torch.float32)
    close(dw, dw64, torch.float32)
