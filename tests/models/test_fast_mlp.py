"""install_fast_mlp: which gated MLPs each architecture gets fused, and that the model computes the same thing.

Every architecture in the registry (fp32, Triton's interpreter on CPU): logits and every LoRA gradient equal
transformers' MLPs' to fp32 rounding, with checkpointing (the recompute runs the MLP again) and with LoRA on the
MLP's own projections (a gate/up LoRA group); where the kernel cannot run the class's math runs; uninstalling
restores the class forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moetune import FastMoEModel
from moetune.kernels import swiglu
from moetune.models import fast_mlp
from moetune.models.fast_mlp import fused_mlps, install_fast_mlp, mlp_variant, uninstall_fast_mlp

from .helpers import (
    ALL_ARCHS,
    DEVICE,
    auto_class,
    logits_and_lora_grads,
    lora_model,
    needs_triton,
    relative_error,
    token_batch,
)
from .tiny import tiny_config

# Gated MLPs per tiny model (2 decoder layers): the dense first layer and the MoE layer's shared expert, or the dense
# layer alone (qwen3_moe); none where the models have neither.
EXPECTED = {"qwen3_moe": 1, "qwen2_moe": 2, "olmoe": 0, "qwen3_vl_moe": 0, "mixtral": 0, "gpt_oss": 0,
            "deepseek_v3": 2, "glm4_moe": 2, "glm4_moe_lite": 2}
RTOL = 1e-5  # fp32: Triton's exp and torch's differ by a few ulps


@ALL_ARCHS
def test_each_mlp_is_recognised_by_its_code(model_type):
    torch.manual_seed(0)
    model = auto_class(model_type).from_config(tiny_config(model_type), dtype=torch.float32)
    assert sum(mlp_variant(m) == "swiglu" for m in model.modules()) == EXPECTED[model_type]


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = swiglu.SwiGLUFunction.apply

    def spy(gate, up):
        calls.append(gate.shape)
        return real(gate, up)

    monkeypatch.setattr(swiglu.SwiGLUFunction, "apply", spy)
    return calls


@needs_triton
@ALL_ARCHS
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_lora_step_with_checkpointing_is_unchanged(checkpoint, kernel_calls, model_type):
    if not EXPECTED[model_type]:
        pytest.skip("no gated MLP in this model")
    model = lora_model(checkpoint(model_type)).to(DEVICE)  # (the kernel runs on the GPU, or in the interpreter)
    model.train()
    ids = token_batch().to(DEVICE)
    fused = install_fast_mlp(model)
    assert fused == EXPECTED[model_type] and install_fast_mlp(model) == fused  # idempotent
    logits, grads = logits_and_lora_grads(model, ids)
    assert len(kernel_calls) == 2 * fused  # forward and the checkpointed recompute
    assert uninstall_fast_mlp(model) == fused and not fused_mlps(model)
    ref_logits, ref_grads = logits_and_lora_grads(model, ids)
    assert relative_error(logits, ref_logits) < RTOL
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < RTOL, name


@needs_triton
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
@pytest.mark.filterwarnings("error:moetune. the LoRA layers")  # the group's hand-over failing warns: fail instead
def test_lora_on_the_mlps_projections_keeps_its_gate_up_group(checkpoint, kernel_calls, monkeypatch):
    """qwen2_moe's shared expert and dense layer with LoRA on gate_proj and up_proj: the fused forward calls them in
    transformers' order on one input, so they still compute as one LoRA group, and the gradients are unchanged.

    peft >= 0.22 reads those names on qwen2_moe as its fused experts' too, so get_peft_model gives these Linear
    layers no LoRA there (tests/test_fast_model.py); with peft's renaming off they get it, as with peft 0.21."""
    import peft.utils.transformers_weight_conversion as conversion

    from moetune import lora_groups

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *args, **kwargs: None)
    model = lora_model(checkpoint("qwen2_moe"), target_modules=("gate_proj", "up_proj")).to(DEVICE)
    model.train()
    group_calls = []
    real = lora_groups.LoRAGroupFunction.apply
    lora_groups.LoRAGroupFunction.apply = lambda *args: group_calls.append(1) or real(*args)
    try:
        install_fast_mlp(model)
        ids = token_batch().to(DEVICE)
        logits, grads = logits_and_lora_grads(model, ids)
        assert kernel_calls and group_calls
        uninstall_fast_mlp(model)
        ref_logits, ref_grads = logits_and_lora_grads(model, ids)
    finally:
        lora_groups.LoRAGroupFunction.apply = real
    assert any("gate_proj" in name for name in grads)
    assert relative_error(logits, ref_logits) < RTOL
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < RTOL, name


def _shared_expert(dtype=torch.float32):
    torch.manual_seed(0)
    model = auto_class("qwen2_moe").from_config(tiny_config("qwen2_moe"), dtype=dtype)
    return model, model.model.layers[1].mlp.shared_expert


@pytest.mark.parametrize("case", ["float64", "bfloat16 on CPU", "act_fn swapped", "act_fn hooked",
                                  "act_fn backward hook", "a global hook"])
def test_the_class_math_runs_where_the_kernel_cannot(case, kernel_calls):
    dtype = {"float64": torch.float64, "bfloat16 on CPU": torch.bfloat16}.get(case, torch.float32)
    model, mlp = _shared_expert(dtype)
    install_fast_mlp(model)
    seen, handles = [], []
    if case == "act_fn swapped":
        mlp.act_fn = nn.GELU()
    elif case == "act_fn hooked":
        handles.append(mlp.act_fn.register_forward_hook(lambda module, args, out: out * 2))
    elif case == "act_fn backward hook":
        handles.append(mlp.act_fn.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(1)))
    elif case == "a global hook":
        handles.append(nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(1)))
    try:
        x = torch.randn(3, mlp.gate_proj.in_features, dtype=dtype, requires_grad=True)
        got = mlp(x)
        got.sum().backward()
        fused_seen = len(seen)
        assert uninstall_fast_mlp(model) == (1 if fast_mlp.fast_norm_available() else 0) * EXPECTED["qwen2_moe"]
        want = mlp(x)
        want.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(got, want) and not kernel_calls and fused_seen == len(seen) - fused_seen


def test_uninstall_leaves_a_later_wrapper_alone():
    model, _ = _shared_expert()
    if not install_fast_mlp(model):
        pytest.skip("no Triton that can run here")
    mlp = fused_mlps(model)[0]
    inner = mlp.forward
    mlp.forward = lambda x: inner(x)  # an offloading hook, say
    uninstall_fast_mlp(model)
    assert "forward" in mlp.__dict__ and mlp_variant(mlp) is None  # (its forward is replaced still)


def test_an_mlp_of_another_form_is_left_alone():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))  # the halves swapped

    assert mlp_variant(Other()) is None


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_from_pretrained_installs_it_on_a_gpu(fused):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model, _ = FastMoEModel.from_pretrained(tiny_config("qwen2_moe"), dtype=torch.bfloat16, device_map="cuda",
                                           fused_mlp=fused)
    assert len(fused_mlps(model)) == (EXPECTED["qwen2_moe"] if fused else 0)


def test_fused_mlp_must_be_a_bool():
    with pytest.raises(ValueError, match="fused_mlp: expected True or False"):
        FastMoEModel.from_pretrained(tiny_config("qwen3_moe"), dtype=torch.float32, fused_mlp="yes")
