"""grouped_mm backend internals: the padded grouped GEMM primitives and what backward keeps alive."""

from __future__ import annotations

import pytest
import torch

from moetune.experts import moe_experts, plan_routing
from moetune.experts.backends.grouped_mm import gmm, gmm_wgrad
from moetune.experts.routing import PlanLayout

from .cases import Case, make_problem


@pytest.mark.parametrize("K, N", [(16, 8), (19, 13), (3, 1), (1, 5)])  # aligned, odd, rank-like, rank 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gmm_any_width(K, N, dtype):
    ids = torch.tensor([[2], [0], [2], [2], [3]])  # expert 1 empty
    plan = plan_routing(ids, 4)
    a = torch.randn(5, K, dtype=dtype)
    b = torch.randn(4, N, K, dtype=dtype).transpose(1, 2)  # column-major view, as the backend passes W^T
    out = gmm(a, b, plan.offsets_E)
    expert = plan.expert_S
    ref = torch.stack([a[i].double() @ b[expert[i]].double() for i in range(5)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("M, N", [(16, 8), (7, 3)])
def test_gmm_wgrad_zero_for_empty_experts(M, N):
    ids = torch.tensor([[2, 0], [0, 2], [2, 0]])  # experts 1 and 3 receive no rows
    plan = plan_routing(ids, 4)
    a, b = torch.randn(6, M), torch.randn(6, N)
    out = gmm_wgrad(a, b, plan)
    assert out.shape == (4, M, N)
    for e in range(4):
        rows = plan.expert_S == e
        torch.testing.assert_close(out[e], a[rows].T @ b[rows], rtol=1e-5, atol=1e-5)
    assert out[1].abs().sum() == 0 and out[3].abs().sum() == 0


def test_backward_keeps_no_token_sized_copies():
    """Saved for backward: gu [S, 2I], the two [S, r] LoRA inputs and the routing plan's one int64 buffer (four [S]
    index arrays and per-expert counts); no [S, H] tensor, no weight copy."""
    case = Case(E=8, k=4, H=64, I=32, r=8, T=40)
    args, kwargs, _ = make_problem(case, torch.float32, seed=0)
    x, ids, w, gate_up, down = args
    inputs = {t.data_ptr() for t in (x, w, gate_up, down, *kwargs["lora"].factors())}
    saved = []

    def pack(t):
        if t.data_ptr() not in inputs:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe_experts(*args, **kwargs, backend="grouped_mm")
    S = case.T * case.k
    plan = (PlanLayout(case.T, case.k, case.E).size,)
    assert sorted(saved) == sorted([(S, 2 * case.I), (S, case.r), (S, case.r), plan]), saved
