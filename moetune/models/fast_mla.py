"""Multi-head latent attention (deepseek_v3, glm4_moe_lite) with its query, key and value built by one fused
kernel each way (moetune/kernels/mla_inputs.py) instead of transformers' rotary, cats and copies.

transformers' MLA forward splits the query projection into a pass and a rotary part, rotates the rotary parts of
the query and of the one shared key head, and concatenates them back (`torch.cat` for the query, `expand_kv`'s
two copies for the key), every step a transposing copy of a [B, heads, T, 256]-sized tensor; the backward
undoes each. `install_fast_mla(model)` replaces the `forward` of the model's MLA attention classes with a
dispatcher that runs the same projections, norms and attention call and builds query, key and value in one
launch. The values are bitwise transformers' (the kernel rounds where torch rounds); the layout differs
([B, T, heads, D] storage, which attention reads through transposed views).

A class is taken only when its code is what moetune reproduces: `forward`'s body (docstring, comments and the
cache branch aside: the dispatcher hands every call with a cache to the original) is the one transformers
5.17 - 5.25 write, `expand_kv` is the known form, and the module's rotary functions are the known forms.
The dispatcher also calls the original where the kernel cannot run (no Triton, bf16 in the interpreter, under
torch.compile, cos or sin requiring grad). The swap is per class, so it holds for every model of that class
in the process, like fast_rotary's (whose install and uninstall carry this one along).
"""

from __future__ import annotations

import ast
import functools
import os
import sys

import torch
from torch import nn

from .code_match import body_dump, hub_wrapped, parse_function, source_body_dump

__all__ = ["install_fast_mla", "installed_classes", "mla_class_recognised", "uninstall_fast_mla"]

# The attention forward's body without its cache branch (see _is_cache_branch).
_FORWARD = """
batch_size, seq_length = hidden_states.shape[:-1]
query_shape = (batch_size, seq_length, -1, self.qk_head_dim)
if self.q_lora_rank is None:
    q_states = self.q_proj(hidden_states)
else:
    q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
q_states = q_states.view(query_shape).transpose(1, 2)
q_pass, q_rot = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
kv_nope = self.kv_a_layernorm(kv_nope)
kv_nope = kv_nope.view(batch_size, 1, seq_length, self.kv_lora_rank)
k_rot = k_rot.view(batch_size, 1, seq_length, self.qk_rope_head_dim)
cos, sin = position_embeddings
if self.config.rope_interleave:
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
else:
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
query_states = torch.cat((q_pass, q_rot), dim=-1)
key_states, value_states = self.expand_kv(kv_nope, k_rot)
attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
    self.config._attn_implementation, eager_attention_forward
)
attn_output, attn_weights = attention_interface(
    self,
    query_states,
    key_states,
    value_states,
    attention_mask,
    dropout=0.0 if not self.training else self.attention_dropout,
    scaling=self.scaling,
    **kwargs,
)
attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
attn_output = self.o_proj(attn_output)
return attn_output, attn_weights
"""
_EXPAND_KV = """
batch_size, _, seq_length, _ = kv_nope.shape
key_shape = (batch_size, seq_length, -1, self.qk_nope_head_dim + self.v_head_dim)
kv_nope = self.kv_b_proj(kv_nope).view(key_shape).transpose(1, 2)
k_nope, value_states = torch.split(kv_nope, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
k_rot = k_rot.expand(-1, k_nope.shape[1], -1, -1)
key_states = kv_nope.new_empty(*kv_nope.shape[:-1], self.qk_nope_head_dim + self.qk_rope_head_dim)
key_states[..., : self.qk_nope_head_dim].copy_(k_nope)
key_states[..., self.qk_nope_head_dim :].copy_(k_rot)
return key_states, value_states
"""
_ROTARY_INTERLEAVE = """
cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
q1, q2 = q[..., 0::2], q[..., 1::2]
k1, k2 = k[..., 0::2], k[..., 1::2]
q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
return q_embed, k_embed
"""
_KNOWN = {name: source_body_dump(body) for name, body in
          (("forward", _FORWARD), ("expand_kv", _EXPAND_KV), ("interleave", _ROTARY_INTERLEAVE))}
_CACHE_NAMES = ("past_key_values", "cache")  # the forward's cache argument, 5.17 - 5.23 / 5.24 on
_originals: dict[type, object] = {}  # attention class -> its own forward


def _is_cache_branch(statement: ast.stmt) -> bool:
    """`if <cache> is not None: kv_nope, k_rot = <cache>.update(...)`: the one statement the versions differ in."""
    return (
        isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 1
        and isinstance(statement.test, ast.Compare) and isinstance(statement.test.left, ast.Name)
        and statement.test.left.id in _CACHE_NAMES and isinstance(statement.test.ops[0], ast.IsNot)
        and isinstance(statement.body[0], ast.Assign)
        and isinstance(statement.body[0].value, ast.Call)
        and isinstance(statement.body[0].value.func, ast.Attribute)
        and statement.body[0].value.func.attr == "update"
    )


def _transformers_code(function) -> bool:
    """function and every functools.wraps layer under it were written in transformers (its own decorators, such
    as 5.24's deprecate_kwarg, are fine; somebody else's wrapper is not)."""
    import transformers

    root = os.path.dirname(transformers.__file__)
    while function is not None:
        code = getattr(function, "__code__", None)
        if code is None or not os.path.abspath(code.co_filename).startswith(root + os.sep):
            return False
        function = getattr(function, "__wrapped__", None)
    return True


