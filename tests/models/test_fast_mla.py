"""install_fast_mla: which attention classes get the fused MLA query/key/value, and that the models compute the same.

fp32 in Triton's interpreter on CPU (or the GPU): deepseek_v3 and glm4_moe_lite with interleaved and
half-split rotary, logits and gradients with the kernel as without, one launch per attention forward and
backward; the original forward wherever a cache is given; through FastMoEModel with LoRA and checkpointing.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moetune.models.fast_mla import install_fast_mla, installed_classes, mla_class_recognised, uninstall_fast_mla
from moetune.models.fast_rotary import install_fast_rotary, uninstall_fast_rotary

from .helpers import ALL_ARCHS, DEVICE, auto_class, logits_and_input_grad, needs_triton, randomize_lora_B, token_batch
from .tiny import tiny_config

MLA = ("deepseek_v3", "glm4_moe_lite")


@pytest.fixture(autouse=True)
def _restore():
    # Before too: on a GPU, FastMoEModel.from_pretrained in earlier tests installs it (process-wide).
    uninstall_fast_rotary()
    yield
    uninstall_fast_rotary()


def tiny_model(model_type: str, interleave: bool = True):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    if hasattr(config, "rope_interleave"):
        config.rope_interleave = interleave
    config.use_cache = False  # as in training (FastMoEModel.get_peft_model sets it); generate() passes its own
    return auto_class(model_type).from_config(config, dtype=torch.float32).to(DEVICE)


def attention_class(model):
    return next(type(m) for name, m in model.named_modules() if name.endswith("layers.0.self_attn"))


def count_launches(monkeypatch) -> dict[str, int]:
    from moetune.kernels import mla_inputs as kernel

    calls = {"forward": 0, "backward": 0}

    def counting(launch, key):
        def counted(*args):
            calls[key] += 1
            return launch(*args)

        return counted

    monkeypatch.setattr(kernel, "mla_inputs_forward", counting(kernel.mla_inputs_forward, "forward"))
    monkeypatch.setattr(kernel, "mla_inputs_backward", counting(kernel.mla_inputs_backward, "backward"))
    return calls


@ALL_ARCHS
def test_the_mla_classes_are_recognised_by_their_code(model_type):
    assert mla_class_recognised(attention_class(tiny_model(model_type))) == (model_type in MLA)


@needs_triton
@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("model_type", MLA)
def test_fused_mla_computes_what_transformers_computes(model_type, interleave, monkeypatch):
    model = tiny_model(model_type, interleave)
    ids = token_batch().to(DEVICE)
    logits_ref, grad_ref = logits_and_input_grad(model, ids)
    cls = attention_class(model)
    original = cls.forward

    calls = count_launches(monkeypatch)
    assert install_fast_mla(model) == [f"{cls.__module__}.{cls.__qualname__}"]
    assert install_fast_mla(model) == installed_classes()  # idempotent
    logits, grad = logits_and_input_grad(model, ids)
    assert calls == {"forward": 2, "backward": 2}  # one per layer each way
    # Same values into attention, laid out [B, T, heads, D] instead of [B, heads, T, D]: the attention's own
    # reductions may round differently.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)

    assert uninstall_fast_mla() == 1 and cls.forward is original
    calls.update(forward=0, backward=0)
    logits_and_input_grad(model, ids)
    assert calls == {"forward": 0, "backward": 0}


@needs_triton
def test_calls_with_a_cache_run_the_original(monkeypatch):
    """Generation (a cache): transformers' forward, the same tokens with the dispatcher installed as without."""
    model = tiny_model("glm4_moe_lite").eval()
    ids = token_batch(batch=1, length=5).to(DEVICE)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    install_fast_mla(model)
    calls = count_launches(monkeypatch)
    got = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(got, expected)
    assert calls == {"forward": 0, "backward": 0}


@needs_triton
def test_fast_rotary_carries_the_mla_swap():
    model = tiny_model("deepseek_v3")
    install_fast_rotary(model)
    assert installed_classes() == [f"{attention_class(model).__module__}.{attention_class(model).__qualname__}"]
    uninstall_fast_rotary()
    assert installed_classes() == []


@needs_triton
def test_a_forward_changed_by_someone_else_is_left_alone():
    model = tiny_model("glm4_moe_lite")
    cls = attention_class(model)
    original = cls.forward

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    try:
        cls.forward = wrapped
        assert not mla_class_recognised(cls)
        assert install_fast_mla(model) == []
        assert cls.forward is wrapped
    finally:
        cls.forward = original
    assert mla_class_recognised(cls)


@needs_triton
def test_an_unrecognised_subclass_keeps_the_original_forward(monkeypatch):
    """A subclass inheriting the swapped forward but changing what it calls is not fused."""
    model = tiny_model("glm4_moe_lite")
    cls = attention_class(model)

    class Changed(cls):
        def expand_kv(self, kv_nope, k_rot):
            key, value = super().expand_kv(kv_nope, k_rot)
            return key, value * 2

    model.model.layers[0].self_attn.__class__ = Changed
    ids = token_batch().to(DEVICE)
    expected, _ = logits_and_input_grad(model, ids)
    assert install_fast_mla(model) == [f"{cls.__module__}.{cls.__qualname__}"]  # not Changed
    calls = count_launches(monkeypatch)
    got, _ = logits_and_input_grad(model, ids)
    assert calls == {"forward": 1, "backward": 1}  # the second layer only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_mixed_dtypes_under_autocast_take_the_torch_path(monkeypatch):
    """bf16 projections with fp32 rotary tables (an fp32 model under autocast): transformers' math, its dtypes."""
    model = tiny_model("deepseek_v3")
    ids = token_batch().to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = model(ids).logits
        install_fast_mla(model)
        calls = count_launches(monkeypatch)
        got = model(ids).logits
    assert calls == {"forward": 0, "backward": 0}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nothing_is_installed_where_no_kernel_can_run(monkeypatch):
    from moetune.models import fast_norms

    monkeypatch.setattr(fast_norms, "fast_norm_available", lambda: False)
    assert install_fast_mla(tiny_model("glm4_moe_lite")) == []
    assert installed_classes() == []


@needs_triton
@pytest.mark.parametrize("model_type", MLA)
def test_lora_gradients_through_fastmoemodel_with_checkpointing(model_type, checkpoint):
    """Loaded from disk, LoRA on the latent projections and experts, every layer checkpointed: the same loss and
    LoRA gradients with the fused MLA as without (its recompute runs the kernel again)."""
    from moetune import FastMoEModel

    def loss_and_grads(fused: bool):
        model, _ = FastMoEModel.from_pretrained(checkpoint(model_type), dtype=torch.float32, device_map=DEVICE)
        torch.manual_seed(0)  # the same LoRA A draws
        model = FastMoEModel.get_peft_model(
            model, r=4, target_modules=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                        "gate_up_proj"),
            use_gradient_checkpointing=True,
        )
        randomize_lora_B(model)
        model.train()
        if fused:
            install_fast_rotary(model)
        else:
            uninstall_fast_rotary()
        ids = token_batch().to(DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss_ref, grads_ref = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert installed_classes()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("kv_b_proj" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
