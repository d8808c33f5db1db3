"""install_fast_routers: which routers each architecture gets fused, and that the model computes the same thing.

Every architecture in the registry (fp32, Triton's interpreter on CPU): the fused routers choose the same experts as
transformers' own, and leave logits and every LoRA gradient equal to transformers' routers' to fp32 rounding;
uninstalling restores the class forward.
"""

from __future__ import annotations

import pytest
import torch

from moetune.models import fast_routers
from moetune.models.fast_routers import fused_routers, install_fast_routers, router_variant, uninstall_fast_routers

from .helpers import ALL_ARCHS, auto_class, logits_and_lora_grads, lora_model, needs_triton, relative_error, token_batch
from .tiny import tiny_config

# Fused routers per tiny model (2 decoder layers, one of them dense in qwen3_moe's, qwen2_moe's and the sigmoid
# routers' models).
EXPECTED = {
    "qwen3_moe": ("softmax_topk", 1),
    "qwen2_moe": ("softmax_topk", 1),
    "olmoe": ("softmax_topk", 2),
    "qwen3_vl_moe": ("softmax_topk_normalized", 2),
    "mixtral": ("mixtral", 2),
    "gpt_oss": ("gpt_oss", 2),
    "deepseek_v3": ("sigmoid_group_topk", 1),
    "glm4_moe": ("sigmoid_group_topk", 1),
    "glm4_moe_lite": ("sigmoid_group_topk", 1),
}
RTOL = 1e-5  # fp32: the weights differ from transformers' by a few ulps


@ALL_ARCHS
def test_each_router_is_recognised_by_its_code(model_type):
    torch.manual_seed(0)
    model = auto_class(model_type).from_config(tiny_config(model_type), dtype=torch.float32)
    variant, count = EXPECTED[model_type]
    found = [router_variant(m) for m in model.modules()]
    assert [v for v in found if v is not None] == [variant] * count


@needs_triton
@ALL_ARCHS
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_lora_step_with_checkpointing_is_unchanged(checkpoint, monkeypatch, model_type):
    """The same experts, logits and LoRA gradients (attention and experts) with and without the fused routers, with
    gradient checkpointing (the recompute runs the router again)."""
    from moetune.models import hook

    chosen = []
    real = hook.moe_experts

    def spy(x, topk_ids, *args, **kwargs):
        chosen.append(topk_ids.detach().clone())
        return real(x, topk_ids, *args, **kwargs)

    monkeypatch.setattr(hook, "moe_experts", spy)
    model = lora_model(checkpoint(model_type))
    model.train()
    ids = token_batch()
    fused = install_fast_routers(model)
    assert fused == EXPECTED[model_type][1] and install_fast_routers(model) == fused  # idempotent
    logits, grads = logits_and_lora_grads(model, ids)
    fused_ids, chosen[:] = list(chosen), []
    assert uninstall_fast_routers(model) == fused
    ref_logits, ref_grads = logits_and_lora_grads(model, ids)
    assert len(fused_ids) == len(chosen) > 0 and all(torch.equal(a, b) for a, b in zip(fused_ids, chosen))
    assert relative_error(logits, ref_logits) < RTOL
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < RTOL, name


@needs_triton
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_a_trainable_router_gets_its_weight_gradient(checkpoint):
    """train_router=True: the router's Linear stays torch's, so its weight gradient is transformers' to rounding."""
    model = lora_model(checkpoint("qwen3_moe"), train_router=True)
    model.train()
    ids = token_batch()
    assert install_fast_routers(model) == 2  # the router and peft's trainable copy of it (modules_to_save)
    _, grads = logits_and_lora_grads(model, ids)
    uninstall_fast_routers(model)
    _, ref_grads = logits_and_lora_grads(model, ids)
    router = [n for n in grads if "mlp.gate" in n]
    assert router
    for name in router:
        assert relative_error(grads[name], ref_grads[name]) < RTOL, name


def test_float64_and_three_dim_gpt_oss_inputs_take_the_class_forward():
    for model_type, dtype in (("qwen3_moe", torch.float64), ("gpt_oss", torch.float32)):
        torch.manual_seed(0)
        model = auto_class(model_type).from_config(tiny_config(model_type), dtype=dtype)
        router = next(m for m in model.modules() if router_variant(m) is not None)
        install_fast_routers(model)
        shape = (5, router.weight.shape[1]) if model_type == "qwen3_moe" else (1, 5, router.weight.shape[1])
        x = torch.randn(*shape, dtype=dtype)
        got = router(x)
        uninstall_fast_routers(model)
        assert all(torch.equal(a, b) for a, b in zip(got, router(x)))


def test_uninstall_leaves_a_later_wrapper_alone():
    torch.manual_seed(0)
    model = auto_class("mixtral").from_config(tiny_config("mixtral"), dtype=torch.float32)
    install_fast_routers(model)
    router = fused_routers(model)[0]
    inner = router.forward
    router.forward = lambda x: inner(x)  # an offloading hook, say
    uninstall_fast_routers(model)
    assert "forward" in router.__dict__ and router_variant(router) is None  # (its forward is replaced still)


def test_the_class_forward_runs_where_the_kernel_cannot():
    """bf16 on CPU: Triton's interpreter does not take it, so the fused forward calls transformers' own."""
    torch.manual_seed(0)
    model = auto_class("qwen3_moe").from_config(tiny_config("qwen3_moe"), dtype=torch.bfloat16)
    router = next(m for m in model.modules() if router_variant(m) is not None)
    assert install_fast_routers(model) == (EXPECTED["qwen3_moe"][1] if fast_routers.fast_norm_available() else 0)
    x = torch.randn(5, router.hidden_dim, dtype=torch.bfloat16)
    got = router(x)
    uninstall_fast_routers(model)
    want = router(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
