"""Devices named by users (select_backend's device=, from_pretrained's device_map=): one-line errors for a device
string torch cannot parse or a GPU this machine does not have, before anything is built on it."""

from __future__ import annotations

import torch

# device_map strings that ask accelerate to place the model, not a device
PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device, argument: str = "device") -> torch.device:
    """torch.device(device) (None: the current GPU, else CPU; "cuda": the current GPU), or ValueError naming
    `argument` when torch cannot parse it or this machine lacks the device."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{argument}: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}: expected a device this machine has, got {device} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        check_gpu_index(device, argument)
    return device


def check_gpu_index(device: torch.device, argument: str = "device") -> None:
    """ValueError naming `argument` when `device` is a CUDA GPU index past this machine's GPUs."""
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{argument}: expected a device this machine has, got {device} "
                         f"but it has {torch.cuda.device_count()} CUDA device(s)")


def check_device_map(device_map) -> None:
    """A device_map naming one device (a string, torch.device or GPU index) must name one this machine has;
    placement strategies ("auto", ...) and per-module dicts go to transformers as they are."""
    if device_map is None or isinstance(device_map, dict) or device_map in PLACEMENT_STRATEGIES:
        return
    if isinstance(device_map, bool) or not isinstance(device_map, (str, torch.device, int)):
        raise ValueError(f"device_map: expected a device, a GPU index, one of {', '.join(PLACEMENT_STRATEGIES)} "
                         f"or a dict of module names to devices, got {type(device_map).__name__}")
    if isinstance(device_map, int):
        if device_map < 0:
            raise ValueError(f"device_map: expected a GPU index >= 0, got {device_map}")
        device_map = f"cuda:{device_map}"
    resolve_device(device_map, "device_map")
