"""make_optimizer: torch's AdamW, fused on CUDA (no step-sized temporary), the default elsewhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moetune.training.loop import make_optimizer

CONFIG = SimpleNamespace(optim="adamw", lr=1e-3, weight_decay=0.01, step_in_backward=False)


def test_adamw_on_cpu_is_torchs_default():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    optimizer = make_optimizer(iter(params), CONFIG)  # any iterable of parameters
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    assert optimizer.param_groups[0]["params"] == params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_on_cuda_is_fused_and_steps_like_the_default():
    torch.manual_seed(0)
    weights = torch.randn(64, 32, device="cuda")
    grads = [torch.randn(64, 32, device="cuda") for _ in range(3)]
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(weights.clone())
        optimizer = make_optimizer([param], CONFIG) if fused else torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01)
        assert bool(optimizer.defaults["fused"]) == fused
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
