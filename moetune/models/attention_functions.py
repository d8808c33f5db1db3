"""Wrapping one of transformers' registered attention functions (its AttentionInterface) for the whole process.

transformers' attention modules look their attention function up by name at every call
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`), so a function registered under the
same name serves every model of the process. moetune wraps two this way: "sdpa" (kept_attention.py, the recompute
of checkpointed layers) and "flex_attention" (fast_sinks.py, gpt-oss's sinks). The wrapper is
`functools.partial(wrapper, original)`: it can tell it is installed, find the original to restore, and leave a
wrapper someone registered after it in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["registered", "unwrap", "wrap", "wrapped"]


def _mapping() -> dict | None:
    try:
        from transformers import AttentionInterface
    except ImportError:
        return None
    return getattr(AttentionInterface, "_global_mapping", None)


def registered(name: str):
    """The function transformers has registered under `name` now, or None."""
    mapping = _mapping()
    return None if mapping is None else mapping.get(name)


def wrapped(name: str, wrapper: Callable) -> bool:
    """Whether the function registered under `name` is `wrapper` around another."""
    current = registered(name)
    return isinstance(current, functools.partial) and current.func is wrapper


def wrap(name: str, wrapper: Callable) -> bool:
    """Register functools.partial(wrapper, original) under `name` (idempotent). False where transformers has no
    function of that name."""
    current = registered(name)
    if current is None:
        return False
    if not wrapped(name, wrapper):
        from transformers import AttentionInterface

        AttentionInterface.register(name, functools.partial(wrapper, current))
    return True


def unwrap(name: str, wrapper: Callable) -> bool:
    """Register the original back where `wrapper` is the current function; False otherwise (a wrapper registered
    after it stays)."""
    if not wrapped(name, wrapper):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(name, registered(name).args[0])
    return True
