"""Checkpoint recomputes skip the experts' output (moetune/models/recompute.py): the gradients stay bitwise
those of a full recompute, for every registered architecture, and the skip really happens."""

from __future__ import annotations

import pytest
import torch

from moetune import FastMoEModel
from moetune.models import hook, recompute

from .helpers import (
    ALL_ARCHS,
    DEVICE,
    needs_triton,
    randomize_lora_B,
    relative_error,
    spy_only_for_backward,
    token_batch,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning"),
]


def test_marked_function_runs_its_later_calls_as_recomputes():
    seen = []
    run = recompute.marked(lambda: seen.append(recompute.recomputing()))
    run()
    run()
    run()
    assert seen == [False, True, True]
    assert recompute.recomputing() is False

    def fail():
        raise KeyError("stop")  # the checkpoint's early stop leaves the recompute by an exception

    failing = recompute.marked(fail)
    with pytest.raises(KeyError):
        failing()
    with pytest.raises(KeyError):
        failing()
    assert recompute.recomputing() is False


def test_checkpoint_skips_torchs_metadata_check_unless_asked(monkeypatch):
    """determinism_check="none" by default (the check is Python per saved tensor at every layer and step), "default"
    under MOETUNE_CHECK_RECOMPUTE=1 (as this suite runs); a caller's own setting is kept."""
    seen = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *args, **kwargs: seen.append(kwargs))
    monkeypatch.delenv("MOETUNE_CHECK_RECOMPUTE")
    recompute.checkpoint(lambda x: x, torch.ones(1), use_reentrant=False)
    recompute.checkpoint(lambda x: x, torch.ones(1), use_reentrant=False, determinism_check="default")
    monkeypatch.setenv("MOETUNE_CHECK_RECOMPUTE", "1")
    recompute.checkpoint(lambda x: x, torch.ones(1), use_reentrant=False)
    recompute.checkpoint(lambda x: x, torch.ones(1), use_reentrant=False, determinism_check="none")
    assert [kwargs["determinism_check"] for kwargs in seen] == ["none", "default", "default", "none"]


def test_checkpoint_nested_in_a_recompute_runs_its_first_call_as_a_forward():
    seen = []

    def inner(x):
        seen.append(recompute.recomputing())
        return x.sin()

    def outer(x):
        return recompute.checkpoint(inner, x, use_reentrant=False).cos()

    x = torch.linspace(-1, 1, 5, requires_grad=True)
    recompute.checkpoint(outer, x, use_reentrant=False).sum().backward()
    # outer's forward runs inner's forward; outer's recompute runs inner again as a new checkpoint's first call
    # (a forward: its output is used), and only inner's own recompute after that is a recompute.
    assert seen[:2] == [False, False] and all(seen[2:]) and len(seen) >= 3
    assert torch.allclose(x.grad, -torch.sin(torch.sin(x.detach())) * torch.cos(x.detach()))


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_gradients(model, ids, skipped: dict, monkeypatch) -> None:
    """skipped against a full recompute: bitwise where two full runs agree bitwise (always on CPU); where the
    device runs some op of the model non-deterministically (atomics), within that run-to-run noise."""
    monkeypatch.setattr(hook, "recomputing", lambda: False)
    full, again = _grads(model, ids), _grads(model, ids)
    assert skipped.keys() == full.keys()
    for name in full:
        if torch.equal(full[name], again[name]):
            assert torch.equal(skipped[name], full[name]), name
        else:
            noise = relative_error(again[name], full[name])
            assert relative_error(skipped[name], full[name]) <= 4 * noise, f"{name}: beyond run-to-run noise {noise:.1e}"


def _model(model_dir: str, **kwargs):
    # eager attention: the tiny configs' head dim (8) is below what flex attention compiles for on CUDA (16)
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32, device_map=DEVICE, attn_implementation="eager")
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, lora_dropout=0.0, **kwargs)
    randomize_lora_B(model)
    return model.train()


@ALL_ARCHS
def test_recompute_skips_the_experts_output_with_the_same_gradients(model_type, checkpoint, monkeypatch):
    model = _model(checkpoint(model_type))
    ids = token_batch().to(DEVICE)
    calls = spy_only_for_backward(monkeypatch)
    skipped = _grads(model, ids)
    layers = sum(1 for m in model.modules() if getattr(m, "moetune_binding", None) is not None)
    assert calls.count(True) == layers and calls.count(False) == layers  # every MoE layer recomputed once, skipping
    _assert_same_gradients(model, ids, skipped, monkeypatch)


def _checkpointed_moe_layers(model) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(
        any(getattr(m, "moetune_binding", None) is not None for m in layer.modules())
        for layer in model.modules()
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing
    )


@pytest.mark.parametrize(
    "model_type, kwargs",
    [("qwen3_moe", {"offload_checkpoints": True}), ("mixtral", {"checkpoint_layers": 1})],  # mixtral: no dense layer
    ids=["offload", "partial"],
)
def test_offloaded_and_partial_checkpointing_skip_too(model_type, kwargs, checkpoint, monkeypatch):
    model = _model(checkpoint(model_type), **kwargs)
    ids = token_batch().to(DEVICE)
    calls = spy_only_for_backward(monkeypatch)
    skipped = _grads(model, ids)
    assert calls.count(True) == _checkpointed_moe_layers(model) > 0
    _assert_same_gradients(model, ids, skipped, monkeypatch)


def test_without_checkpointing_nothing_is_skipped(checkpoint, monkeypatch):
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32, device_map=DEVICE)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    calls = spy_only_for_backward(monkeypatch)
    model.train()(input_ids=token_batch().to(DEVICE), labels=token_batch().to(DEVICE)).loss.backward()
    assert calls and not any(calls)


@needs_triton
def test_recompute_skip_on_the_triton_kernels(checkpoint, monkeypatch):
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "triton")
    model = _model(checkpoint("qwen3_moe"))
    ids = token_batch().to(DEVICE)
    calls = spy_only_for_backward(monkeypatch)
    skipped = _grads(model, ids)
    assert True in calls
    _assert_same_gradients(model, ids, skipped, monkeypatch)
