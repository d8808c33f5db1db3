"""Resume refuses a run whose settings would not continue the saved one (the CLI cases are in test_train_cli.py)."""

from __future__ import annotations

import os

import pytest
import torch

from moetune.training.checkpoint import RESUME_KEYS, load_checkpoint


def test_resume_refuses_another_optimizer(tmp_path):
    """AdamW and 8-bit AdamW states do not load into each other: a changed --optim is refused up front."""
    assert "optim" in RESUME_KEYS
    torch.save({"settings": {"optim": "adamw", "r": 16}}, os.path.join(tmp_path, "state.pt"))
    with pytest.raises(ValueError, match="was trained with --optim 'adamw', this run has 'adamw_8bit'"):
        load_checkpoint(str(tmp_path), None, None, None, {"optim": "adamw_8bit", "r": 16})


@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_checkpoints_from_before_the_per_adapter_expert_lora_still_resume(tmp_path):
    """Expert LoRA factors were parameters of the experts module (`...experts.lora_A_gate_up`) before they were held
    per adapter (`...experts.lora_A_gate_up.default.weight`). The optimizer's state loads by position, so the
    trainable parameters must come in the order the old layout listed them (each experts module's own parameters,
    then its factors), and an old checkpoint's values and moments must land on the same tensors."""
    from moetune import FastMoEModel
    from moetune.models.hook import LORA_PARAMS
    from moetune.training.checkpoint import save_checkpoint, trainable_state

    from ..models.helpers import save_checkpoint as save_model

    model_dir = save_model("qwen3_moe", str(tmp_path / "model"))

    def build():
        model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
        model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, train_router=True, random_state=0,
                                            use_gradient_checkpointing=False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.1)
        return model, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, params, optimizer, scheduler = build()
    old_names = []  # the old layout's order: a module's own parameters, then (experts) its four factors
    for prefix, module in model.named_modules():
        if any(f".{n}." in f"{prefix}." for n in LORA_PARAMS):  # the new layout's factor modules: listed below
            continue
        old_names += [f"{prefix}.{n}" for n, p in module._parameters.items() if p is not None and p.requires_grad]
        old_names += [f"{prefix}.{n}" for n in LORA_PARAMS if n in module._modules]
    old_of = {f"{n}.default.weight": n for n in old_names if n.rsplit(".", 1)[-1] in LORA_PARAMS}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    experts = sum(1 for m in model.modules() if LORA_PARAMS[0] in m._modules)
    assert [old_of.get(n, n) for n in names] == old_names and len(old_of) == experts * len(LORA_PARAMS) > 0
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    out = str(tmp_path / "run")
    settings = dict.fromkeys(RESUME_KEYS)
    path = save_checkpoint(out, 1, model, optimizer, scheduler, 1, settings)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    state["trainable"] = {old_of.get(n, n): v for n, v in trainable_state(model).items()}  # as the old layout wrote
    torch.save(state, os.path.join(path, "state.pt"))

    fresh, fresh_params, fresh_optimizer, fresh_scheduler = build()
    assert load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, settings) == 1
    for old, new in zip(params, fresh_params):
        assert torch.equal(old, new)
        assert torch.equal(optimizer.state[old]["exp_avg"], fresh_optimizer.state[new]["exp_avg"])
