"""The fused cross-entropy inside the models: same loss and LoRA gradients as transformers' own lm_head + loss.

Both sides load the same saved checkpoint through FastMoEModel (fused by default, fused_cross_entropy=False for
the reference), get the same LoRA, and train on labels with ignored positions, the router aux loss on and
num_items_in_batch passed, as Trainer and moetune's own loop do.
"""

from __future__ import annotations

import pytest
import torch

from moetune import FastMoEModel
from moetune.models import fused_loss

from ..test_linear_cross_entropy import force_kernel
from .helpers import randomize_lora_B, relative_error, token_batch

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
# fp32, two layers: ~5e-7 seen on losses and gradients.
RTOL = 1e-5


def load(model_dir: str, fused: bool = True, **lora):
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32, fused_cross_entropy=fused)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, **lora)
    randomize_lora_B(model)
    return model.train()


def batch():
    ids = token_batch(batch=2, length=9)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -1] = -100
    return ids, labels


def step(model, **kwargs):
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "model_type, path",
    [
        ("qwen3_moe", "torch"),
        ("qwen3_moe", "kernel"),  # the Triton kernel (on CPU forced onto the interpreter, never chosen by itself)
        ("gpt_oss", "torch"),
        ("deepseek_v3", "torch"),  # MLA attention, loss_function called with keywords
        ("mixtral", "torch"),
        ("qwen3_vl_moe", "torch"),  # ForConditionalGeneration: text_config's vocab and aux coefficient
    ],
)
def test_loss_and_every_lora_gradient_match_the_unfused_model(model_type, path, checkpoint, monkeypatch):
    if path == "kernel":
        force_kernel(monkeypatch)
    kwargs = {"num_items_in_batch": torch.tensor(11)}
    if model_type != "deepseek_v3":  # deepseek's CausalLM has no aux loss
        kwargs["output_router_logits"] = True
    fused_out, fused_grads = step(load(checkpoint(model_type)), **kwargs)
    ref_out, ref_grads = step(load(checkpoint(model_type), fused=False), **kwargs)
    assert fused_out.logits.stride() == (0, 0, 0)  # the fused path ran: no logits
    assert ref_out.logits.stride() != (0, 0, 0)
    if "output_router_logits" in kwargs:
        assert fused_out.aux_loss is not None and relative_error(fused_out.aux_loss, ref_out.aux_loss) < RTOL
    assert relative_error(fused_out.loss, ref_out.loss) < RTOL
    assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) >= 8
    for name, grad in ref_grads.items():
        assert relative_error(fused_grads[name], grad) < RTOL, name


def test_eval_no_grad_and_no_labels_get_real_logits(checkpoint):
    model = load(checkpoint("qwen3_moe"))
    reference = load(checkpoint("qwen3_moe"), fused=False).eval()
    ids, labels = batch()
    with torch.no_grad():
        want = reference(input_ids=ids, labels=labels)
        for mode in ("eval", "train"):  # eval with grad off; training mode under no_grad
            getattr(model, mode)()
            got = model(input_ids=ids, labels=labels)
            assert got.logits.stride() != (0, 0, 0) and relative_error(got.logits, want.logits) < RTOL
            assert relative_error(got.loss, want.loss) < RTOL
    model.train()
    assert model(input_ids=ids).logits.stride() != (0, 0, 0)  # training, grad on, no labels


def test_state_dict_and_adapter_files_see_no_hook(checkpoint, tmp_path):
    from safetensors.torch import load_file

    model_dir = checkpoint("qwen3_moe")
    fused, plain = load(model_dir), load(model_dir, fused=False)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert "base_model.model.lm_head.weight" in fused.state_dict()
    fused.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    saved = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("fused", "plain")]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[1])


def test_uninstall_restores_transformers_loss(checkpoint):
    from transformers.loss.loss_utils import ForCausalLMLoss

    model, _ = FastMoEModel.from_pretrained(checkpoint("mixtral"), dtype=torch.float32)
    model.requires_grad_(False)

    def hooks(module):
        return len(module._forward_pre_hooks) + len(module._forward_hooks)

    assert fused_loss.installed(model) is not None and hooks(model) == hooks(model.lm_head) == 2
    fused_loss.uninstall(model)
    assert fused_loss.installed(model) is None and hooks(model) == hooks(model.lm_head) == 0
    assert model.loss_function is ForCausalLMLoss and "_loss_function" not in model.__dict__
    ids, labels = batch()
    assert model.train()(input_ids=ids, labels=labels).logits.stride() != (0, 0, 0)


def test_lora_on_lm_head_falls_back_to_full_logits(checkpoint):
    model_dir = checkpoint("qwen3_moe")
    targets = {"target_modules": ("q_proj", "lm_head")}
    with pytest.warns(UserWarning, match="fused_cross_entropy: the output embeddings are a peft.*Linear now"):
        out, grads = step(load(model_dir, **targets))
    ref_out, ref_grads = step(load(model_dir, fused=False, **targets))
    assert out.logits.stride() != (0, 0, 0)
    assert relative_error(out.loss, ref_out.loss) < RTOL
    assert any("lm_head.lora_A" in n for n in grads)
    assert all(relative_error(grads[n], g) < RTOL for n, g in ref_grads.items())


def test_a_forward_that_skips_loss_function_fails_loudly(checkpoint):
    """A model computing its loss outside self.loss_function would get it from the placeholder: refused."""
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    model.requires_grad_(False)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="called lm_head with labels but not self.loss_function"):
        model.train()(input_ids=ids, labels=labels)
    with torch.no_grad():  # the next call runs normally
        assert model(input_ids=ids).logits.stride() != (0, 0, 0)


def test_an_error_in_the_forward_goes_up_and_leaves_no_state(checkpoint):
    model = load(checkpoint("qwen3_moe"))
    ids, labels = batch()
    with pytest.raises(ValueError, match="targets: expected 18 integer class ids"):
        model(input_ids=ids, labels=labels[:, :-1])  # labels one shorter than the input
    assert fused_loss.installed(model.base_model.model).kept is None
    out, _ = step(model)
    assert out.logits.stride() == (0, 0, 0) and out.loss.isfinite()


def test_from_pretrained_rejects_a_non_bool(checkpoint):
    with pytest.raises(ValueError, match="fused_cross_entropy: expected True or False"):
        FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), fused_cross_entropy="yes")
