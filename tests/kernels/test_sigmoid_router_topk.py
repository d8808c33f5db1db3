"""The fused sigmoid router top-k (DeepSeek-V3, GLM) against transformers' routers' ops and a float64 reference.

Triton's interpreter on CPU (fp32 / fp16), the GPU when there is one (bf16 too).
"""

from __future__ import annotations

import pytest
import torch

from .router_checks import DEVICE, DTYPES, RTOL, needs_triton, relative

pytestmark = needs_triton


def sigmoid_router_topk(*args, **kwargs):
    from moetune.kernels.sigmoid_router_topk import sigmoid_router_topk

    return sigmoid_router_topk(*args, **kwargs)


def transformers_router(logits, bias, top_k, groups, topk_groups, normalize, scale):
    """What DeepseekV3TopkRouter.forward computes after its Linear (transformers 5.17 - 5.25, the same body in
    glm4_moe and glm4_moe_lite)."""
    num_experts = logits.shape[1]
    scores = logits.sigmoid()
    scores_for_choice = scores + bias
    group_scores = scores_for_choice.view(-1, groups, num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if normalize:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    return topk_weights * scale, topk_indices


def reference(logits, ids, normalize, scale):
    """float64 weights of the given experts, differentiable in the logits: the router's arithmetic done exactly, from
    the sigmoid as transformers has it (rounded to the logits' dtype), whose derivative s (1 - s) it takes too."""
    logits64 = logits.detach().double().requires_grad_()
    s = torch.sigmoid(logits.detach()).double()
    s = s + (logits64 - logits64.detach()) * s * (1 - s)  # the value s, the gradient s (1 - s)
    chosen = s.gather(1, ids)
    weights = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) if normalize else chosen
    return logits64, weights * scale




def by_expert(weights, ids):
    """(ids sorted, weights in that order): the choice as a set (transformers' top-k order is its kernel's)."""
    order = ids.argsort(dim=1)
    return ids.gather(1, order), weights.gather(1, order)


def distinct_scores(tokens, experts, dtype, gen):
    """Logits whose sigmoid plus the bias below has no ties, also per group sum (a shuffle of spaced values)."""
    ranks = torch.argsort(torch.rand(tokens, experts, generator=gen), dim=1).double()
    return ((ranks - experts / 2) * (6 / experts) + 0.01).to(DEVICE, dtype)


