"""install_fast_rotary: which architectures get the fused rotary, and that the model computes bitwise the same.

Every architecture in the registry (fp32, Triton's interpreter on CPU): the form each modeling module is
recognised as, the same logits and input-embedding gradients with the kernel as without, the kernel running
once per attention forward and backward, and uninstalling restoring transformers' function.
"""

from __future__ import annotations

import sys

import pytest
import torch

from moetune.models.fast_rotary import (
    install_fast_rotary,
    installed_modules,
    rotary_variant,
    uninstall_fast_rotary,
)

from .helpers import ALL_ARCHS, DEVICE, auto_class, logits_and_input_grad, needs_triton, token_batch
from .tiny import tiny_config

# The form of each modeling module's apply_rotary_pos_emb; glm4_moe's is partial (rotary on part of the head).
VARIANT = {
    "qwen3_moe": "llama", "qwen2_moe": "llama", "mixtral": "llama", "olmoe": "llama", "deepseek_v3": "llama",
    "glm4_moe": None, "glm4_moe_lite": "llama", "gpt_oss": "gpt_oss", "qwen3_vl_moe": "llama",
}
# Kernel launches per forward (q and k per layer, 2 layers). deepseek_v3 / glm4_moe_lite call the function only
# with rope_interleave=False, as the tiny configs below set.
LAUNCHES = {t: (0 if v is None else 4) for t, v in VARIANT.items()}


@pytest.fixture(autouse=True)
def _restore():
    # Before too: on a GPU, FastMoEModel.from_pretrained in earlier tests installs it (process-wide).
    uninstall_fast_rotary()
    yield
    uninstall_fast_rotary()


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    if hasattr(config, "rope_interleave"):
        config.rope_interleave = False
    return auto_class(model_type).from_config(config, dtype=torch.float32).to(DEVICE)


def count_launches(monkeypatch) -> dict[str, int]:
    from moetune.kernels import rotary as kernel

    calls = {"forward": 0, "backward": 0}
    launch = kernel._launch

    def counted(x, cos, sin, backward, contiguous):
        calls["backward" if backward else "forward"] += 1
        return launch(x, cos, sin, backward, contiguous)

    monkeypatch.setattr(kernel, "_launch", counted)
    return calls


@ALL_ARCHS
def test_each_modeling_module_is_recognised_by_its_code(model_type):
    module = type(tiny_model(model_type)).__module__
    assert rotary_variant(module) == VARIANT[model_type]


@needs_triton
@ALL_ARCHS
def test_fused_rotary_leaves_the_model_bitwise_unchanged(model_type, monkeypatch):
    model = tiny_model(model_type)
    ids = token_batch().to(DEVICE)
    logits_ref, grad_ref = logits_and_input_grad(model, ids)
    module = type(model).__module__
    original = sys.modules[module].apply_rotary_pos_emb

    calls = count_launches(monkeypatch)
    fused = install_fast_rotary(model)
    assert fused == ([] if VARIANT[model_type] is None else [module])
    assert install_fast_rotary(model) == fused  # idempotent
    assert installed_modules() == fused
    logits, grad = logits_and_input_grad(model, ids)
    assert calls == {"forward": LAUNCHES[model_type], "backward": LAUNCHES[model_type]}
    # Bitwise on CPU; on CUDA transformers' own expert code accumulates with atomics (gpt-oss's index_add_), so
    # two runs of the same model differ in the last bits (tests/kernels/test_rotary.py checks the kernel bitwise).
    tol = 0 if DEVICE == "cpu" else 1e-5
    torch.testing.assert_close(logits, logits_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, grad_ref, rtol=tol, atol=tol)

    assert uninstall_fast_rotary() == len(fused)
    assert sys.modules[module].apply_rotary_pos_emb is original
    calls.update(forward=0, backward=0)
    logits_and_input_grad(model, ids)
    assert calls == {"forward": 0, "backward": 0}


@needs_triton
def test_dispatcher_falls_back_where_the_kernel_cannot_run(monkeypatch):
    """unsqueeze_dim=2 (a [B, T, heads, D] layout), tables requiring grad: transformers' own code, same result."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

    original = modeling.apply_rotary_pos_emb
    install_fast_rotary(tiny_model("qwen3_moe"))
    calls = count_launches(monkeypatch)
    q = torch.randn(1, 5, 2, 8, device=DEVICE)
    cos, sin = torch.randn(1, 5, 8, device=DEVICE), torch.randn(1, 5, 8, device=DEVICE)
    for got, ref in zip(modeling.apply_rotary_pos_emb(q, q, cos, sin, 2), original(q, q, cos, sin, 2)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    cos.requires_grad_()
    q_t = q.transpose(1, 2)
    for got, ref in zip(modeling.apply_rotary_pos_emb(q_t, q_t, cos, sin), original(q_t, q_t, cos, sin)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert calls == {"forward": 0, "backward": 0}


def test_nothing_is_installed_where_no_kernel_can_run(monkeypatch):
    from moetune.models import fast_norms

    monkeypatch.setattr(fast_norms, "fast_norm_available", lambda: False)
    assert install_fast_rotary(tiny_model("qwen3_moe")) == []
    assert installed_modules() == []


@needs_triton
def test_a_replacement_made_by_someone_else_is_left_alone():
    """After uninstalling, another library's replacement (plain, or a functools.wraps wrapper) is not taken for
    transformers' function."""
    import functools

    from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

    model = tiny_model("qwen3_moe")
    assert install_fast_rotary(model) and uninstall_fast_rotary() == 1
    original = modeling.apply_rotary_pos_emb

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    def other(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    try:
        for replacement in (wrapped, other):
            modeling.apply_rotary_pos_emb = replacement
            assert rotary_variant(modeling.__name__) is None
            assert install_fast_rotary(model) == []
            assert modeling.apply_rotary_pos_emb is replacement
    finally:
        modeling.apply_rotary_pos_emb = original
    assert rotary_variant(modeling.__name__) == "llama"



@needs_triton
def test_fused_rotary_false_warns_when_an_earlier_model_installed_it():
    from moetune import FastMoEModel

    assert install_fast_rotary(tiny_model("qwen3_moe"))
    with pytest.warns(UserWarning, match="fused_rotary=False: an earlier model of this architecture"):
        FastMoEModel.from_pretrained(tiny_config("qwen3_moe"), dtype=torch.float32, fused_rotary=False)
