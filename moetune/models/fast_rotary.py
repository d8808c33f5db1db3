"""The fused Triton rotary embedding (moetune/kernels/rotary.py) in a transformers model's attention.

transformers' attention forwards call their modeling module's global `apply_rotary_pos_emb(q, k, cos, sin)`,
so unlike the norms (moetune/models/fast_norms.py, one module instance at a time) the rotary can only be
swapped where that name is looked up: `install_fast_rotary(model)` replaces the function in the modeling module
of the model's classes with a dispatcher, and `uninstall_fast_rotary()` puts the originals back.
The replacement is safe for every other model of those classes in the process: the dispatcher computes
bitwise what the original computes (the kernel rounds where torch rounds), and calls the original itself
whenever the kernel cannot take the call (CPU tensors outside Triton's interpreter, bf16 in the interpreter,
cos or sin requiring grad, other shapes, unsqueeze_dim other than 1, under torch.compile).

A module is recognised by its code, not its name: `apply_rotary_pos_emb` and its helper must be, statement for
statement (docstring, comments and decorators aside), one of the forms transformers 5.17 - 5.24 write:

    "llama"    x * cos + rotate_half(x) * sin, cos [B, T, D]
               qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3 and glm4_moe_lite (their non-interleaved path),
               qwen3_vl_moe
    "gpt_oss"  chunk into halves, first * cos - second * sin, second * cos + first * sin, cos [B, T, D / 2]

Anything else (glm4_moe's partial rotary, the interleaved forms of deepseek_v3 / glm4_moe_lite, a function
already replaced by the kernels hub) keeps transformers' code.
"""

from __future__ import annotations

import functools
import sys
import types

import torch
from torch import nn

from .code_match import body_dump, hub_wrapped, parse_function, source_body_dump

__all__ = ["VARIANTS", "install_fast_rotary", "installed_modules", "rotary_variant", "uninstall_fast_rotary"]

# variant -> {function name: its body as transformers writes it}; apply_rotary_pos_emb first.
VARIANTS: dict[str, dict[str, str]] = {
    "llama": {
        "apply_rotary_pos_emb": """
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return q_embed, k_embed
""",
        "rotate_half": """
x1 = x[..., : x.shape[-1] // 2]
x2 = x[..., x.shape[-1] // 2 :]
return torch.cat((-x2, x1), dim=-1)
""",
    },
    "gpt_oss": {
        "apply_rotary_pos_emb": """
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = _apply_rotary_emb(q, cos, sin)
k_embed = _apply_rotary_emb(k, cos, sin)
return q_embed, k_embed
""",
        "_apply_rotary_emb": """
first_half, second_half = torch.chunk(x, 2, dim=-1)
first_ = first_half * cos - second_half * sin
second_ = second_half * cos + first_half * sin
return torch.cat((first_, second_), dim=-1)
""",
    },
}
# The dispatcher keeps each form's output layout: x's strides for "llama" (torch's x * cos keeps them), contiguous
# for "gpt_oss" (torch.cat's).
_CONTIGUOUS = {"llama": False, "gpt_oss": True}
_NAME = "apply_rotary_pos_emb"
_originals: dict[str, tuple[types.FunctionType, str]] = {}  # modeling module name -> (original, variant)


_KNOWN = {variant: {name: source_body_dump(body) for name, body in bodies.items()} for variant, bodies in VARIANTS.items()}


def _body(function) -> str | None:
    node = parse_function(function)
    return None if node is None else body_dump(node.body)


@functools.cache
def _function_variant(function, helpers: tuple) -> str | None:
    """The VARIANTS name of `function` given the module's helper functions [(name, function)], or None."""
    for variant, bodies in _KNOWN.items():
        found = dict(helpers) | {_NAME: function}
        if all(isinstance(found.get(name), types.FunctionType) and _body(found[name]) == body for name, body in bodies.items()):
            return variant
    return None


def _module_variant(module_name: str) -> str | None:
    """The form of the function the module holds now (classified by the function object, so a function replaced
    since an earlier look is classified anew)."""
    module = sys.modules.get(module_name)
    function = hub_wrapped(getattr(module, _NAME, None), _NAME)
    # Not a plain function of this module, or a wrapper (functools.wraps copies __module__, and inspect.getsource
    # follows __wrapped__ to the wrapped function's source): somebody else's replacement, left alone.
    if not isinstance(function, types.FunctionType) or function.__module__ != module_name or hasattr(function, "__wrapped__"):
        return None
    helpers = tuple(
        (name, hub_wrapped(getattr(module, name, None), name)) for bodies in VARIANTS.values() for name in bodies
        if name != _NAME
    )
    return _function_variant(function, helpers)


def rotary_variant(module_name: str) -> str | None:
    """The VARIANTS name of this modeling module's own `apply_rotary_pos_emb` (fused now or not), or None."""
    if module_name in _originals:
        return _originals[module_name][1]
    return _module_variant(module_name)


def _kernel_takes(q, k, cos, sin, unsqueeze_dim) -> bool:
    from ..experts.backends.triton import probe
    from ..kernels.rotary import check_inputs

    return (
        unsqueeze_dim == 1
        and isinstance(q, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and not (cos.requires_grad or sin.requires_grad)
        and not torch.compiler.is_compiling()
        and check_inputs(q, cos, sin) is None
        and check_inputs(k, cos, sin) is None
        and probe(q.device.type, q.device.index, q.dtype) is None
    )


def _dispatcher(module_name: str):
    original, variant = _originals[module_name]
    contiguous = _CONTIGUOUS[variant]
    width = {"llama": 1, "gpt_oss": 2}[variant]  # head dim / table width

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _kernel_takes(q, k, cos, sin, unsqueeze_dim) and cos.shape[-1] * width == q.shape[-1]:
            from ..kernels.rotary import RotaryFunction

            return RotaryFunction.apply(q, cos, sin, contiguous), RotaryFunction.apply(k, cos, sin, contiguous)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def install_fast_rotary(model: nn.Module) -> list[str]:
    """Route `apply_rotary_pos_emb` of the modeling modules of `model`'s classes through the fused kernel.

    Returns the modeling modules now fused (those whose function is a known form; already fused ones included).
    MLA attention classes (deepseek_v3, glm4_moe_lite) get their rotary fused with their query/key/value
    (moetune/models/fast_mla.py). Idempotent. Nothing is changed where no kernel can run (no CUDA GPU and no Triton interpreter).
    """
    from .fast_norms import fast_norm_available

    if not fast_norm_available():
        return []
    names = sorted({type(m).__module__ for m in model.modules()})
    fused = []
    for name in names:
        if name in _originals:
            fused.append(name)
            continue
        variant = _module_variant(name)
        if variant is None:
            continue
        module = sys.modules[name]
        _originals[name] = (getattr(module, _NAME), variant)
        setattr(module, _NAME, _dispatcher(name))
        fused.append(name)
    from .fast_mla import install_fast_mla

    install_fast_mla(model)  # MLA attention fuses its rotary with the query/key/value it feeds
    return fused


def installed_modules() -> list[str]:
    """The modeling modules whose `apply_rotary_pos_emb` is moetune's dispatcher now."""
    return sorted(_originals)


def uninstall_fast_rotary() -> int:
    """Give every modeling module its original `apply_rotary_pos_emb` back (and every MLA attention class its
    forward); returns how many modeling modules were restored."""
    from .fast_mla import uninstall_fast_mla

    uninstall_fast_mla()
    restored = 0
    for name, (original, _) in list(_originals.items()):
        setattr(sys.modules[name], _NAME, original)
        del _originals[name]
        restored += 1
    return restored
