"""install_fast_norms: which norms each architecture gets fused, and that the model computes the same thing.

Every architecture in the registry: the fused norms leave logits, the input-embedding gradient and the norm
weight gradients equal to transformers' own (fp32, Triton's interpreter on CPU), each swapped norm runs the
kernel once forward and once backward, and uninstalling restores the class forward. On a GPU, bf16 at real
hidden sizes against transformers' modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moetune.models.fast_norms import (
    install_fast_norms,
    norm_variant,
    uninstall_fast_norms,
)

from .helpers import ALL_ARCHS, DEVICE, auto_class, needs_triton, relative_error, token_batch
from .tiny import tiny_config

# Norms per tiny model (2 decoder layers + the final norm). "in/post": input_layernorm, post_attention_layernorm.
EXPECTED = {
    "qwen3_moe": 2 * 4 + 1,  # in/post + q_norm, k_norm per head
    "qwen2_moe": 2 * 2 + 1,  # in/post
    "mixtral": 2 * 2 + 1,
    "olmoe": 2 * 4 + 1,  # in/post + q_norm, k_norm over the whole projection width
    "gpt_oss": 2 * 2 + 1,  # in/post, gpt-oss rounding
    "glm4_moe": 2 * 4 + 1,  # in/post + q_norm, k_norm (use_qk_norm=True, as GLM-4.5 ships)
    "glm4_moe_lite": 2 * 4 + 1,  # in/post + q_a_layernorm, kv_a_layernorm (MLA latents)
    "deepseek_v3": 2 * 4 + 1,
    "qwen3_vl_moe": 2 * 4 + 1,  # the text model's; the vision tower has LayerNorms only
}
# fp32, two layers: observed 1e-7 (logits, input gradient) to 9e-7 (norm weight gradients).
RTOL = 1e-5


def tiny_model(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config(model_type)
    if model_type == "glm4_moe":
        config.use_qk_norm = True
    model = auto_class(model_type).from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norm weights start at one: random ones make the weight's place in the rounding matter
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                p.normal_(1.0, 0.3)
    return model


def forward_backward(model, ids, norm_weights):
    """(logits, d embeds, {name: d weight} of norm_weights)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)  # no gradient cancels by symmetry
    grads = torch.autograd.grad((logits * weights).sum(), [embeds, *norm_weights.values()])
    return logits.detach(), grads[0], dict(zip(norm_weights, grads[1:]))


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of the fused forward and backward launchers' calls (and of backward calls computing dw), live."""
    from moetune.kernels import rms_norm as kernel

    calls = {"forward": 0, "backward": 0, "with_dw": 0}
    forward, backward = kernel._forward, kernel._backward

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(dy, x, weight, rstd, cast_before_weight, compute_dw, *args):
        calls["backward"] += 1
        calls["with_dw"] += bool(compute_dw)
        return backward(dy, x, weight, rstd, cast_before_weight, compute_dw, *args)

    monkeypatch.setattr(kernel, "_forward", counted_forward)
    monkeypatch.setattr(kernel, "_backward", counted_backward)
    return calls


@needs_triton
@ALL_ARCHS
def test_fused_norms_leave_the_model_unchanged(model_type, monkeypatch):
    model = tiny_model(model_type)
    ids = token_batch()
    keys = list(model.state_dict())
    norm_weights = {name: m.weight for name, m in model.named_modules() if norm_variant(m)}
    assert len(norm_weights) == EXPECTED[model_type]
    logits_ref, dx_ref, dw_ref = forward_backward(model, ids, norm_weights)

    calls = count_kernel_calls(monkeypatch)
    assert install_fast_norms(model) == EXPECTED[model_type]
    assert install_fast_norms(model) == EXPECTED[model_type]  # idempotent
    logits, dx, dw = forward_backward(model, ids, norm_weights)
    assert calls == {"forward": EXPECTED[model_type], "backward": EXPECTED[model_type], "with_dw": EXPECTED[model_type]}
    assert relative_error(logits, logits_ref) < RTOL
    assert relative_error(dx, dx_ref) < RTOL
    for name in dw:
        assert relative_error(dw[name], dw_ref[name]) < RTOL, name
    assert list(model.state_dict()) == keys

    assert uninstall_fast_norms(model) == EXPECTED[model_type]
    assert not any("forward" in m.__dict__ for m in model.modules())
    calls.update(forward=0, backward=0, with_dw=0)
    logits_after, _, _ = forward_backward(model, ids, {})
    assert calls == {"forward": 0, "backward": 0, "with_dw": 0}
    torch.testing.assert_close(logits_after, logits_ref, rtol=0, atol=0)


