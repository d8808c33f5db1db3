"""Swapping a fused forward onto recognised module instances, and back: no class is patched.

fast_norms.py and fast_routers.py give each module whose code they recognise an instance `forward` (a method bound
to it) and a marker attribute naming the recognised form; state_dict keys and parameters stay as they are.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

__all__ = ["install", "uninstall"]


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
