"""Devices named by users: parsed, checked against this machine, refused in one line."""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch

from moetune.devices import check_device_map, resolve_device, warn_if_split_over_gpus


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


@pytest.mark.parametrize("placed, split", [
    ({"model.layers.0": 0, "model.layers.1": 1}, [0, 1]),
    ({"model.embed_tokens": "cuda:0", "model.layers": torch.device("cuda", 2), "lm_head": "cuda"}, [0, 2]),
    ({"": 0}, None),
    ({"model.layers.0": 1, "model.layers.1": "cpu", "lm_head": "disk"}, None),  # offloaded weights run on one GPU
    ({"model.layers.0": True, "model.layers.1": 0}, None),
    (None, None),  # no device_map placement
])
def test_a_model_split_over_several_gpus_is_warned_about_in_one_line(placed, split):
    model = types.SimpleNamespace(hf_device_map=placed)
    if split is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_split_over_gpus(model)
        return
    with pytest.warns(UserWarning, match="^" + re.escape(f"device_map: the model is split over GPUs {split};")) as record:
        warn_if_split_over_gpus(model)
    assert "\n" not in str(record[0].message)