def _forward_known(forward) -> bool:
    node = parse_function(forward)
    if node is None or not _transformers_code(forward):
        return False
    names = [a.arg for a in node.args.args]
    if names[:4] != ["self", "hidden_states", "position_embeddings", "attention_mask"] or len(names) != 5 \
            or names[4] not in _CACHE_NAMES or node.args.kwarg is None or node.args.vararg is not None:
        return False
    body = [s for s in node.body if not _is_cache_branch(s)]
    return len(body) == len(node.body) - 1 and body_dump(body) == _KNOWN["forward"]


def _function_known(function, form: str) -> bool:
    node = parse_function(function) if _transformers_code(function) else None
    return node is not None and body_dump(node.body) == _KNOWN[form]


@functools.cache
def _class_recognised(cls: type, forward, expand_kv, interleave, rotary: str | None) -> bool:
    """Keyed by every function the original forward runs, so a later patch of any of them is looked at anew."""
    return (
        _forward_known(forward) and _function_known(expand_kv, "expand_kv")
        and interleave is not None and _function_known(interleave, "interleave") and rotary == "llama"
    )


def mla_class_recognised(cls: type) -> bool:
    """True when cls (an attention class) is transformers' MLA attention in a form this module reproduces."""
    from .fast_rotary import rotary_variant

    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        return False
    if cls in _originals:
        return True
    module = sys.modules.get(cls.__module__)
    return _class_recognised(
        cls, cls.__dict__.get("forward"), cls.__dict__.get("expand_kv"),
        hub_wrapped(getattr(module, "apply_rotary_pos_emb_interleave", None), "apply_rotary_pos_emb_interleave"),
        rotary_variant(cls.__module__),
    )


def _kernel_can_run(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    from ..experts.backends.triton import probe

    return (
        isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
        and not (cos.requires_grad or sin.requires_grad)
        and not torch.compiler.is_compiling()
        and probe(hidden_states.device.type, hidden_states.device.index, hidden_states.dtype) is None
    )


def _query_key_value(attention, q, kv, k_rot, cos, sin):
    """(query, key, value) as [B, heads, T, D] views: the kernel where it takes the tensors, else the module's
    own rotary and concatenations (an autocast dtype mix, say)."""
    from ..kernels.mla_inputs import MLAInputsFunction, check_inputs

    nope, interleave = attention.qk_nope_head_dim, bool(attention.config.rope_interleave)
    if check_inputs(q, kv, k_rot, cos, sin, nope) is None:
        query, key, value = MLAInputsFunction.apply(q, kv, k_rot, cos, sin, nope, interleave)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    module = sys.modules[type(attention).__module__]
    rotary = module.apply_rotary_pos_emb_interleave if interleave else module.apply_rotary_pos_emb
    q, kv = q.transpose(1, 2), kv.transpose(1, 2)
    q_rot, k_rot = rotary(q[..., nope:], k_rot.unsqueeze(1), cos, sin)
    key = kv.new_empty(*kv.shape[:-1], q.shape[-1])  # kv's dtype, as expand_kv's (a cat would promote)
    key[..., :nope].copy_(kv[..., :nope])
    key[..., nope:].copy_(k_rot.expand(-1, kv.shape[1], -1, -1))
    return torch.cat((q[..., :nope], q_rot), dim=-1), key, kv[..., nope:]


def _fused_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
    """transformers' MLA forward without a cache, query / key / value built by _query_key_value."""
    batch_size, seq_length = hidden_states.shape[:-1]
    if self.q_lora_rank is None:
        q_states = self.q_proj(hidden_states)
    else:
        q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q_states = q_states.view(batch_size, seq_length, -1, self.qk_head_dim)
    compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
    kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope))
    kv = kv.view(batch_size, seq_length, -1, self.qk_nope_head_dim + self.v_head_dim)
    cos, sin = position_embeddings
    query, key, value = _query_key_value(self, q_states, kv, k_rot, cos, sin)

    module = sys.modules[type(self).__module__]
    attention_interface = module.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, module.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
    )
    attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _dispatcher(original):
    @functools.wraps(original)
    def forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs):
        cos_sin = position_embeddings if isinstance(position_embeddings, (tuple, list)) else ()
        if (
            type(self) not in _originals  # a subclass inheriting this forward was not itself recognised
            or args or any(kwargs.get(name) is not None for name in _CACHE_NAMES) or len(cos_sin) != 2
            or not _kernel_can_run(hidden_states, *cos_sin)
        ):
            return original(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        for name in _CACHE_NAMES:  # None: the original's named argument, never passed on to attention
            kwargs.pop(name, None)
        return _fused_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    return forward


def install_fast_mla(model: nn.Module) -> list[str]:
    """Route the forward of `model`'s recognised MLA attention classes through the fused query/key/value.

    Returns the qualified names of the classes now fused (already fused ones included). Idempotent. Nothing is
    changed where no kernel can run (no CUDA GPU and no Triton interpreter)."""
    from .fast_norms import fast_norm_available

    if not fast_norm_available():
        return []
    fused = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        if cls not in _originals and mla_class_recognised(cls):
            _originals[cls] = cls.__dict__["forward"]
            cls.forward = _dispatcher(_originals[cls])
        if cls in _originals:
            fused.append(f"{cls.__module__}.{cls.__qualname__}")
    return fused


def installed_classes() -> list[str]:
    """The attention classes whose forward is moetune's dispatcher now."""
    return sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in _originals)


def uninstall_fast_mla() -> int:
    """Give every class its original forward back; returns how many were restored."""
    restored = 0
    for cls, original in list(_originals.items()):
        cls.forward = original
        del _originals[cls]
        restored += 1
    return restored
