"""ExpertLoad: the router's choices counted per layer on the device, padding weighed out, with no host read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moetune.training.metrics import ExpertLoad


class Experts(nn.Module):
    """What ExpertLoad hooks: an experts module called as (hidden, top_k_index, top_k_weights)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2, 2), requires_grad=False)

    def forward(self, hidden, top_k_index, top_k_weights):
        return hidden


def _layers(device, num_experts=5, count=2):
    return {f"model.layers.{i}.mlp.experts": Experts(num_experts).to(device) for i in range(count)}


def _check_counts(device):
    torch.manual_seed(0)
    experts = _layers(device)
    load = ExpertLoad(experts, torch.device(device))
    tokens, k = 7, 3
    index = torch.randint(0, 5, (tokens, k), device=device)
    index[:, 0] = 4  # an expert that every token picks, and (with 5 experts and 21 picks) maybe one that none does
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool, device=device)  # two padding tokens
    hidden = torch.zeros(tokens, 2, device=device)
    load.token_mask = mask
    experts["model.layers.0.mlp.experts"](hidden, index, torch.ones(tokens, k, device=device))
    load.token_mask = None  # unmasked: every token counts
    experts["model.layers.1.mlp.experts"](hidden, top_k_index=index, top_k_weights=torch.ones(tokens, k, device=device))
    expected = torch.stack([
        torch.bincount(index[:5].reshape(-1).cpu(), minlength=5).double(),
        torch.bincount(index.reshape(-1).cpu(), minlength=5).double(),
    ])
    torch.testing.assert_close(load.counts.cpu(), expected, rtol=0, atol=0)
    shares = load.take()
    torch.testing.assert_close(torch.tensor(shares, dtype=torch.float64), expected / expected.sum(1, keepdim=True))
    assert load.counts.abs().sum() == 0  # take() resets
    load.remove()


def test_counts_each_layers_choices_and_weighs_out_padding():
    _check_counts("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counts_on_cuda_without_a_host_read():
    _check_counts("cuda")  # the same counts
    experts = _layers("cuda")
    load = ExpertLoad(experts, torch.device("cuda"))
    index = torch.randint(0, 5, (9, 2), device="cuda")
    load.token_mask = torch.ones(9, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any wait for the GPU inside the hook raises (CUDA's bincount did)
    try:
        for module in experts.values():
            module(torch.zeros(9, 2, device="cuda"), index, torch.ones(9, 2, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert load.counts.sum().item() == 2 * 9 * 2
