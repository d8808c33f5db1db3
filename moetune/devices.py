"""Devices named by users (select_backend's device=, from_pretrained's device_map=): one-line errors for a device
string torch cannot parse or a GPU this machine does not have, before anything is built on it."""

from __future__ import annotations

import contextlib
import functools
import threading

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


def gpu_places(device_map) -> dict[str, int]:
    """The entries of accelerate's hf_device_map placed on a CUDA GPU, as {module name: GPU index} ("cuda" alone
    is GPU 0, as accelerate places it); CPU- or disk-offloaded entries are left out (they run on the main GPU)."""
    places = {}
    for name, place in (device_map or {}).items():
        if isinstance(place, int) and not isinstance(place, bool):
            places[name] = place
        elif isinstance(place, (str, torch.device)) and str(place).startswith("cuda"):
            places[name] = torch.device(place).index or 0
    return places


def follow_split_devices(model) -> list[int]:
    """For a model a device_map split over several CUDA GPUs in one process (accelerate's hf_device_map, e.g.
    "auto" on a machine with several): each module the map placed runs its forward with its GPU as the current
    device, and the caller's current device is set back after it (also when the forward raises).

    Why: moetune's Triton kernels launch, as Triton's own launcher does, on the current GPU and its stream, and
    torch's ops on a tensor's own device; without this a layer on cuda:1 would launch its kernels on cuda:0.
    The backward needs nothing: autograd runs each GPU's nodes on a thread whose current device is that GPU, and a
    checkpointed layer's recompute runs inside the backward of the layer's own nodes, so on its GPU's thread
    (transformers 5.17 recomputes the layer's `__call__`, these hooks included; 5.25 its `forward` alone). Models on one
    GPU (and DDP / FSDP2, one GPU a process) get no hooks. Returns the GPUs the model is split over ([] where it is
    not split)."""
    places = gpu_places(getattr(model, "hf_device_map", None))
    gpus = sorted(set(places.values()))
    if len(gpus) < 2:
        return []
    for name, index in places.items():
        module = model.get_submodule(name)
        # First in, last out: the other hooks of the module run on its GPU too.
        module.register_forward_pre_hook(functools.partial(_enter_device, index), prepend=True)
        module.register_forward_hook(_leave_device, always_call=True)
    return gpus


def current_gpu(device: torch.device):
    """A context making `device` the current GPU (Triton launches there) and setting the caller's back after; does
    nothing for another kind of device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Each thread's (module, device to set back) pairs, innermost last: a placed module may sit inside another ("" and
# its layers), and a checkpointed layer's recompute runs on autograd's thread for its GPU.
_callers = threading.local()


def _enter_device(index: int, module, args) -> None:
    stack = _callers.__dict__.setdefault("stack", [])
    stack.append((module, torch.cuda.current_device()))
    torch.cuda.set_device(index)


def _leave_device(module, args, output) -> None:
    stack = _callers.__dict__.get("stack")
    if stack and stack[-1][0] is module:  # (not ours where our pre-hook never ran: an earlier one raised)
        torch.cuda.set_device(stack.pop()[1])
