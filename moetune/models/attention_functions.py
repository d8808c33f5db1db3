"""Wrapping one of transformers' registered attention or attention-mask functions for the whole process.

transformers' attention modules look their attention function up by name at every call
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`), and its mask builders their mask
function (`ALL_MASK_ATTENTION_FUNCTIONS[...]`), so a function registered under the same name serves every model of
the process. moetune wraps "sdpa" and its own packed rows' varlen function (kept_attention.py, the recompute of
checkpointed layers), "flex_attention" (fast_sinks.py, gpt-oss's sinks) and the "flex_attention" mask builder
(fast_sinks.py: it marks plain causal masks).
The wrapper is `functools.partial(wrapper, original)`: it can tell it is installed, find the original to restore,
and leave a wrapper someone registered after it in place. interface: "attention" (AttentionInterface) or "mask"
(masking_utils.AttentionMaskInterface).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

__all__ = ["registered", "unwrap", "wrap", "wrapped"]

_INTERFACES = {"attention": ("transformers", "AttentionInterface"),
               "mask": ("transformers.masking_utils", "AttentionMaskInterface")}


def _interface(interface: str):
    """transformers' interface class, or None where this transformers has none."""
    module, name = _INTERFACES[interface]
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def registered(name: str, interface: str = "attention"):
    """The function transformers has registered under `name` now, or None."""
    mapping = getattr(_interface(interface), "_global_mapping", None)
    return None if mapping is None else mapping.get(name)


def wrapped(name: str, wrapper: Callable, interface: str = "attention") -> bool:
    """Whether the function registered under `name` is `wrapper` around another."""
    current = registered(name, interface)
    return isinstance(current, functools.partial) and current.func is wrapper


def wrap(name: str, wrapper: Callable, interface: str = "attention") -> bool:
    """Register functools.partial(wrapper, original) under `name` (idempotent). False where transformers has no
    function of that name."""
    current = registered(name, interface)
    if current is None:
        return False
    if not wrapped(name, wrapper, interface):
        _interface(interface).register(name, functools.partial(wrapper, current))
    return True


def unwrap(name: str, wrapper: Callable, interface: str = "attention") -> bool:
    """Register the original back where `wrapper` is the current function; False otherwise (a wrapper registered
    after it stays)."""
    if not wrapped(name, wrapper, interface):
        return False
    _interface(interface).register(name, registered(name, interface).args[0])
    return True
