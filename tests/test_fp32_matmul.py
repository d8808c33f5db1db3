"""mm_fp32: a @ b in fp32 from (b)f16 operands, without their fp32 copies on CUDA."""

from __future__ import annotations

import pytest
import torch

from moetune.fp32_matmul import mm_fp32


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32,) * 2,
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_the_product_of_the_operands_cast_to_fp32(dtypes):
    """On CPU (and for mixed dtypes anywhere) the operands cast to fp32 first: bitwise that product."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=gen).to(dtypes[0])
    b = torch.randn(5, 33, generator=gen).to(dtypes[1]).t()  # a transposed view, as the callers pass
    got = mm_fp32(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, a.float() @ b.float())


def test_no_rows():
    assert mm_fp32(torch.zeros(0, 4, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)).shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_cores_on_a_gpu(dtype):
    """CUDA: one half-precision GEMM with an fp32 result, within tensor cores' truncating fp32 sums (~2e-6 at K =
    2048, NOTES run 68) of the exact product, and no [M, K] fp32 copy of a allocated."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 2048, generator=gen).to("cuda", dtype)
    b = torch.randn(2048, 64, generator=gen).to("cuda", dtype)
    mm_fp32(a, b)  # cuBLAS' workspace (32 MiB on Hopper) comes from the caching allocator at the first call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = mm_fp32(a, b)
    peak = torch.cuda.max_memory_allocated() - before
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() / scale).max().item() < 1e-5
    assert peak < a.numel() * 2  # the fp32 result (1 MiB), not a copy of a (32 MiB)
