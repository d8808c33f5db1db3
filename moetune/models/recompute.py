"""Which decoder-layer calls are gradient-checkpoint recomputes.

A checkpointed layer runs twice: in forward, and again in backward to rebuild the tensors its backward
saved. The second run's output is thrown away (non-reentrant checkpoint keeps only what is saved; the
reentrant one backpropagates through it, which reads no output values either). In every architecture
moetune supports, the routed experts' output meets only additions before the layer ends (the residual,
shared experts), so no saved tensor depends on its values: during a recompute the experts may skip the
down projection and the sum over k (see moe_experts' only_for_backward). tests/models/test_recompute.py
checks that gradients stay bitwise equal for every registered architecture.

`checkpoint` is torch.utils.checkpoint.checkpoint with the function marked: its first call is the forward
(`checkpointed_forward()` true), later calls (one per backward through it) run with `recomputing()` true on their
thread (the autograd device thread runs the recompute). What a forward makes that its recompute would make again
from the same parameters (the LoRA factors' casts, lora_linear.py) may be handed from one to the other through
`handover()`: a dict of that one checkpoint call's own, which lives as long as the checkpoint does (with its
autograd graph), so nothing outlives a forward whose backward never runs, and no other checkpoint can take it.
"""

from __future__ import annotations

import functools
import os
import threading

import torch.utils.checkpoint

__all__ = ["checkpoint", "checkpointed_forward", "handover", "marked", "recomputing"]

_state = threading.local()


def recomputing() -> bool:
    """True inside a checkpointed function's second or later call (its recompute in backward)."""
    return getattr(_state, "call", 0) > 1


def checkpointed_forward() -> bool:
    """True inside a checkpointed function's first call (the forward whose tensors its recompute makes again)."""
    return getattr(_state, "call", 0) == 1


def handover() -> dict | None:
    """The innermost running checkpoint call's hand-over dict (the same in its forward and its recompute), or None
    outside a marked checkpoint."""
    return getattr(_state, "handover", None)


def marked(function):
    """`function`, with every call after the first run as a recompute."""
    calls = 0
    store: dict = {}

    @functools.wraps(function)
    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        # Set either way: a checkpoint nested inside another's recompute runs its own first call as a forward.
        previous = getattr(_state, "call", 0), getattr(_state, "handover", None)
        _state.call, _state.handover = min(calls, 2), store
        try:
            return function(*args, **kwargs)
        finally:
            _state.call, _state.handover = previous

    return run


def checkpoint(function, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint(function, *args, **kwargs), with its recompute marked.

    determinism_check defaults to "none", unless MOETUNE_CHECK_RECOMPUTE=1 (the test suite sets it): torch's default
    compares the shape, dtype and device of every tensor the recompute saves with the forward's, in Python, at every
    layer of every step (about 0.1 ms of host time a layer on a 2-core CPU; the step of a whole model at 8K tokens
    waits on its host). torch still checks that the recompute saves as many tensors. tests/models/test_recompute.py
    checks the skipping recompute's gradients against a full recompute's for every registered architecture, and
    tests/test_fast_model.py checkpointed layers' against unchecked ones'. A caller's own determinism_check is kept."""
    if "determinism_check" not in kwargs:
        kwargs["determinism_check"] = "default" if os.environ.get("MOETUNE_CHECK_RECOMPUTE") == "1" else "none"
    return torch.utils.checkpoint.checkpoint(marked(function), *args, **kwargs)
