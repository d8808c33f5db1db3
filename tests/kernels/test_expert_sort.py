"""The routing plan's counting sort (kernels/expert_sort.py) against torch's stable sort (plan_routing's CPU path):
the same plan exactly. Triton's interpreter on CPU, the GPU when there is one (real routing shapes too)."""

from __future__ import annotations

import importlib

import pytest
import torch

from moetune.experts import routing
from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
FIELDS = ("perm_S", "inv_perm_S", "token_S", "expert_S", "counts_E", "offsets_E")


def expert_sort(ids, num_experts):
    from moetune.kernels.expert_sort import expert_sort

    return expert_sort(ids, num_experts)


def torch_plan(ids, num_experts):
    return routing.plan_routing(ids.cpu(), num_experts)  # the CPU path: torch's stable sort


def routed(num_tokens, top_k, num_experts, seed=0, only=None):
    """Top-k ids as a router makes them (k distinct experts per token), or every pair on the experts in `only`."""
    gen = torch.Generator().manual_seed(seed)
    if only is not None:
        choice = torch.tensor(only)[torch.randint(len(only), (num_tokens, top_k), generator=gen)]
        return choice.to(DEVICE)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    return scores.topk(top_k, dim=1).indices.to(DEVICE)


def assert_same_plan(ids, num_experts):
    """The same plan as torch's sort, and with it grouped_gemm's tile schedules for every BLOCK_M it keeps (the
    ones tile_schedule would compute from the counts with torch ops)."""
    gg = importlib.import_module("moetune.kernels.grouped_gemm")  # moetune.kernels.grouped_gemm is the function
    got, want = expert_sort(ids, num_experts), torch_plan(ids, num_experts)
    for name, tensor in zip(FIELDS, got):
        expected = getattr(want, name)
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor.cpu(), expected), name
    counts_E = got[4]
    version, kept = counts_E.__dict__["_moetune_tile_ends"]
    assert version == gg._version(counts_E)
    assert sorted(kept) == sorted(gg.TILE_BLOCKS)
    for block_m in gg.TILE_BLOCKS:
        expected = torch.cumsum((want.counts_E + block_m - 1) // block_m, 0).to(torch.int32)
        assert gg.tile_schedule(counts_E, block_m) is kept[block_m]
        assert kept[block_m].dtype == torch.int32 and torch.equal(kept[block_m].cpu(), expected), block_m


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [
    (1, 1, 1),        # T = 1, one expert
    (1, 8, 128),      # T = 1 at Qwen3's routing: 120 experts get nothing
    (37, 3, 5),       # pairs not a multiple of the block
    (50, 4, 60),      # E not a power of two (Qwen2-MoE)
    (700, 4, 16),     # few experts over several blocks (1024 pairs a block at E = 16)
    (40, 8, 256),     # DeepSeek-V3's 256 experts: smaller blocks
    (300, 2, 1000),   # many expert groups in the offsets kernel, the last one partial
    (2100, 2, 1000),  # more blocks (16 pairs each) than the offsets kernel's chunk: its loop carries across chunks
    (20, 1, 1024),    # the largest E the counting sort takes
])
def test_same_plan_as_torchs_stable_sort(num_tokens, top_k, num_experts):
    assert_same_plan(routed(num_tokens, top_k, num_experts), num_experts)


def test_one_expert_takes_every_pair_and_the_rest_are_empty():
    assert_same_plan(routed(70, 2, 16, only=[11]), 16)
    assert_same_plan(routed(70, 2, 16, only=[0, 15]), 16)
    assert_same_plan(routed(1500, 2, 16, only=[15]), 16)  # across three blocks


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_any_integer_dtype(dtype):
    assert_same_plan(routed(33, 4, 24).to(dtype), 24)


def test_uint8_ids_with_256_experts_ending_mid_block():
    """The lanes past the last pair must not count: loaded as -1 they read 255 in uint8, an expert here."""
    assert_same_plan(routed(75, 4, 256).to(torch.uint8), 256)  # 300 pairs, blocks of 64


