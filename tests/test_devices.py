"""Devices named by users: parsed, checked against this machine, refused in one line."""

from __future__ import annotations

import pytest
import torch

from moetune.devices import check_device_map, resolve_device


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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("placement", ["split over two GPUs", "on cuda:1 with cuda:0 current"])
def test_a_model_off_the_current_gpu_trains_as_on_it(placement, tmp_path, monkeypatch):
    """The tiny qwen3_moe on cuda:0, against the same model split over two GPUs by a device_map, or wholly on cuda:1
    while cuda:0 stays current: moetune's Triton launches (experts, fused loss, norms, router, rotary, AdamWBf16)
    each run on their operands' GPU, and give the same loss, LoRA gradients and stepped weights."""
    import triton

    from moetune import FastMoEModel
    from moetune.training.bf16_adamw import AdamWBf16

    from .models.helpers import randomize_lora_B, save_checkpoint, token_batch

    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "triton")
    # Both of Triton's paths (its own and the direct one) take the launch's stream here: which GPU the stream is
    # for, and which GPU is current then (equal results alone could hide a launch on the wrong GPU through peer access)
    launched_on = []
    driver = triton.runtime.driver.active
    stream_of = driver.get_current_stream
    monkeypatch.setattr(driver, "get_current_stream",
                        lambda index: launched_on.append((index, torch.cuda.current_device())) or stream_of(index))
    model_dir = save_checkpoint("qwen3_moe", str(tmp_path), num_hidden_layers=4, mlp_only_layers=[])
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    runs = []
    for device_map in ("cuda:0", split if placement.startswith("split") else "cuda:1"):
        torch.cuda.set_device(0)
        launched_on.clear()
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
        for index in range(2):
            torch.cuda.synchronize(index)
        runs.append((loss.item(), grads, {name: p.detach().cpu() for name, p in trainable.items()}))
        assert torch.cuda.current_device() == 0
    expected = {0, 1} if placement.startswith("split") else {1}
    assert {p.device.index for p in trainable.values()} == expected
    assert {stream for stream, _ in launched_on} == expected and all(stream == gpu for stream, gpu in launched_on)
    (loss_one, grads_one, stepped_one), (loss_other, grads_other, stepped_other) = runs
    assert loss_other == pytest.approx(loss_one, rel=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_other[name], grads_one[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(stepped_other[name], stepped_one[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_moetune_train_on_the_second_gpu_makes_it_current_for_the_run(tmp_path, capsys, monkeypatch):
    from moetune.training import loop

    from .training.helpers import run_cli

    seen = []
    real_run = loop.run
    monkeypatch.setattr(loop, "run", lambda plan, console=None: seen.append(torch.cuda.current_device())
                        or real_run(plan, console))
    torch.cuda.set_device(0)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 2, "--device", "cuda:1")
    assert code == 0, stderr
    assert seen == [1] and torch.cuda.current_device() == 0
