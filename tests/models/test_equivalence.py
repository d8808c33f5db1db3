"""moetune's model == transformers' eager experts + PEFT with the same adapter, for every architecture.

The reference loads the adapter our save_pretrained wrote through plain `peft.PeftModel.from_pretrained`,
so each case also proves the adapter round trip: same logits, same input-embedding gradients and the
same gradient for every LoRA factor (ours converted to PEFT's layout, key by key), fp32.
"""

from __future__ import annotations

import pytest
import torch

from moetune import FastMoEModel
from moetune.adapters import expert_factors_to_peft, expert_peft_keys
from moetune.models.hook import expert_lora

from .helpers import ALL_ARCHS, plain_peft_model, randomize_lora_B, relative_error, token_batch

# fp32, two layers, a few hundred-wide reductions: observed ~1e-7..1e-6; the issue asks for ~1e-4.
RTOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")


def peft_lora_grads(model) -> dict[str, torch.Tensor]:
    """{saved adapter key: grad} of peft's LoRA parameters (adapter name dropped, as in the saved file)."""
    return {
        name.replace(".default", ""): p.grad
        for name, p in model.named_parameters()
        if p.requires_grad and ("lora_A" in name or "lora_B" in name)
    }


def moetune_lora_grads(model) -> dict[str, torch.Tensor]:
    """The same, for moetune's model: Linear LoRA as is, expert LoRA converted to PEFT's layout."""
    grads = {
        name.replace(".default", ""): p.grad
        for name, p in model.named_parameters()
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name)
    }
    for name, module in model.named_modules():
        lora = expert_lora(module)
        if lora is None:
            continue
        pairs = {"gate_up_proj": (lora.A_gate_up, lora.B_gate_up), "down_proj": (lora.A_down, lora.B_down)}
        targets = tuple(k for k, (A, _) in pairs.items() if A is not None)
        for param, (key_A, key_B) in expert_peft_keys(name, targets).items():
            A, B = pairs[param]
            grads[key_A], grads[key_B] = expert_factors_to_peft(A.grad, B.grad)
    return grads


def forward_backward(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    # A loss that weighs every logit differently, so no gradient cancels by symmetry.
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), embeds.grad


@ALL_ARCHS
@pytest.mark.parametrize(
    "targets",
    [
        # the documented default: attention + both expert projections
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
        # experts only, through the unfused names (gate_proj/up_proj map onto gate_up_proj)
        ("gate_proj", "up_proj"),
    ],
    ids=["default", "gate_up_only"],
)
def test_matches_eager_experts_plus_peft(model_type, targets, checkpoint, tmp_path):
    model_dir = checkpoint(model_type)
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=targets, use_gradient_checkpointing=False)
    randomize_lora_B(model)
    model.save_pretrained(tmp_path / "adapter")
    reference = plain_peft_model(model_dir, tmp_path / "adapter")

    ids = token_batch()
    logits, d_embeds = forward_backward(model, ids)
    ref_logits, ref_d_embeds = forward_backward(reference, ids)
    assert relative_error(logits, ref_logits) < RTOL
    assert relative_error(d_embeds, ref_d_embeds) < RTOL

    grads, ref_grads = moetune_lora_grads(model), peft_lora_grads(reference)
    assert sorted(grads) == sorted(ref_grads)  # exactly the same LoRA factors train
    assert any(".experts." in k for k in grads)
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, key
        assert relative_error(grads[key], ref) < RTOL, key


@pytest.mark.parametrize("backend", ["native", "grouped_mm"])
def test_backend_from_environment(backend, checkpoint, monkeypatch, tmp_path):
    """MOETUNE_MOE_BACKEND picks the backend for the model's experts; both give the reference's logits."""
    model_dir = checkpoint("qwen3_moe")
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_B(model)
    model.save_pretrained(tmp_path / "adapter")
    reference = plain_peft_model(model_dir, tmp_path / "adapter")
    ids = token_batch()
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", backend)
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < RTOL
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="MOETUNE_MOE_BACKEND"):
        model(ids)