def test_strided_ids():
    ids = routed(33, 4, 24)
    transposed = ids.t().contiguous().t()  # [T, K] with strides (1, T): reshape copies
    assert not transposed.is_contiguous()
    assert_same_plan(transposed, 24)
    wide = routed(33, 8, 24)
    assert_same_plan(wide[:, :1], 24)  # a [T, 1] column of a [T, 8] tensor: reshape gives a strided view
    assert_same_plan(wide[:, ::2], 24)


def test_no_pairs():
    perm, inv_perm, token, expert, counts, offsets = expert_sort(routed(0, 4, 8), 8)
    assert perm.numel() == inv_perm.numel() == token.numel() == expert.numel() == 0
    assert counts.tolist() == [0] * 8 and offsets.tolist() == [0] * 8


def test_out_of_range_ids_are_left_out_and_nothing_is_written_past_the_ends():
    """moe_experts stops on such ids (plan_routing asserts on the device that the counts add up to every pair); the
    kernels must still stay in bounds and leave the valid pairs' plan as torch would make it without the bad pairs."""
    ids = routed(40, 2, 8)
    ids[3, 1], ids[17, 0], ids[25, 1] = 8, -1, 2**32 + 3  # the last must not wrap into range as an int32
    perm, inv_perm, token, expert, counts, offsets = expert_sort(ids, 8)
    flat = ids.reshape(-1).cpu()
    good = (flat >= 0) & (flat < 8)
    assert counts.sum().item() == good.sum().item() == offsets[-1].item()
    assert torch.equal(counts.cpu(), torch.bincount(flat[good], minlength=8))
    rows = int(good.sum())
    want = torch.sort(flat[good], stable=True)
    assert torch.equal(expert[:rows].cpu(), want.values)
    assert torch.equal(perm[:rows].cpu(), good.nonzero().squeeze(1)[want.indices])


def test_rows_of_one_expert_keep_token_order():
    ids = routed(200, 4, 8, seed=3)
    perm, _, token, expert, counts, offsets = expert_sort(ids, 8)
    assert torch.equal(offsets.long().cpu(), counts.cpu().cumsum(0))
    for e in range(8):
        rows = (expert == e).nonzero().squeeze(1)
        assert torch.equal(token[rows].cpu(), token[rows].cpu().sort().values)
        assert torch.equal(perm[rows].cpu(), perm[rows].cpu().sort().values)


@pytest.mark.parametrize("num_experts", [0, 1025, 2.0, True])
def test_expert_counts_it_does_not_take_are_refused(num_experts):
    with pytest.raises(ValueError, match="num_experts: expected an integer from 1 to 1024"):
        expert_sort(routed(4, 1, 2), num_experts)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(8192, 8, 128), (16384, 4, 32), (16384, 4, 64),
                                                          (32768, 8, 128)])
def test_real_routing_shapes_and_plan_routing_takes_it(num_tokens, top_k, num_experts):
    ids = routed(num_tokens, top_k, num_experts, seed=1)
    assert_same_plan(ids, num_experts)
    plan = routing.plan_routing(ids, num_experts)  # on CUDA: the counting sort
    want = torch_plan(ids, num_experts)
    for name in FIELDS:
        assert torch.equal(getattr(plan, name).cpu(), getattr(want, name)), name


@pytest.mark.gpu
def test_plan_routing_takes_torchs_sort_beyond_the_counting_sorts_experts():
    ids = routed(64, 2, 2048, seed=2)
    assert routing._counting_sort(ids.device, 2048) is None
    assert routing._counting_sort(ids.device, 128) is not None
    plan, want = routing.plan_routing(ids, 2048), torch_plan(ids, 2048)
    for name in FIELDS:
        assert torch.equal(getattr(plan, name).cpu(), getattr(want, name)), name


