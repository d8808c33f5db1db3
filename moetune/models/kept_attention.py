"""Checkpointed decoder layers that keep their attention output: the recompute skips the attention kernel.

A checkpointed layer runs its forward twice, the second time in backward to rebuild what backward reads. The
attention kernel is the most expensive part of that recompute per byte it produces: at 8K tokens on Qwen3-30B-A3B
its forward takes ~0.85 ms per layer (a quarter of the layer's recompute) for a 64 MiB output. A layer that keeps
it stores the kernel's outputs (attention output, log-sum-exp and the like) in the first forward and hands them
back in the recompute instead of running the kernel again; everything else is recomputed as before. Backward
then reads the same values as with a full recompute: the gradients are bitwise equal (tests/models).

Design: torch's selective activation checkpointing (`create_selective_checkpoint_contexts`) does the same, but it
requires the recompute to run exactly the ops of the forward, and moetune's recompute runs fewer (the experts
skip their output, see recompute.py). Its dispatch modes also see every op of the layer, in Python: host time the
GPU then waits for (run 42, H200: a dispatch mode over the whole attention module, ~70 ops, made the 8-layer Qwen3
step at 8K 5-18 ms slower although it saved 7 ms of attention kernels). Here `context_fn`
(torch.utils.checkpoint's hook for this) only marks which checkpoint call is running and in which phase, and
transformers' "sdpa" attention function (its AttentionInterface registry) is wrapped: inside a keeping
checkpoint call it runs under a dispatch mode that stores or replays the outputs of the fused attention ops
(SDPA's flash, memory-efficient, cuDNN and CPU kernels), a handful of ops; elsewhere it is the original
function. Attention outside those ops (eager, flex attention) is recomputed as before.

Each stored output is handed back once and released: a second backward through the same graph
(retain_graph=True) raises, as torch's selective checkpointing does.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["ATTENTION_OPS", "keep_attention", "kept_attention_layers", "largest_kept_bytes", "reset_kept_bytes"]

_NAMES = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in _NAMES if hasattr(torch.ops.aten, name))

_ATTR = "_moetune_keeps_attention"
_state = threading.local()  # .stash: the running checkpoint call's _Stash, or None; .largest: see largest_kept_bytes


class _Stash:
    """The attention outputs of one checkpoint call, in call order."""

    __slots__ = ("outputs", "next", "replaying", "nbytes")

    def __init__(self):
        self.outputs: list = []
        self.next = 0
        self.replaying = False
        self.nbytes = 0

    def store(self, out) -> None:
        out = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
        self.outputs.append(out)
        self.nbytes += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        _state.largest = max(getattr(_state, "largest", 0), self.nbytes)


class _StoreOrReplay(TorchDispatchMode):
    """Inside transformers' sdpa function: the fused attention ops' outputs are stored (forward) or handed back
    (recompute); every other op runs as usual."""

    def __init__(self, stash: _Stash):
        super().__init__()
        self.stash = stash

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in ATTENTION_OPS:
            return func(*args, **(kwargs or {}))
        stash = self.stash
        if not stash.replaying:
            out = func(*args, **(kwargs or {}))
            stash.store(out)
            return out
        if stash.next >= len(stash.outputs) or stash.outputs[stash.next] is None:
            raise RuntimeError(
                "kept attention: the recompute asked for an attention output the forward did not keep (a second "
                "backward through the same graph, or a layer whose attention calls changed between forward and "
                "recompute); fit_checkpoint_layers(..., keep_attention=False) plans without keeping"
            )
        out, stash.outputs[stash.next] = stash.outputs[stash.next], None  # released once handed back
        stash.next += 1
        return out


class _Phase:
    """Marks a checkpoint call's forward or recompute on this thread (re-enterable: a second backward enters the
    recompute context again)."""

    def __init__(self, stash: _Stash, replaying: bool):
        self.stash, self.replaying, self.previous = stash, replaying, []

    def __enter__(self):
        self.stash.replaying, self.stash.next = self.replaying, 0
        self.previous.append(getattr(_state, "stash", None))
        _state.stash = self.stash

    def __exit__(self, *exc):
        _state.stash = self.previous.pop()


def _context_fn():
    """torch.utils.checkpoint's context_fn: (forward context, recompute context) sharing one stash."""
    stash = _Stash()
    return _Phase(stash, False), _Phase(stash, True)


def _keeping_sdpa(original, *args, **kwargs):
    stash = getattr(_state, "stash", None)
    if stash is None:  # not inside a keeping layer's checkpoint (eval, no grad, not checkpointed, another model)
        return original(*args, **kwargs)
    with _StoreOrReplay(stash):
        return original(*args, **kwargs)


def _wrap_sdpa() -> bool:
    """Wrap transformers' registered "sdpa" attention function (once, process-wide; transparent outside a
    keeping checkpoint call). False where this transformers has no such registry entry."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    mapping = getattr(AttentionInterface, "_global_mapping", {})
    current = mapping.get("sdpa")
    if current is None:
        return False
    if not (isinstance(current, functools.partial) and current.func is _keeping_sdpa):
        AttentionInterface.register("sdpa", functools.partial(_keeping_sdpa, current))
    return True


def _set_context(layer, keep: bool) -> bool:
    """Add or remove the context_fn on the layer's checkpoint function (a functools.partial, as transformers and
    moetune install it); False where the layer cannot keep its attention."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    attention = getattr(layer, "self_attn", None)
    if not isinstance(func, functools.partial) or attention is None:
        return False
    # Flex attention runs compiled: a dispatch mode around it would get in the way. Eager attention has no fused
    # op to keep.
    if getattr(getattr(attention, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    options = dict(func.keywords)
    if options.get("use_reentrant"):
        return False  # the reentrant checkpoint takes no context_fn
    if keep:
        if not _wrap_sdpa():
            return False
        options["context_fn"] = _context_fn
    elif options.get("context_fn") is _context_fn:
        del options["context_fn"]
    layer._gradient_checkpointing_func = functools.partial(func.func, *func.args, **options)
    setattr(layer, _ATTR, keep)
    return True


def keep_attention(layers: list, count: int) -> int:
    """Make the first `count` of these checkpointed decoder layers keep their attention output (the rest
    recompute it); returns how many keep it. A layer must have gradient checkpointing enabled (its checkpoint
    function installed) and a `self_attn` module; where checkpointing is off for a layer the setting waits
    until it is on."""
    kept = 0
    for i, layer in enumerate(layers):
        kept += _set_context(layer, i < count) and i < count
    return kept


def kept_attention_layers(layers: list) -> int:
    return sum(bool(getattr(layer, _ATTR, False)) for layer in layers)


def reset_kept_bytes() -> None:
    _state.largest = 0


def largest_kept_bytes() -> int:
    """The most bytes one checkpoint call on this thread kept since reset_kept_bytes (the planner's measure)."""
    return getattr(_state, "largest", 0)
