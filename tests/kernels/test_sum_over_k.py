"""The sum over k slots kernel against a sequential fp32 sum (bitwise), torch's sum and a float64 reference.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 and the real shapes too).
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
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (T, K, H): one token, one slot, columns not multiples of the tile (H 300, 257, 1000; 5, below 16), k = 8.
SHAPES = [(1, 8, 64), (13, 4, 300), (9, 1, 257), (33, 8, 1000), (5, 3, 5), (16, 2, 512)]


def sum_over_k(y, **config):
    from moetune.kernels.sum_over_k import sum_over_k

    return sum_over_k(y, **config)


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 4).to(dtype).to(DEVICE)


def sequential(y):
    """The kernel's arithmetic in torch: fp32 sums in slot order, one rounding."""
    acc = torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32, device=y.device)
    for k in range(y.shape[1]):
        acc += y[:, k].float()
    return acc.to(y.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bitwise_the_sequential_fp32_sum(shape, dtype):
    y = make(shape, dtype)
    out = sum_over_k(y)
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    assert torch.equal(out, sequential(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_within_a_rounding_of_float64_and_torch(dtype):
    y = make((37, 8, 700), dtype, seed=1)
    out = sum_over_k(y).double()
    exact = y.double().sum(dim=1)
    # the rounding to the dtype (half an ulp of the sum) and fp32's own in K additions (an fp32 ulp of sum |y| each);
    # torch's reduction rounds fp32 sums too, perhaps taken in another order: twice that between the two
    ulp = torch.finfo(dtype).eps * exact.abs()
    fp32 = y.shape[1] * torch.finfo(torch.float32).eps * y.double().abs().sum(dim=1)
    assert ((out - exact).abs() <= 0.5 * ulp + fp32).all()
    assert ((out - y.sum(dim=1).double()).abs() <= ulp + 2 * fp32).all()


@pytest.mark.parametrize("config", [dict(block_t=1, block_h=16, num_warps=1), dict(block_t=32, block_h=128),
                                    dict(block_t=4, block_h=1024, num_warps=8), dict(block_t=8, block_h=256)],
                         ids=str)
def test_other_tiles_give_the_same_bits(config):
    y = make((29, 4, 2500), torch.float16, seed=2)  # two column blocks of the default 2048
    assert torch.equal(sum_over_k(y, **config), sequential(y))


def test_empty_inputs():
    assert sum_over_k(make((0, 4, 64), torch.float32)).shape == (0, 64)
    assert sum_over_k(make((3, 4, 0), torch.float32)).shape == (3, 0)
    assert torch.equal(sum_over_k(torch.ones(3, 0, 8, device=DEVICE)), torch.zeros(3, 8, device=DEVICE))


def test_infinities_and_nans_propagate():
    y = torch.zeros(2, 3, 16, device=DEVICE)
    y[0, 1, 0] = float("inf")
    y[1, 2, 5] = float("nan")
    out = sum_over_k(y)
    assert out[0, 0] == float("inf") and out[1, 5].isnan()
    assert (out[0, 1:] == 0).all() and (out[1, :5] == 0).all()


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 8), "expected a [T, K, H] tensor, got shape [4, 8]"),
    (torch.zeros(2, 4, 8, dtype=torch.int32), "expected fp32, fp16 or bf16, got torch.int32"),
    (torch.zeros(2, 8, 4).transpose(1, 2), "expected a contiguous tensor"),
] + ([] if DEVICE == "cuda" else [
    (torch.zeros(2, 4, 8, dtype=torch.bfloat16), "bf16 needs a CUDA GPU"),
]), ids=["2-D", "int", "strided"] + ([] if DEVICE == "cuda" else ["bf16-on-cpu"]))
def test_bad_input_is_one_line(bad, message):
    with pytest.raises(ValueError, match=r"^sum_over_k: y: " + message.replace("[", r"\[").replace("]", r"\]")):
        sum_over_k(bad.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 8, 2048), (16384, 4, 2880), (8192, 4, 2048)],
                         ids=["qwen3-16k", "gpt-oss-16k", "glm-8k"])
def test_real_shapes_bf16(shape):
    y = make(shape, torch.bfloat16)
    assert torch.equal(sum_over_k(y), sequential(y))