@ALL_ARCHS
def test_each_norm_is_recognised_by_its_code(model_type):
    """In fp32 both forms compute the same, so the model test above cannot tell them apart: this pins the form
    (tests/kernels/test_rms_norm.py pins each form's rounding)."""
    model = tiny_model(model_type)
    found = {norm_variant(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    assert found == ({"gpt_oss"} if model_type == "gpt_oss" else {"llama"})


@needs_triton
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_lora_training_step_with_checkpointing(checkpoint, monkeypatch):
    """FastMoEModel + PEFT LoRA + gradient checkpointing (norms frozen: the dx-only kernel, run again in the
    recompute), batch 1 so q/k norms get their gradient back as a strided [T, heads, D] view: the same loss and
    LoRA gradients with and without the fused norms."""
    from moetune import FastMoEModel

    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    fused = install_fast_norms(model)
    assert fused == EXPECTED["qwen3_moe"]
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)  # checkpointing on (default)
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = token_batch(batch=1, length=12)

    def loss_and_grads():
        loss = model(input_ids=ids, labels=ids).loss
        trainable = [p for p in model.parameters() if p.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, trainable)

    calls = count_kernel_calls(monkeypatch)
    loss, grads = loss_and_grads()
    # 2 layers x 4 norms run again in the recompute (the final norm is outside the checkpointed layers); the
    # first input_layernorm has no backward: neither the frozen embeddings nor its frozen weight need a gradient.
    assert calls == {"forward": fused + 8, "backward": fused - 1, "with_dw": 0}
    assert uninstall_fast_norms(model) == fused
    loss_ref, grads_ref = loss_and_grads()
    assert relative_error(loss, loss_ref) < RTOL
    for got, ref in zip(grads, grads_ref):
        assert relative_error(got, ref) < RTOL


class GemmaStyleRMSNorm(nn.Module):
    """(1 + weight): the weight is stored as an offset from one. Not a form moetune fuses."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (1.0 + self.weight) * hidden_states.to(input_dtype)


class BiasedRMSNorm(nn.Module):
    """The Llama forward, copied, on a module that also holds a bias (which a subclass's forward might use)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """A docstring and comments do not matter."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)  # upcast
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


@needs_triton
def test_other_norms_keep_transformers_forward():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    hooked = Qwen3MoeRMSNorm(8)
    hooked.forward = lambda hidden_states: hidden_states  # replaced on the instance (as accelerate's hooks do)
    model = nn.Sequential(GemmaStyleRMSNorm(8), BiasedRMSNorm(8), hooked, Qwen3MoeRMSNorm(8))
    del model[1]._parameters["bias"]
    assert norm_variant(model[1]) == "llama"  # the same code without the bias: recognised
    model[1].bias = nn.Parameter(torch.zeros(8))
    assert [norm_variant(m) for m in model] == [None, None, None, "llama"]
    with pytest.warns(UserWarning, match="BiasedRMSNorm, GemmaStyleRMSNorm, Qwen3MoeRMSNorm keep transformers"):
        assert install_fast_norms(model) == 1


@needs_triton
def test_fused_forward_falls_back_where_the_kernel_cannot_run(monkeypatch):
    """bf16 in Triton's interpreter (or any input the kernel does not take): transformers' forward, exactly."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    if DEVICE == "cuda":
        pytest.skip("the interpreter's limits")
    norm = Qwen3MoeRMSNorm(16).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = norm(x)
    assert install_fast_norms(norm) == 1
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(norm(x.double()), Qwen3MoeRMSNorm.forward(norm, x.double()), rtol=0, atol=0)
    copied = copy.deepcopy(norm)  # the bound forward follows the copy
    assert copied.forward.__self__ is copied


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU makes the kernel available")
def test_nothing_installed_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("mixtral")
    assert install_fast_norms(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def _module(model_type: str, hidden: int):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cls = next(getattr(modeling, n) for n in dir(modeling) if n.endswith("RMSNorm") and "Vision" not in n)
    return cls(hidden, eps=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type, hidden, shape, width", [
    ("qwen3_moe", 2048, (4096,), None),  # Qwen3-30B-A3B hidden
    ("qwen3_moe", 128, (1, 4096, 32), None),  # q_norm per head on a [B, T, heads, D] view
    ("gpt_oss", 2880, (4096,), None),  # gpt-oss rounding, H not a power of 2
    ("deepseek_v3", 512, (1, 4096), 576),  # kv_a_layernorm on the first 512 columns of a split
    ("glm4_moe_lite", 768, (4096,), None),  # GLM latent widths
    ("glm4_moe_lite", 1536, (4096,), None),
])
def test_bf16_at_real_sizes_matches_transformers(model_type, hidden, shape, width):
    """Forward: transformers' bf16 output but for rare one-ulp flips. Backward (fp32 inside, one rounding): no
    further from float64 than transformers' own (which rounds dy * w to bf16 on the way)."""
    torch.manual_seed(0)
    norm = _module(model_type, hidden).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    base = torch.randn(*shape, width or hidden, device="cuda", dtype=torch.bfloat16) * 3
    x = base[..., :hidden]
    dy = torch.randn(*shape, hidden, device="cuda", dtype=torch.bfloat16)
    if len(shape) == 3:  # the gradient of a q/k norm comes back transposed
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)

    def run(module):
        xi = x.detach().requires_grad_()
        y = module(xi)
        return (y, *torch.autograd.grad(y, (xi, module.weight), dy))

    y_ref, dx_ref, dw_ref = run(norm)
    fused = copy.deepcopy(norm)
    assert install_fast_norms(fused) == 1
    y, dx, dw = run(fused)
    assert y.dtype == y_ref.dtype
    assert (y != y_ref).float().mean() < 0.01
    torch.testing.assert_close(y, y_ref)

    x64, w64 = x.double().requires_grad_(), fused.weight.double().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    for got, theirs, exact in ((dx, dx_ref, dx64), (dw, dw_ref, dw64)):
        ours_err, theirs_err = relative_error(got, exact), relative_error(theirs, exact)
        assert ours_err <= 1.1 * theirs_err and ours_err < 1e-2, (ours_err, theirs_err)
