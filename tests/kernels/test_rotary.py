"""The fused rotary kernels against a float64 reference and, bitwise, against transformers' own functions.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 at real head shapes too).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.qwen3_moe import modeling_qwen3_moe

from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
# The forms transformers writes, by table width: "llama" takes cos [.., D], "gpt_oss" cos [.., D / 2].
FORMS = {"llama": modeling_qwen3_moe.apply_rotary_pos_emb, "gpt_oss": modeling_gpt_oss.apply_rotary_pos_emb}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (batch, heads, kv heads, tokens, head dim, cos batch): T = 1, D = 2, odd head counts and token counts that
# are not multiples of the 64-row tile, D / 2 not a power of two, cos per batch row.
SHAPES = [
    (1, 1, 1, 1, 2, 1),
    (2, 3, 1, 7, 10, 1),
    (1, 5, 5, 65, 64, 1),
    (3, 4, 2, 33, 24, 3),
    (1, 32, 4, 130, 128, 1),
]


def rotary(*args, **kwargs):
    from moetune.kernels.rotary import rotary

    return rotary(*args, **kwargs)


def make(shape, dtype, form, seed=0, transposed_tables=False):
    """q, k as attention gets them (the transposed view of [B, T, heads, D]), cos and sin like rotary_emb's
    (transposed views with transposed_tables, as transformers 5.17's gpt-oss rotary returns them)."""
    B, Hq, Hk, T, D, Bc = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    width = D if form == "llama" else D // 2
    angles = torch.rand(Bc, T, width, generator=gen) * 6.3
    if transposed_tables:
        angles = angles.transpose(1, 2).contiguous().transpose(1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    return q.requires_grad_(), k.requires_grad_(), cos, sin


def reference(x, cos, sin):
    """float64: x * c + rotate_half(x) * s with the tables widened to D."""
    x64, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    if c.shape[-1] != x.shape[-1]:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
    half = x.shape[-1] // 2
    return x64 * c + torch.cat((-x64[..., half:], x64[..., :half]), -1) * s


@pytest.mark.parametrize("transposed_tables", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitwise_equal_to_transformers(shape, dtype, form, transposed_tables):
    """Forward and backward round where torch rounds: equal to the last bit, output layouts included."""
    q, k, cos, sin = make(shape, dtype, form, transposed_tables=transposed_tables)
    q_ref, k_ref = FORMS[form](q, k, cos, sin)
    gen = torch.Generator().manual_seed(1)
    dq_out = torch.randn(q_ref.shape, generator=gen).to(DEVICE, dtype)
    dk_out = torch.randn(k_ref.shape, generator=gen).to(DEVICE, dtype)
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q, k), (dq_out, dk_out))

    contiguous = form == "gpt_oss"
    q_out, k_out = rotary(q, cos, sin, contiguous=contiguous), rotary(k, cos, sin, contiguous=contiguous)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    for got, ref in ((q_out, q_ref), (k_out, k_ref), (dq, dq_ref), (dk, dk_ref)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for got, ref in ((q_out, q_ref), (k_out, k_ref)):  # the same memory layout (strides of size-1 dims aside)
        assert [st for st, n in zip(got.stride(), got.shape) if n > 1] == \
            [st for st, n in zip(ref.stride(), ref.shape) if n > 1]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_against_float64(dtype, form):
    """Forward and the input gradient (the rotation's transpose) against float64: one rounding of each."""
    q, _, cos, sin = make((2, 3, 1, 19, 16, 2), dtype, form, seed=3)
    y = rotary(q, cos, sin)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    (dq,) = torch.autograd.grad(y, q, dy)
    q64 = q.detach().double().requires_grad_()
    y64 = reference(q64, cos, sin)
    (dq64,) = torch.autograd.grad(y64, q64, dy.double())
    tol = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    for got, ref in ((y, y64), (dq, dq64)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_strided_output_gradient_and_empty_input():
    """Gradients laid out otherwise than the output (contiguous; last dim strided), and zero tokens."""
    q, _, cos, sin = make((2, 3, 1, 9, 8, 1), torch.float32, "llama")
    y = rotary(q, cos, sin)
    q_ref, _ = FORMS["llama"](q, q.detach(), cos, sin)
    for dy in (torch.randn(2, 3, 9, 8, device=DEVICE), torch.randn(2, 3, 8, 9, device=DEVICE).transpose(2, 3)):
        (dq,) = torch.autograd.grad(y, q, dy, retain_graph=True)
        (dq_ref,) = torch.autograd.grad(q_ref, q, dy, retain_graph=True)
        torch.testing.assert_close(dq, dq_ref, rtol=0, atol=0)

    packed = []  # the shared tables ride on ctx: no checkpoint hook calls for them
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        rotary(q, cos, sin)
    assert packed == []

    empty = torch.zeros(1, 2, 0, 8, device=DEVICE, requires_grad=True)
    out = rotary(empty, cos[:, :0], sin[:, :0])
    assert out.shape == empty.shape
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize(
    "args, message",
    [
        (((1, 2, 4, 8), (1, 4, 8), (1, 4, 6)), "expects x"),
        (((1, 2, 4, 7), (1, 4, 7), (1, 4, 7)), "do not match"),
        (((1, 2, 4, 8), (1, 5, 8), (1, 5, 8)), "do not match"),
        (((2, 2, 4, 8), (3, 4, 8), (3, 4, 8)), "do not match"),
        (((1, 2, 4, 8), (1, 4, 3), (1, 4, 3)), "do not match"),
    ],
)
def test_bad_shapes_are_one_line_errors(args, message):
    x, cos, sin = (torch.zeros(s, device=DEVICE) for s in args)
    with pytest.raises(ValueError, match=f"rotary: .*{message}"):
        rotary(x, cos, sin)


def test_bad_dtypes_layouts_and_grad_tables_are_errors():
    x = torch.zeros(1, 2, 4, 8, device=DEVICE)
    cos = torch.zeros(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rotary: dtypes"):
        rotary(x, cos.half(), cos.half())
    with pytest.raises(ValueError, match="rotary: the last dim"):
        rotary(x.transpose(2, 3), torch.zeros(1, 8, 4, device=DEVICE), torch.zeros(1, 8, 4, device=DEVICE))
    with pytest.raises(ValueError, match="cos, sin laid out alike"):
        rotary(x, cos, torch.zeros(1, 8, 4, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="rotary: cos and sin must not require grad"):
        rotary(x, cos.requires_grad_(), cos)


def test_double_backward_raises():
    """The backward is not itself differentiable: create_graph=True must not silently drop the graph."""
    q = torch.randn(1, 2, 3, 4, device=DEVICE, requires_grad=True)
    cos = torch.randn(1, 3, 4, device=DEVICE)
    (dq,) = torch.autograd.grad(rotary(q, cos, cos).pow(2).sum(), q, create_graph=True)  # dy depends on q
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("form, heads, kv_heads, head_dim", [("llama", 32, 4, 128), ("gpt_oss", 64, 8, 64)])
def test_real_shapes_bf16_bitwise_gpu(form, heads, kv_heads, head_dim):
    """Qwen3-30B-A3B's and gpt-oss-20b's attention at 4K tokens in bf16: bitwise transformers'."""
    test_bitwise_equal_to_transformers((1, heads, kv_heads, 4096, head_dim, 1), torch.bfloat16, form, False)
