"""The fused SwiGLU kernels against torch's ops (F.silu(gate) * up and autograd) and a float64 reference.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 at a real shared expert's size too).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Empty, one element, not a multiple of the 1024-element block, 3-D.
SHAPES = [(0, 5), (1,), (3, 1000), (2, 3, 1025)]
# Relative error against float64 from the same rounded inputs: a few roundings of the dtype.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def swiglu(gate, up):
    from moetune.kernels.swiglu import swiglu

    return swiglu(gate, up)


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE).requires_grad_()
    up = torch.randn(shape, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    dh = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return gate, up, dh


def relative_error(a, b):
    a, b = a.double(), b.double()
    return 0.0 if b.numel() == 0 else ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ulps(a, b):
    """The largest difference in units of the dtype's last place, of b's magnitude or, where b is small (silu's
    gradient crosses 0 near gate = -1.28, where its terms cancel), of b's mean magnitude."""
    if a.numel() == 0:
        return 0.0
    b = b.double()
    scale = torch.maximum(b.abs(), b.abs().mean()) * torch.finfo(a.dtype).eps
    return ((a.double() - b).abs() / scale.clamp_min(torch.finfo(a.dtype).tiny)).max().item()


# fp32: torch's exp (vectorised on CPU) and Triton's (the interpreter's numpy; the GPU's ex2) differ by a few bits,
# which the products carry; in fp16 / bf16 the roundings to the dtype absorb them.
MAX_ULPS = {torch.float32: 8.0, torch.float16: 1.0, torch.bfloat16: 1.0}


def against_torch(gate, up, dh) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the kernels' result, torch's ops' result) for h, d_gate and d_up."""
    h = swiglu(gate, up)
    got = (h, *torch.autograd.grad(h, (gate, up), dh))
    want = F.silu(gate) * up
    return list(zip(got, (want, *torch.autograd.grad(want, (gate, up), dh))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_torch_and_float64(shape, dtype):
    gate, up, dh = make(shape, dtype)
    pairs = against_torch(gate, up, dh)
    for got, ref in pairs:
        assert got.dtype == dtype and got.shape == ref.shape
        assert ulps(got, ref) <= MAX_ULPS[dtype]  # at most a rounding of the dtype from torch's ops
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    h64 = F.silu(g64) * u64
    refs = (h64, *torch.autograd.grad(h64, (g64, u64), dh.double()))
    for (got, _), ref in zip(pairs, refs):
        assert relative_error(got, ref) < TOLERANCE[dtype]


def test_most_elements_are_torchs_bitwise():
    for got, ref in against_torch(*make((64, 1000), torch.float16, seed=1)):
        assert (got == ref).float().mean() > 0.99


def test_saturated_gates_give_finite_results():
    """exp(-gate) overflows for gate < -88 in fp32: silu is then -0, its gradient 0, as torch's."""
    gate = torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0], device=DEVICE).requires_grad_()
    up = torch.ones(5, device=DEVICE).requires_grad_()
    for got, ref in against_torch(gate, up, torch.ones(5, device=DEVICE)):
        assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("case", ["shapes", "dtypes", "strides", "integers"])
def test_inputs_it_cannot_take_are_one_line_errors(case):
    gate = torch.randn(4, 6, device=DEVICE)
    up = {
        "shapes": torch.randn(4, 5, device=DEVICE),
        "dtypes": torch.randn(4, 6, device=DEVICE).half(),
        "strides": torch.randn(6, 4, device=DEVICE).t(),
        "integers": torch.ones(4, 6, device=DEVICE, dtype=torch.int32),
    }[case]
    if case == "integers":
        gate = gate.int()
    with pytest.raises(ValueError, match="^swiglu: ") as error:
        swiglu(gate, up)
    assert "\n" not in str(error.value)


def test_a_second_derivative_is_refused():
    gate, up, _ = make((3, 7), torch.float32)
    (d_gate,) = torch.autograd.grad(swiglu(gate, up).square().sum(), [gate], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_gate.sum().backward()


@pytest.mark.gpu
def test_bf16_at_a_shared_experts_size():
    """GLM-4.7-Flash's shared expert at 8K tokens: [8192, 1536] bf16."""
    if DEVICE != "cuda":
        pytest.skip("needs a GPU")
    for got, ref in against_torch(*make((8192, 1536), torch.bfloat16, seed=2)):
        assert ulps(got, ref) <= 1.0 and (got == ref).float().mean() > 0.99
