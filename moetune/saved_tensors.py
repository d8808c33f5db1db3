"""What an autograd Function keeps for backward: save_for_backward, except for frozen parameters.

Under gradient checkpointing every tensor a Function saves costs three hook calls of host time (pack in the forward,
pack again in the recompute, unpack in backward), and a checkpointed decoder layer saves ~60; the whole-model step at
8K tokens waits on its host (NOTES runs 51-52). A frozen parameter, or a view of one, lives as long as its module:
held on ctx it costs no memory, and it is nothing checkpointing could free. Everything else goes through
save_for_backward, so that checkpointing frees and recomputes it: activations, casts made for this call (a bf16 copy
of an fp32 weight under autocast), and trainable parameters (autograd then catches an in-place change to one in a
layer that is not checkpointed).

    save(ctx, x, weight, rstd)          in forward (None allowed)
    x, weight, rstd = load(ctx)         in backward

hold: tensors made for the call that are small by construction (a LoRA factor cast to the compute dtype: R x (in +
out) elements) or shared by every layer (rotary tables), which the caller holds on ctx too, stating the bound.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load", "save"]

_SAVED = object()  # a slot filled from ctx.saved_tensors


def _frozen_parameter(t: torch.Tensor | None) -> bool:
    # Cheapest tests first (this runs for every tensor a Function keeps, at every call): reading t._base makes a
    # Python object for the base tensor.
    if t is None:
        return True
    if isinstance(t, nn.Parameter):
        return not t.requires_grad
    if t.requires_grad or not t._is_view():
        return False
    base = t._base
    return isinstance(base, nn.Parameter) and not base.requires_grad


def save(ctx, *tensors: torch.Tensor | None, hold: tuple = ()) -> None:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace t._is_view() and would run the whole Function eagerly (a graph break at every LoRA
        # projection); a compiled graph keeps what it saves itself, so all of it goes through save_for_backward.
        ctx._moetune_slots = tuple(None if t is None else _SAVED for t in tensors)
        ctx.save_for_backward(*(t for t in tensors if t is not None))
        return
    held = [any(t is h for h in hold) or _frozen_parameter(t) for t in tensors]
    ctx._moetune_slots = tuple(t if keep else _SAVED for t, keep in zip(tensors, held))
    ctx.save_for_backward(*(t for t, keep in zip(tensors, held) if not keep))


def load(ctx) -> tuple[torch.Tensor | None, ...]:
    saved = iter(ctx.saved_tensors)
    return tuple(next(saved) if slot is _SAVED else slot for slot in ctx._moetune_slots)
