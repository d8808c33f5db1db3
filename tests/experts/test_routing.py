"""The routing plan's one buffer (experts/routing.py): its layout, and that a backend's backward reads the plan from a
saved tensor, so that autograd frees it after backward and checkpointing drops it after the forward."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moetune.experts import ExpertLoRA, api, available_backends, moe_experts, plan_routing
from moetune.experts.routing import PlanLayout


def routed(num_tokens, top_k, num_experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices


@pytest.mark.parametrize("num_tokens,top_k,num_experts,tile_rows", [
    (1, 1, 1, 0), (1, 1, 1, 5), (7, 3, 5, 5), (33, 2, 8, 0), (10, 4, 60, 5), (0, 2, 3, 5),
])
def test_every_part_of_the_buffer_is_its_own_and_starts_on_16_bytes(num_tokens, top_k, num_experts, tile_rows):
    layout = PlanLayout(num_tokens, top_k, num_experts, tile_rows)
    buffer = layout.new_buffer(torch.device("cpu"))
    *parts, tile_ends = layout.views(buffer)
    S, E = num_tokens * top_k, num_experts
    assert [tuple(p.shape) for p in parts] == [(S,)] * 4 + [(E,), (E,)]
    assert [p.dtype for p in parts] == [torch.int64] * 5 + [torch.int32]
    if tile_rows:
        assert tile_ends.dtype == torch.int32 and tile_ends.shape[0] == tile_rows and tile_ends.shape[1] >= E
        assert tile_ends.stride(0) % 4 == 0 and tile_ends.stride(1) == 1
        parts += list(tile_ends.unbind(0))
    else:
        assert tile_ends is None
    for p in parts:
        assert p.is_contiguous() and p.data_ptr() % 16 == 0
        assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    # Each part written with its own number: none overwrites another, and all lie inside the buffer.
    for i, p in enumerate(parts):
        p.fill_(i + 1)
    for i, p in enumerate(parts):
        assert torch.all(p == i + 1), i


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(1, 1, 1), (33, 2, 8), (19, 1, 6), (9, 4, 4)])
def test_the_plan_rebuilt_from_its_buffer_is_the_same_plan(num_tokens, top_k, num_experts):
    ids = routed(num_tokens, top_k, num_experts)
    plan = plan_routing(ids, num_experts)
    again = plan.layout.plan(plan.buffer.clone())  # as a backward gets it: the saved buffer, maybe recomputed
    expert_S, perm_S = torch.sort(ids.reshape(-1), stable=True)
    assert torch.equal(plan.perm_S, perm_S) and torch.equal(plan.expert_S, expert_S)
    assert torch.equal(plan.token_S, perm_S // top_k)
    assert torch.equal(plan.inv_perm_S[perm_S], torch.arange(ids.numel()))
    assert torch.equal(plan.counts_E, torch.bincount(ids.reshape(-1), minlength=num_experts))
    assert plan.offsets_E.dtype == torch.int32 and torch.equal(plan.offsets_E.long(), plan.counts_E.cumsum(0))
    for name in ("perm_S", "inv_perm_S", "token_S", "expert_S", "counts_E", "offsets_E"):
        assert torch.equal(getattr(again, name), getattr(plan, name)), name
    assert (again.num_tokens, again.top_k, again.num_experts) == (num_tokens, top_k, num_experts)


def _problem(backend, seed=0):
    E, k, H, I, r, T = 6, 2, 16, 8, 4, 13
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    ids = routed(T, k, E, seed)
    w = torch.rand(T, k, generator=gen, requires_grad=True)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen) / 4, torch.randn(E, H, I, generator=gen) / 4
    lora = ExpertLoRA.init(E, H, I, r, dtype=torch.float32)
    for f in lora.factors():
        f.data.normal_(generator=gen)

    def block(x, w):
        return moe_experts(x, ids, w, gate_up, down, lora=lora, backend=backend)

    return block, x, w, lora


def _plans_made(monkeypatch):
    """Weak references to the buffer of every plan moe_experts makes from here on."""
    buffers = []

    def recording(topk_ids, num_experts):
        plan = plan_routing(topk_ids, num_experts)
        buffers.append(weakref.ref(plan.buffer))
        return plan

    monkeypatch.setattr(api, "plan_routing", recording)
    return buffers


BACKENDS = [b for b in ("grouped_mm", "triton") if b in available_backends("cpu", torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_frees_the_plan_while_the_graph_lives_on(backend, monkeypatch):
    """The graph outlives backward wherever its output is still referenced (a training loop's `loss` until the next
    forward returns): what a Function keeps on ctx lives as long, its saved tensors do not."""
    block, x, w, lora = _problem(backend)
    buffers = _plans_made(monkeypatch)
    out = block(x, w)
    assert len(buffers) == 1 and buffers[0]() is not None
    out.square().sum().backward(retain_graph=True)  # a second backward reads the plan again
    grads = [t.grad.clone() for t in (x, w, *lora.factors())]
    for t in (x, w, *lora.factors()):
        t.grad = None
    out.square().sum().backward()
    assert all(torch.equal(t.grad, g) for t, g in zip((x, w, *lora.factors()), grads))
    assert buffers[0]() is None
    assert out.grad_fn is not None  # the graph is still there


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_drops_the_plan_after_the_forward_and_backward_reads_the_recomputed_one(backend, monkeypatch):
    block, x, w, lora = _problem(backend)
    want = block(x, w)
    want.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, *lora.factors())]
    for t in (x, w, *lora.factors()):
        t.grad = None

    buffers = _plans_made(monkeypatch)
    out = checkpoint(block, x, w, use_reentrant=False)
    assert len(buffers) == 1 and buffers[0]() is None  # dropped with the forward's saved tensors
    out.square().sum().backward()
    assert len(buffers) == 2 and buffers[1]() is None  # the recompute's, read by backward, freed after it
    assert torch.equal(out, want)
    for t, g in zip((x, w, *lora.factors()), grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-6, atol=1e-6)
