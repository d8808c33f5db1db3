"""Swapping a fused forward onto recognised module instances, and back: no class is patched.

fast_norms.py and fast_routers.py give each module whose code they recognise an instance `forward` (a method bound
to it) and a marker attribute naming the recognised form; state_dict keys and parameters stay as they are.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

__all__ = ["class_forward", "install", "runs_more_than_forward", "uninstall"]


def class_forward(module: nn.Module):
    """The forward function of module's class, which a recogniser reads, or None where that is not what a call runs:
    the class has no forward, the instance has its own (moetune's or another), or the class overrides __call__."""
    forward = getattr(type(module), "forward", None)
    if forward is None or "forward" in module.__dict__ or type(module).__call__ is not nn.Module.__call__:
        return None
    return forward


def runs_more_than_forward(module: nn.Module) -> bool:
    """Whether calling module runs more than its forward: hooks of its own or registered for every module, or a
    forward put on the instance. A fused path that computes a module's work without calling it must then call it."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def install(model: nn.Module, marker: str, recognise: Callable[[nn.Module], str | None], fused) -> tuple[int, list]:
    """Give every module of `model` that `recognise` names a form for the instance forward `fused` (a function of
    (self, ...)) and the marker attribute holding that form. Idempotent. Returns (how many modules run `fused`, the
    modules not recognised)."""
    count, others = 0, []
    for module in model.modules():
        if marker in module.__dict__:
            count += 1
            continue
        form = recognise(module)
        if form is None:
            others.append(module)
            continue
        module.__dict__[marker] = form
        module.forward = types.MethodType(fused, module)
        count += 1
    return count, others


def uninstall(model: nn.Module, marker: str, fused) -> int:
    """Undo `install`: the class's forward again, unless someone put another forward on the instance after it (an
    offloading hook, say), which stays. Returns how many modules were marked."""
    count = 0
    for module in model.modules():
        if marker in module.__dict__:
            del module.__dict__[marker]
            if getattr(module.__dict__.get("forward"), "__func__", None) is fused:
                del module.__dict__["forward"]
            count += 1
    return count
