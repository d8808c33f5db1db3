"""Devices named by users: parsed, checked against this machine, refused in one line."""

from __future__ import annotations

import pytest
import torch

from moetune.devices import check_device_map, follow_split_devices, gpu_places, resolve_device


def test_resolve_device_defaults_and_parses():
    assert resolve_device(None) == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                    else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")


def test_resolve_device_names_the_argument():
    with pytest.raises(ValueError, match=r"^backend_device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu0'$"):
        resolve_device("gpu0", "backend_device")


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: expected a device this machine has, got cuda but CUDA is not"):
        resolve_device("cuda")


@pytest.mark.parametrize("device_map", [None, "auto", "balanced", "sequential", {"": "cpu"}, "cpu", torch.device("cpu")])
def test_device_maps_passed_on(device_map):
    check_device_map(device_map)


@pytest.mark.parametrize(
    "device_map, match",
    [
        (True, "device_map: expected a device, a GPU index, .* got bool"),
        (1.5, "device_map: expected a device, a GPU index, .* got float"),
        (-2, "device_map: expected a GPU index >= 0, got -2"),
        ("cuda:zero", "device_map: expected a torch device such as 'cpu' or 'cuda:0', got 'cuda:zero'"),
    ],
)
def test_bad_device_maps_refused(device_map, match):
    with pytest.raises(ValueError, match=match):
        check_device_map(device_map)


@pytest.mark.parametrize("placed, places", [
    ({"model.layers.0": 0, "model.layers.1": 1}, {"model.layers.0": 0, "model.layers.1": 1}),
    ({"model.embed_tokens": "cuda:0", "model.layers": torch.device("cuda", 2), "lm_head": "cuda"},
     {"model.embed_tokens": 0, "model.layers": 2, "lm_head": 0}),
    ({"": 0}, {"": 0}),
    ({"model.layers.0": 1, "model.layers.1": "cpu", "lm_head": "disk"}, {"model.layers.0": 1}),  # offloaded: main GPU's
    ({"model.layers.0": True, "model.layers.1": 0}, {"model.layers.1": 0}),
    (None, {}),  # no device_map placement
])
def test_gpu_places_reads_the_cuda_entries_of_a_device_map(placed, places):
    assert gpu_places(placed) == places


class FakeCuda:
    """torch.cuda's current device as a number, so that the device switching runs on a machine without GPUs."""

    def __init__(self, monkeypatch, current: int = 0):
        self.current, self.switches = current, 0
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def set_device(self, index: int) -> None:
        self.current = index
        self.switches += 1


@pytest.fixture
def split_tiny_model(tmp_path, monkeypatch):
    """The tiny qwen3_moe through the real loading path, its map saying layer 0 and the embeddings live on GPU 0,
    layer 1, the norm and lm_head on GPU 1 (the weights stay on the CPU: only the device switching is checked),
    with the current device each layer's experts and the loss saw."""
    from moetune import FastMoEModel
    from moetune.experts import api
    from moetune.models import hook

    from .models.helpers import save_checkpoint

    model, _ = FastMoEModel.from_pretrained(save_checkpoint("qwen3_moe", str(tmp_path), mlp_only_layers=[]))
    model.hf_device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                           "model.norm": 1, "lm_head": 1}
    cuda = FakeCuda(monkeypatch)
    seen = []
    real = api.moe_experts

    def spy(*args, **kwargs):
        seen.append(("experts", kwargs.get("only_for_backward", False), cuda.current))
        return real(*args, **kwargs)

    monkeypatch.setattr(hook, "moe_experts", spy)
    assert follow_split_devices(model) == [0, 1]
    return FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0), cuda, seen


def test_a_split_model_runs_each_layer_with_its_gpu_current(split_tiny_model):
    model, cuda, seen = split_tiny_model
    model.train()  # (get_peft_model turned gradient checkpointing on)
    for caller in (0, 1):
        seen.clear()
        cuda.current = caller
        ids = torch.randint(4, 100, (1, 7))
        model(input_ids=ids, labels=ids).loss.backward()
        # The forward's calls; the recomputes run in the backward, where on GPUs autograd's thread for the layer's
        # GPU has it current (on this CPU the backward runs on the caller's thread, so they are not checked here).
        assert [device for _, recompute, device in seen if not recompute] == [0, 1]
        assert cuda.current == caller  # the caller's device again


def test_a_split_model_sets_the_callers_device_back_when_a_layer_raises(split_tiny_model, monkeypatch):
    model, cuda, seen = split_tiny_model
    layer = model.get_base_model().model.layers[1]

    def fail(*args, **kwargs):
        raise RuntimeError("a layer failed")

    monkeypatch.setattr(layer.self_attn, "forward", fail)
    cuda.current = 0
    with pytest.raises(RuntimeError, match="a layer failed"):
        model(input_ids=torch.randint(4, 100, (1, 5)))
    assert cuda.current == 0


def test_a_model_on_one_gpu_gets_no_device_hooks(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for placed in ({"0": 0, "1": 0}, {"0": 0, "1": "cpu"}, None):
        model.hf_device_map = placed
        assert follow_split_devices(model) == []
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_trains_as_on_one(tmp_path, monkeypatch):
    """The tiny qwen3_moe on one GPU and split over two (moetune's Triton experts, fused loss, norms, router, rotary
    and AdamWBf16's launch on each GPU): the same loss, LoRA gradients and stepped weights."""
    from moetune import FastMoEModel
    from moetune.training.bf16_adamw import AdamWBf16

    from .models.helpers import randomize_lora_B, save_checkpoint, token_batch

    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "triton")
    model_dir = save_checkpoint("qwen3_moe", str(tmp_path), num_hidden_layers=4, mlp_only_layers=[])
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    runs = []
    for device_map in ("cuda:0", split):
        model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map)
        model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        randomize_lora_B(model)
        model.train()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = AdamWBf16(list(trainable.values()), lr=1e-2)
        ids = token_batch().to("cuda:0")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad.cpu() for name, p in trainable.items()}
        optimizer.step()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        runs.append((loss.item(), grads, {name: p.detach().cpu() for name, p in trainable.items()}))
        assert torch.cuda.current_device() == 0
    (loss_one, grads_one, stepped_one), (loss_split, grads_split, stepped_split) = runs
    assert {p.device.index for p in trainable.values()} == {0, 1}
    assert loss_split == pytest.approx(loss_one, rel=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_split[name], grads_one[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(stepped_split[name], stepped_one[name], rtol=1e-5, atol=1e-7, msg=name)
