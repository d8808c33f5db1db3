"""Resume refuses a run whose settings would not continue the saved one (the CLI cases are in test_train_cli.py)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from moetune.training.checkpoint import RESUME_KEYS, load_checkpoint


def test_resume_refuses_another_optimizer(tmp_path):
    """AdamW and 8-bit AdamW states do not load into each other: a changed --optim is refused up front."""
    assert "optim" in RESUME_KEYS
    torch.save({"settings": {"optim": "adamw", "r": 16}}, os.path.join(tmp_path, "state.pt"))
    with pytest.raises(ValueError, match="was trained with --optim 'adamw', this run has 'adamw_8bit'"):
        load_checkpoint(str(tmp_path), None, None, None, {"optim": "adamw_8bit", "r": 16})


def test_checkpoints_from_before_the_per_adapter_expert_lora_still_resume(tmp_path):
    """Expert LoRA factors were parameters of the experts module (`...experts.lora_A_gate_up`) before they were held
    per adapter (`...experts.lora_A_gate_up.default.weight`): an older checkpoint's trainable state still loads."""
    from torch import nn

    class Factor(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 3))

    model = nn.Module()
    model.experts = nn.Module()
    model.experts.lora_A_gate_up = nn.ModuleDict({"default": Factor()})
    model.q_proj = nn.Linear(3, 3, bias=False)
    model.q_proj.weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saved = torch.ones(2, 3)
    torch.save({"settings": {}, "trainable": {"experts.lora_A_gate_up": saved}, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "step": 3},
               os.path.join(tmp_path, "state.pt"))
    assert load_checkpoint(str(tmp_path), model, optimizer, scheduler, {}) == 3
    assert torch.equal(model.experts.lora_A_gate_up.default.weight, saved)