def test_plan_routing_checks_the_ids_through_the_counting_sort(monkeypatch):
    """Where the counting sort runs, plan_routing checks the ids itself (its rows add up to every pair only when all
    are in range) and check_inputs leaves them to it. Run on CPU here by standing in for the CUDA condition: the
    device assert then raises at once, with check_inputs' message."""
    from moetune.experts import moe_experts, validation
    from moetune.kernels.expert_sort import expert_sort
    from moetune.kernels.grouped_gemm import TILE_BLOCKS

    ids = routed(40, 2, 6).cpu()
    want = torch_plan(ids, 6)  # before the stand-ins: torch's sort
    monkeypatch.setattr(routing, "_checking_sort",
                        lambda ids, num_experts: (expert_sort, len(TILE_BLOCKS)) if ids.numel() else None)
    plan = routing.plan_routing(ids, 6)
    assert all(torch.equal(getattr(plan, name).cpu(), getattr(want, name)) for name in FIELDS)
    aminmax = []
    monkeypatch.setattr(validation.torch, "aminmax", lambda t: aminmax.append(t) or (t.min(), t.max()))
    x, w = torch.randn(40, 8), torch.rand(40, 2)
    gate_up, down = torch.randn(6, 2 * 4, 8), torch.randn(6, 8, 4)
    for bad in (6, -1):
        wrong = ids.clone()
        wrong[7, 1] = bad
        with pytest.raises(RuntimeError, match=r"topk_ids: expected expert ids in \[0, 5\]"):
            moe_experts(x, wrong, w, gate_up, down, backend="native")
    assert aminmax == []  # the ids were left to the plan


def test_ids_that_are_not_integer_pairs_are_refused_in_one_line():
    ids = routed(4, 2, 3)
    for bad in (ids.reshape(-1), ids.float(), ids.bool()):
        with pytest.raises(ValueError, match=r"^topk_ids: expected integer ids of shape \[T, K\]"):
            expert_sort(bad, 3)


def test_a_numpy_or_tensor_integer_expert_count_is_taken():
    import numpy as np

    ids = routed(6, 2, 3)
    assert_same_plan(ids, np.int64(3))
    assert_same_plan(ids, torch.tensor(3))


def test_plans_made_under_inference_mode():
    ids = routed(9, 2, 5)
    with torch.inference_mode():
        assert_same_plan(ids, 5)


def test_the_plan_in_one_buffer_and_rebuilt_from_it_keeps_its_tile_schedules(monkeypatch):
    """plan_routing's counting sort writes into the plan's one buffer (a backward saves it as one tensor); the plan
    a backward rebuilds from that buffer gives grouped_gemm the tile schedules the sort wrote, not four torch ops."""
    from moetune.kernels.expert_sort import expert_sort
    from moetune.kernels.grouped_gemm import TILE_BLOCKS

    gg = importlib.import_module("moetune.kernels.grouped_gemm")
    ids = routed(45, 3, 7).cpu()
    want = torch_plan(ids, 7)
    monkeypatch.setattr(routing, "_checking_sort", lambda ids, num_experts: (expert_sort, len(TILE_BLOCKS)))
    plan = routing.plan_routing(ids, 7)
    rebuilt = plan.layout.plan(plan.buffer.clone())
    expected = {b: torch.cumsum((want.counts_E + b - 1) // b, 0).to(torch.int32) for b in TILE_BLOCKS}
    computed, cumsum = [], torch.cumsum
    monkeypatch.setattr(gg.torch, "cumsum", lambda *a, **k: computed.append(a) or cumsum(*a, **k))
    for got in (plan, rebuilt):
        assert all(torch.equal(getattr(got, name), getattr(want, name)) for name in FIELDS)
        assert got.counts_E.untyped_storage().data_ptr() == got.buffer.untyped_storage().data_ptr()
        for block_m in TILE_BLOCKS:
            assert torch.equal(gg.tile_schedule(got.counts_E, block_m), expected[block_m]), block_m
    assert computed == []


def test_out_that_does_not_fit_is_refused_in_one_line():
    from moetune.kernels.expert_sort import expert_sort

    ids = routed(5, 2, 3)
    layout = routing.PlanLayout(5, 2, 3, 5)
    good = layout.views(layout.new_buffer(ids.device))
    with pytest.raises(ValueError, match=r"^out: expected \(perm_S, "):
        expert_sort(ids, 3, out=good[:6])
    with pytest.raises(ValueError, match=r"^out\[1\]: expected a contiguous torch.int64 tensor of shape \[10\]"):
        expert_sort(ids, 3, out=(good[0], good[1][:9], *good[2:]))
    with pytest.raises(ValueError, match=r"^out\[6\]: expected int32 tile schedules of shape \[5, >= 3\]"):
        expert_sort(ids, 3, out=(*good[:6], good[6][:4]))
    assert all(torch.equal(a, b) for a, b in zip(expert_sort(ids, 3, out=good), expert_sort(ids, 3)))