CASES = [  # tokens, experts, top_k, groups, topk_groups
    (1, 8, 2, 1, 1),        # T = 1
    (37, 64, 4, 1, 1),      # GLM-4.7-Flash
    (20, 160, 8, 1, 1),     # GLM-4.5: 160 experts, not a power of 2
    (50, 256, 8, 8, 4),     # DeepSeek-V3
    (33, 12, 3, 4, 2),      # groups of 3, not a power of 2
    (9, 6, 6, 3, 3),        # every expert chosen
    (70, 32, 1, 4, 1),      # k = 1, one group
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens, experts, top_k, groups, topk_groups", CASES)
def test_forward_and_backward_match_transformers_choice_and_float64(dtype, normalize, tokens, experts, top_k, groups,
                                                                    topk_groups):
    gen = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = distinct_scores(tokens, experts, dtype, gen).requires_grad_()
    bias = (torch.rand(experts, generator=gen) * 0.5).to(DEVICE)  # moves the choice, not the weights
    scale = 2.5
    weights, ids = sigmoid_router_topk(logits, bias, top_k, num_groups=groups, topk_groups=topk_groups,
                                       normalize=normalize, scale=scale)
    want_weights, want_ids = transformers_router(logits.detach(), bias, top_k, groups, topk_groups, normalize, scale)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and weights.shape == (tokens, top_k)
    got_ids, got_sorted = by_expert(weights, ids)
    want_sorted_ids, want_sorted = by_expert(want_weights, want_ids)
    assert torch.equal(got_ids, want_sorted_ids)  # the same experts
    choice = (torch.sigmoid(logits.detach()) + bias).gather(1, ids)
    assert torch.all(choice[:, :-1] >= choice[:, 1:])  # in order of falling choice score
    logits64, ref = reference(logits, ids, normalize, scale)
    assert relative(weights, ref) < RTOL[dtype]
    assert relative(got_sorted, want_sorted) < 2 * RTOL[dtype]
    grad = torch.randn(tokens, top_k, generator=gen).to(DEVICE, dtype)
    (d_logits,) = torch.autograd.grad(weights, logits, grad)
    (d_ref,) = torch.autograd.grad(ref, logits64, grad.double())
    assert d_logits.dtype == dtype and relative(d_logits, d_ref) < RTOL[dtype]
    unchosen = torch.ones_like(d_logits, dtype=torch.bool).scatter_(1, ids, False)
    assert not d_logits[unchosen].any()  # only the chosen experts' logits move the weights


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_half_logits_choose_as_transformers_sigmoid_in_their_dtype(dtype):
    """Under autocast the router's Linear gives half logits and transformers' sigmoid rounds to their dtype before the
    fp32 bias is added: near-equal scores order by the rounded values (an fp32 sigmoid chose other experts for 11 of
    512 tokens here)."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(512, 64, generator=gen) * 0.5).to(DEVICE, dtype)
    bias = (torch.rand(64, generator=gen) * 1e-3).to(DEVICE)  # small: the rounding of s decides the order
    _, ids = sigmoid_router_topk(logits, bias, 6, num_groups=4, topk_groups=2, scale=2.5)
    _, want = transformers_router(logits, bias, 6, 4, 2, True, 2.5)
    assert torch.equal(ids.sort(dim=1).values, want.sort(dim=1).values)


def test_ties_choose_the_lower_id_for_groups_and_experts():
    """Equal scores (groups or experts) go to the lower id, as torch.topk's CUDA kernel chooses the k-th value's."""
    logits = torch.zeros(1, 8, device=DEVICE)  # every score 0.5: groups of 2 tie, experts tie
    weights, ids = sigmoid_router_topk(logits, None, 3, num_groups=4, topk_groups=2, normalize=True)
    assert ids.tolist() == [[0, 1, 2]]
    assert torch.allclose(weights, torch.full((1, 3), 1 / 3, device=DEVICE))


def test_the_bias_moves_the_choice_and_the_groups_limit_it():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 2.0, -1.0]], device=DEVICE)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 3.0], device=DEVICE)
    _, ids = sigmoid_router_topk(logits, bias, 2)
    assert ids.tolist() == [[5, 3]]  # biased: expert 5 first, expert 4 below 3
    _, ids = sigmoid_router_topk(logits, bias, 2, num_groups=3, topk_groups=1)
    assert ids.tolist() == [[5, 4]]  # group (4, 5) scores highest; only its experts are left


def test_nan_rows_still_give_k_different_experts_in_range():
    nan = float("nan")
    logits = torch.tensor([[nan] * 4, [0.5, nan, 1.0, 2.0]], device=DEVICE)
    weights, ids = sigmoid_router_topk(logits, None, 3, num_groups=2, topk_groups=2)
    assert ids.tolist()[0] == [0, 1, 2] and ids.tolist()[1] == [1, 3, 2]
    assert weights.isnan().all()


def test_no_tokens():
    logits = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    weights, ids = sigmoid_router_topk(logits, None, 4)
    assert weights.shape == ids.shape == (0, 4)


@pytest.mark.parametrize(
    "shape, dtype, kwargs, match",
    [
        ((4, 8, 2), torch.float32, dict(top_k=2), r"^logits: expected a float \[T, E\]"),
        ((4, 8), torch.float64, dict(top_k=2), r"^logits: expected a float"),
        ((4, 2000), torch.float32, dict(top_k=2), r"^logits: expected 1 to 1024 experts"),
        ((4, 8), torch.float32, dict(top_k=0), r"^top_k: expected a positive integer"),
        ((4, 8), torch.float32, dict(top_k=2, num_groups=3), r"^num_groups: expected a divisor of the 8 experts"),
        ((4, 8), torch.float32, dict(top_k=2, num_groups=8), r"^num_groups: expected groups of 2 experts or more"),
        ((4, 8), torch.float32, dict(top_k=2, num_groups=2, topk_groups=3), r"^topk_groups: expected at most"),
        ((4, 8), torch.float32, dict(top_k=5, num_groups=2, topk_groups=1), r"^top_k: expected at most the 4 experts"),
        ((4, 8), torch.float32, dict(top_k=2, bias=torch.zeros(7)), r"^bias: expected a float \[8\] tensor"),
    ],
)
def test_bad_input_is_named(shape, dtype, kwargs, match):
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    with pytest.raises(ValueError, match=match):
        sigmoid_router_topk(torch.randn(*shape, dtype=dtype).to(DEVICE), bias, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("experts, top_k, groups, topk_groups", [(64, 4, 1, 1), (256, 8, 8, 4), (160, 8, 1, 1)])
def test_real_router_logits_against_transformers_ops(experts, top_k, groups, topk_groups):
    """8192 tokens through an fp32 router Linear of bf16 hidden states, as transformers computes them: the same
    experts chosen, weights and d logits within fp32 rounding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 2048, generator=gen).to("cuda", torch.bfloat16)
    weight = (torch.randn(experts, 2048, generator=gen) * 0.02).to("cuda")
    bias = (torch.rand(experts, generator=gen) * 0.1).to("cuda")
    logits = torch.nn.functional.linear(x.float(), weight).requires_grad_()
    weights, ids = sigmoid_router_topk(logits, bias, top_k, num_groups=groups, topk_groups=topk_groups, scale=1.8)
    want_weights, want_ids = transformers_router(logits.detach(), bias, top_k, groups, topk_groups, True, 1.8)
    got_ids, got = by_expert(weights, ids)
    want_sorted_ids, want = by_expert(want_weights, want_ids)
    assert torch.equal(got_ids, want_sorted_ids)
    assert relative(got, want) < 1e-6
    logits64, ref = reference(logits, ids, True, 1.8)
    grad = torch.randn(8192, top_k, generator=gen).to("cuda")
    (d_logits,) = torch.autograd.grad(weights, logits, grad)
    (d_ref,) = torch.autograd.grad(ref, logits64, grad.double())
    assert relative(d_logits, d_ref) < 1e-5
