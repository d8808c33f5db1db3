"""The fused router top-k against a float64 reference and against transformers' routers' own ops.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 too).
"""

from __future__ import annotations

import pytest
import torch

from .router_checks import DEVICE, DTYPES, RTOL, needs_triton, relative

pytestmark = needs_triton


def router_topk(*args, **kwargs):
    from moetune.kernels.router_topk import router_topk

    return router_topk(*args, **kwargs)


def transformers_router(logits, top_k, normalize, out_dtype):
    """What qwen3_moe's router computes after its Linear (mixtral's with out_dtype fp32)."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    values, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        values /= values.sum(dim=-1, keepdim=True)
    return values.to(out_dtype), ids


def reference(logits, ids, normalize):
    """float64 weights of the given experts, differentiable in the logits."""
    logits64 = logits.detach().double().requires_grad_()
    probs = torch.softmax(logits64, dim=-1)
    chosen = probs.gather(1, ids)
    weights = chosen / chosen.sum(-1, keepdim=True) if normalize else chosen
    return logits64, weights




def distinct_logits(tokens, experts, dtype, gen):
    """Logits without ties, exact in fp16 and bf16: each row a shuffle of multiples of 4 / experts in [-2, 2).
    (Ties are chosen by a rule torch.topk does not fix: see test_ties_*.)"""
    ranks = torch.argsort(torch.rand(tokens, experts, generator=gen), dim=1)
    return ((ranks - experts // 2) * (4 / experts)).to(DEVICE, dtype)


CASES = [  # tokens, experts, top_k
    (1, 8, 2),       # T = 1
    (37, 60, 4),     # qwen2_moe's 60 experts: not a power of 2
    (50, 128, 8),    # qwen3_moe
    (33, 32, 4),     # gpt-oss, rows not a multiple of the block's
    (5, 3, 3),       # every expert chosen
    (70, 256, 1),    # k = 1
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens, experts, top_k", CASES)
def test_forward_and_backward_match_float64_and_transformers_choice(dtype, normalize, tokens, experts, top_k):
    gen = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = distinct_logits(tokens, experts, dtype, gen).requires_grad_()
    weights, ids = router_topk(logits, top_k, normalize=normalize)
    want_weights, want_ids = transformers_router(logits.detach(), top_k, normalize, dtype)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and weights.shape == (tokens, top_k)
    assert torch.equal(ids, want_ids)  # the same experts, in the same order
    logits64, ref = reference(logits, ids, normalize)
    assert relative(weights, ref) < RTOL[dtype]
    assert relative(weights, want_weights) < 2 * RTOL[dtype]
    grad = torch.randn(tokens, top_k, generator=gen).to(DEVICE, dtype)
    (d_logits,) = torch.autograd.grad(weights, logits, grad)
    (d_ref,) = torch.autograd.grad(ref, logits64, grad.double())
    assert d_logits.dtype == dtype and relative(d_logits, d_ref) < RTOL[dtype]
    if normalize:  # only the chosen experts' logits move the normalised weights
        unchosen = torch.ones_like(d_logits, dtype=torch.bool).scatter_(1, ids, False)
        assert not d_logits[unchosen].any()


TIES = [[0.5, 2.0, 1.0, 2.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]


def test_ties_choose_the_lower_expert():
    """Equal logits (not rare in bf16, 8 bits of mantissa) go to the lower expert id, in order of falling logit,
    lower id first among equals."""
    logits = torch.tensor(TIES, device=DEVICE)
    weights, ids = router_topk(logits, 3, normalize=True)
    assert ids.tolist() == [[1, 3, 2], [0, 1, 2]]
    assert torch.allclose(weights[1], torch.full((3,), 1 / 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_choose_the_experts_torch_topk_chooses_on_cuda(dtype):
    """torch.topk on CUDA takes the values above the k-th, then the k-th value's first ids (its gather kernel); its
    CPU kernel chooses others. The chosen sets agree (their order among equal values is torch's sort's)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.tensor(TIES), (torch.randn(4000, 6, generator=gen) * 4).round() / 4]).to("cuda", dtype)
    _, ids = router_topk(logits, 3, normalize=True)
    _, want = transformers_router(logits, 3, True, dtype)
    assert torch.equal(ids.sort(dim=1).values, want.sort(dim=1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("experts, top_k", [(128, 8), (32, 4)])  # Qwen3-30B-A3B, gpt-oss-20b
def test_real_router_in_bf16_against_transformers_ops(experts, top_k):
    """8192 tokens of bf16 logits from a router Linear: ties at the k-th place happen here, and the chosen sets must
    still be torch's; weights within one bf16 rounding, d logits against float64."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 2048, generator=gen).to("cuda", torch.bfloat16)
    weight = (torch.randn(experts, 2048, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    logits = torch.nn.functional.linear(x, weight).requires_grad_()
    weights, ids = router_topk(logits, top_k, normalize=True)
    want_weights, want_ids = transformers_router(logits.detach(), top_k, True, torch.bfloat16)
    assert torch.equal(ids.sort(dim=1).values, want_ids.sort(dim=1).values)
    order = ids.argsort(dim=1)  # compare weights expert by expert (torch's order among equal values is its sort's)
    got = weights.gather(1, order)
    want = want_weights.gather(1, want_ids.argsort(dim=1))
    assert relative(got, want.float()) < RTOL[torch.bfloat16]
    logits64, ref = reference(logits, ids, True)
    grad = torch.randn(8192, top_k, generator=gen).to("cuda", torch.bfloat16)
    (d_logits,) = torch.autograd.grad(weights, logits, grad)
    (d_ref,) = torch.autograd.grad(ref, logits64, grad.double())
    assert relative(d_logits, d_ref) < RTOL[torch.bfloat16]


def test_mixtral_keeps_fp32_weights_of_half_logits():
    logits = torch.randn(9, 8, device=DEVICE, dtype=torch.float16)
    weights, ids = router_topk(logits, 2, normalize=True, out_dtype=torch.float32)
    want_weights, want_ids = transformers_router(logits, 2, True, torch.float32)
    assert weights.dtype == torch.float32 and torch.equal(ids, want_ids)
    assert relative(weights, want_weights) < 1e-6


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max of a NaN row
def test_nan_and_minus_inf_rows_still_give_k_different_experts():
    """A NaN hidden state makes a row of NaN logits: valid experts (NaN first, as torch.topk orders it) and NaN
    weights, as transformers gives, instead of ids out of range. -inf logits: still k different experts."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan] * 4, [0.5, nan, 1.0, 2.0], [-inf, -inf, 1.0, -inf]], device=DEVICE)
    weights, ids = router_topk(logits, 3, normalize=True)
    assert ids.tolist()[0] == [0, 1, 2] and ids.tolist()[1] == [1, 3, 2] and ids.tolist()[2] == [2, 0, 1]
    assert weights[:2].isnan().all()
    assert weights[2].tolist() == [1.0, 0.0, 0.0]


def test_no_tokens():
    logits = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    weights, ids = router_topk(logits, 4, normalize=True)
    assert weights.shape == ids.shape == (0, 4)
    (d_logits,) = torch.autograd.grad(weights.sum(), logits, allow_unused=True)
    assert d_logits is None or d_logits.shape == (0, 16)  # (autograd may skip a graph over no elements)


@pytest.mark.parametrize(
    "logits, top_k, match",
    [
        (torch.randn(4, 8, 2), 2, "logits"),
        (torch.randn(4, 8, dtype=torch.float64), 2, "logits"),
        (torch.randn(4, 2000), 2, "experts"),
        (torch.randn(4, 8), 9, "top_k"),
        (torch.randn(4, 8), 0, "top_k"),
        (torch.randn(4, 8), True, "top_k"),
    ],
)
def test_bad_input_is_named(logits, top_k, match):
    with pytest.raises(ValueError, match=match):
        router_topk(logits.to(DEVICE), top_k, normalize=True)


def test_the_kernels_compile_for_hopper_without_spilling():
    """Compiled offline for sm90 (no GPU needed) at every router width moetune's models have: an expert count that
    is not a multiple of 16 as a runtime value had spilled (60 experts, k = 8: 253 registers); E is a constexpr."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_router_topk.py")
    sys.path.insert(0, str(script.parent))
    from compile_router_topk import CASES, SIGMOID_CASES, ptxas_available

    if not ptxas_available():
        pytest.skip("this Triton has no NVIDIA compiler backend and ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * len(CASES) + 2 * len(SIGMOID_CASES)  # the sigmoid routers' kernels too
    # 168 registers a thread: three 4-warp programs an SM at least (65536 registers); measured <= 148
    assert all(row["spilled"] == 0 and row["registers"] <= 168 for row in rows), rows
