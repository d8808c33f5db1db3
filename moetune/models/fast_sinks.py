"""gpt-oss's attention sinks on flex attention's output in one launch each way (moetune/kernels/attention_sinks.py).

For models that run flex attention with sinks, on CUDA GPUs, by default (`FastMoEModel.from_pretrained(...,
fused_sinks=False)` keeps transformers' function; measured in NOTES, runs 62 and 63).
transformers' flex attention function renormalises flex's output with its log-sum-exp and the sinks in about a
dozen launches each way, two of them reading and writing the whole output twice, then copies it transposed; in a
whole gpt-oss-20b step at 8K that is ~14 ms of GPU time (NOTES, run 61g).

`install_fast_sinks()` wraps transformers' registered "flex_attention" function (process-wide, once, as
kept_attention.py wraps "sdpa"; attention_functions.py). A call with sinks, a block mask and nothing else flex's
score_mod would have to apply (softcap, an additive mask, a position bias) calls transformers' own compiled flex
attention with the lse requested, exactly as transformers does (the same compiled function, the same kernel
options, the key/value heads shared through enable_gqa), then the sink kernel, which writes the output in the
[B, T, H, D] layout transformers returns. Every other call, and every call where the kernel cannot run (a CPU
tensor outside Triton's interpreter, a head count transformers would repeat the key/value heads for, torch.compile
tracing the model, a transformers without the functions used here), is transformers' function unchanged.
`uninstall_fast_sinks()` puts it back.

Plain causal attention (gpt-oss's full-attention layers, a mask with no padding, packing or offset) skips flex
attention: with CAUSAL_ON_FUSED_ATTENTION (on: -26 ms of a 479 ms gpt-oss-20b step at 8K, run 63b) such a call runs
torch's fused cuDNN attention with the sinks applied after it (moetune/kernels/causal_sink_attention.py), exact in
forward and backward (not bitwise reproducible from run to run, as cuDNN's attention backward is not; deterministic
mode keeps flex attention). Which masks are plain causal is known only where transformers builds them, so the
install also wraps its "flex_attention" mask builder: a BlockMask built from transformers' causal mask function
alone, without a 2D padding mask, over as many keys as queries at offset 0, is marked (an attribute on the
BlockMask; a checkpointed layer's recompute gets the same object, so it takes the same path: do not change the
setting between a forward and its backward). No device sync: the decision is on the host.
"""

from __future__ import annotations

import torch

from . import attention_functions

__all__ = ["install_fast_sinks", "runs_flex_with_sinks", "uninstall_fast_sinks", "wrapped"]

_KEY = "flex_attention"
# Flex attention has no backward on CPU, and transformers refuses sinks there: the fused call is for GPUs. Tests add
# "cpu" with a stand-in for flex attention to check this module's plumbing in Triton's interpreter.
DEVICE_TYPES = ("cuda",)
# Plain causal calls on torch's fused (cuDNN) attention instead of flex attention; see the module docstring.
CAUSAL_ON_FUSED_ATTENTION = True
_PLAIN_CAUSAL = "_moetune_plain_causal"  # the BlockMask attribute the mask wrapper sets


def _flex_module():
    """transformers' flex attention integration where it has what the fused call uses, else None."""
    try:
        from transformers.integrations import flex_attention as module
    except ImportError:
        return None
    needed = ("compile_friendly_flex_attention", "get_flex_attention_lse_kwargs", "BlockMask")
    return module if all(hasattr(module, name) for name in needed) else None


def _kernel_runs(query, value, attention_mask, softcap, s_aux, kwargs, flex) -> bool:
    from ..experts.backends.triton import probe
    from ..kernels.attention_sinks import DTYPES, MAX_HEAD_DIM

    heads = query.shape[1]
    return (
        isinstance(attention_mask, flex.BlockMask)
        and softcap is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("dropout", 0.0)
        and heads & (heads - 1) == 0  # otherwise transformers repeats the key/value heads instead of enable_gqa
        and query.dim() == 4
        and s_aux.shape == (heads,)
        and s_aux.dtype in DTYPES
        and query.dtype in DTYPES
        and value.dtype == query.dtype
        and value.shape[-1] <= MAX_HEAD_DIM
        and query.device.type in DEVICE_TYPES
        and s_aux.device == query.device
        and not torch.compiler.is_compiling()
        and probe(query.device.type, query.device.index, query.dtype) is None
    )


