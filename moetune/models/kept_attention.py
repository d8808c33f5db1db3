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
transformers' "sdpa" attention function (its AttentionInterface registry; also packed rows' varlen attention,
packed_attention.py) is wrapped: inside a keeping
checkpoint call it runs under a dispatch mode that stores or replays the outputs of the fused attention ops
(SDPA's flash, memory-efficient, cuDNN and CPU kernels), a handful of ops; elsewhere it is the original
function. Attention outside those ops (eager, flex attention) is recomputed as before.

Stored outputs live as long as the checkpoint call that stored them (its recompute context holds them): until
autograd releases that layer's saved tensors, so a second backward through the same graph (retain_graph=True)
replays them again. A fused op called with dropout runs again in the recompute (its random draws must repeat
in order for everything after it), and a layer whose attention module has dropout in training keeps nothing.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from . import attention_functions
from .packed_attention import NAME as PACKED_VARLEN

__all__ = ["ATTENTION_OPS", "keep_attention", "kept_attention_layers", "largest_kept_bytes", "reset_kept_bytes"]

_NAMES = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)

KEEPING = ("sdpa", PACKED_VARLEN)  # the attention implementations whose fused kernels a layer can keep


def _varlen_ops() -> set:
    """torch's varlen attention op (packed rows, packed_attention.py), where this torch has it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)

        return {torch.ops.torch_attn._varlen_attn.default}
    except (ImportError, AttributeError, RuntimeError):
        return set()


ATTENTION_OPS = frozenset({getattr(torch.ops.aten, name).default for name in _NAMES if hasattr(torch.ops.aten, name)}
                          | _varlen_ops())

_state = threading.local()  # .stash: the running checkpoint call's _Stash, or None; .largest: see largest_kept_bytes


_RERUN = object()  # a stash entry for a call with dropout: the recompute runs the kernel again


class _Stash:
    """The fused attention calls of one checkpoint call, in call order: (op, outputs or _RERUN)."""

    __slots__ = ("entries", "next", "replaying", "nbytes")

    def __init__(self):
        self.entries: list = []
        self.next = 0
        self.replaying = False
        self.nbytes = 0

    def store(self, func, out) -> None:
        if out is not _RERUN:
            out = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
            self.nbytes += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            _state.largest = max(getattr(_state, "largest", 0), self.nbytes)
        self.entries.append((func, out))


def _has_dropout(func, args, kwargs) -> bool:
    for i, argument in enumerate(func._schema.arguments):
        if argument.name == "dropout_p":
            value = args[i] if i < len(args) else (kwargs or {}).get("dropout_p", 0.0)
            return bool(value)
    return False


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
            stash.store(func, _RERUN if _has_dropout(func, args, kwargs) else out)
            return out
        if stash.next >= len(stash.entries) or stash.entries[stash.next][0] is not func:
            ran = stash.entries[stash.next][0] if stash.next < len(stash.entries) else "nothing"
            raise RuntimeError(
                f"kept attention: the recompute ran {func} where the forward ran {ran} (the attention calls "
                "changed between forward and recompute, e.g. an SDPA backend context active in one only); "
                "keep_attention(layers, 0) or fit_checkpoint_layers(..., keep_attention=False) turns keeping off"
            )
        out = stash.entries[stash.next][1]
        stash.next += 1
        return func(*args, **(kwargs or {})) if out is _RERUN else out


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


def _keeping(original, *args, **kwargs):
    stash = getattr(_state, "stash", None)
    if stash is None:  # not inside a keeping layer's checkpoint (eval, no grad, not checkpointed, another model)
        return original(*args, **kwargs)
    with _StoreOrReplay(stash):
        return original(*args, **kwargs)


def _wrap(implementation: str) -> bool:
    """Wrap transformers' attention function registered under `implementation` (once, process-wide; transparent
    outside a keeping checkpoint call). False where this transformers has no such registry entry."""
    return attention_functions.wrap(implementation, _keeping)


def _set_context(layer, keep: bool) -> bool:
    """Add or remove the context_fn on the layer's checkpoint function (a functools.partial, as transformers and
    moetune install it; also on the standard one offloading keeps to restore); False where the layer cannot
    keep its attention."""
    from ..training.offload import STANDARD_ATTR

    func = getattr(layer, "_gradient_checkpointing_func", None)
    attention = getattr(layer, "self_attn", None)
    if not isinstance(func, functools.partial) or attention is None:
        return False
    # Flex attention runs compiled: a dispatch mode around it would get in the way. Eager attention has no fused
    # op to keep. Packed rows' varlen attention (--packing on a GPU) has one.
    implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
    if implementation not in KEEPING:
        return False
    if getattr(attention, "attention_dropout", 0.0):  # transformers passes it to SDPA in training
        return False
    if func.keywords.get("use_reentrant") or func.keywords.get("context_fn", _context_fn) is not _context_fn:
        return False  # the reentrant checkpoint takes no context_fn; a caller's own context_fn stays
    if keep and not _wrap(implementation):
        return False
    for name in ("_gradient_checkpointing_func", STANDARD_ATTR):
        func = getattr(layer, name, None)
        if isinstance(func, functools.partial):
            options = {k: v for k, v in func.keywords.items() if k != "context_fn"}
            if keep:
                options["context_fn"] = _context_fn
            setattr(layer, name, functools.partial(func.func, *func.args, **options))
    return True


def _keeps(layer) -> bool:
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return isinstance(func, functools.partial) and func.keywords.get("context_fn") is _context_fn


def keep_attention(layers: list, count: int) -> int:
    """Set the first `count` of these decoder layers to keep their attention output when checkpointed (the rest
    recompute it); returns how many are set to. A layer needs gradient checkpointing enabled (its checkpoint
    function installed), a `self_attn` module on sdpa attention without dropout; the output is kept where SDPA
    runs a fused kernel (not its math path: then nothing is stored, see largest_kept_bytes)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected an integer >= 0, got {count!r}")
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"layers: expected a list of decoder layers, got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        _set_context(layer, i < count)
    return kept_attention_layers(layers[:count])


def kept_attention_layers(layers: list) -> int:
    """How many of these layers are set to keep their attention output (read from their checkpoint function)."""
    return sum(_keeps(layer) for layer in layers)


def reset_kept_bytes() -> None:
    _state.largest = 0


def largest_kept_bytes() -> int:
    """The most bytes one checkpoint call on this thread kept since reset_kept_bytes (the planner's measure)."""
    return getattr(_state, "largest", 0)