def _fused_flex_attention(original, module, query, key, value, attention_mask, scaling=None, softcap=None,
                          s_aux=None, **kwargs):
    flex = _flex_module() if s_aux is not None else None
    if flex is None or not _kernel_runs(query, value, attention_mask, softcap, s_aux, kwargs, flex):
        return original(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, s_aux=s_aux,
                        **kwargs)
    if _runs_causal_on_fused_attention(query, key, value, attention_mask, kwargs.get("sliding_window")):
        from ..kernels.causal_sink_attention import causal_sink_attention

        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        y, lse = causal_sink_attention(query, key, value, s_aux, scale, value.dtype)
        return y, lse.to(value.dtype)
    from ..kernels.attention_sinks import apply_sinks

    out, aux = flex.compile_friendly_flex_attention(
        query, key, value, score_mod=None, block_mask=attention_mask, enable_gqa=True, scale=scaling,
        kernel_options=kwargs.get("kernel_options"), training=module.training,
        **flex.get_flex_attention_lse_kwargs(True),
    )
    lse = getattr(aux, "lse", aux)  # torch >= 2.9 returns an AuxOutput, earlier the lse itself
    # transformers returns the lse, cast to value's dtype, as the attention weights
    return apply_sinks(out, lse, s_aux, value.dtype), lse.to(value.dtype)


def _runs_causal_on_fused_attention(query, key, value, attention_mask, sliding_window) -> bool:
    # the layer's own window too: a sliding layer's mask is never marked, and a window is never plain causal
    if not (CAUSAL_ON_FUSED_ATTENTION and getattr(attention_mask, _PLAIN_CAUSAL, False) and sliding_window is None):
        return False
    from ..kernels.causal_sink_attention import enabled, probe, supports

    return (
        enabled(query.device.type)
        and supports(query, key, value)
        and probe(query.device.type, query.device.index, query.dtype) is None
    )


def _marking_flex_mask(original, *args, **kwargs):
    """transformers' flex mask builder, its BlockMask marked where it is plain causal (module docstring)."""
    mask = original(*args, **kwargs)
    try:
        from transformers.masking_utils import causal_mask_function
    except ImportError:
        return mask
    plain = (
        not args
        and kwargs.get("mask_function") is causal_mask_function
        and kwargs.get("attention_mask") is None
        and all(type(kwargs.get(name, 0)) is int and kwargs.get(name, 0) == 0 for name in ("q_offset", "kv_offset"))
        and type(kwargs.get("q_length")) is int
        and kwargs.get("q_length") == kwargs.get("kv_length")
    )
    if plain:
        setattr(mask, _PLAIN_CAUSAL, True)
    return mask


def runs_flex_with_sinks(model: torch.nn.Module) -> bool:
    """Whether `model` runs flex attention and has attention sinks (gpt-oss with attn_implementation
    "flex_attention")."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != _KEY:
        return False
    return any(isinstance(getattr(module, "sinks", None), torch.nn.Parameter) for module in model.modules())


def wrapped() -> bool:
    """Whether transformers' "flex_attention" function is wrapped now."""
    return attention_functions.wrapped(_KEY, _fused_flex_attention)


def install_fast_sinks() -> bool:
    """Wrap transformers' "flex_attention" function and its flex mask builder (process-wide; idempotent). False
    where this transformers has no such function registered."""
    attention_functions.wrap(_KEY, _marking_flex_mask, interface="mask")  # marking only: harmless without the other
    return attention_functions.wrap(_KEY, _fused_flex_attention)


def uninstall_fast_sinks() -> bool:
    """Put transformers' functions back. False where the attention function was not wrapped (a wrapper another
    library registered after this one stays)."""
    attention_functions.unwrap(_KEY, _marking_flex_mask, interface="mask")
    return attention_functions.unwrap(_KEY, _fused_flex_attention)
