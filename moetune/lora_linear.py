"""A fast path for peft's LoRA Linear layers (attention q/k/v/o, shared experts, dense MLPs).

peft keeps adapter weights in fp32 (autocast_adapter_dtype) and its `lora.Linear.forward` casts
x [N, in] to fp32, runs lora_A and lora_B as fp32 GEMMs (no tensor cores), scales, adds and casts
back, in forward, again in the checkpointing recompute, and in backward, with every fp32
intermediate saved by autograd. Here the same layer is one autograd Function in the activation
dtype:

    y  = x W^T (+ b) + u B^T                    W [out, in] frozen   A [R, in]   B [out, R]
    u  = x (s A)^T                              [N, R]; s A is cast with A (one launch), so that
    dx = dy W + (dy B) (s A)                    neither y's product nor dB needs a scaling of its own
    dA = s * (dy B)^T x                         returned in A's own dtype (fp32 master weights)
    dB = dy^T u                                 returned in B's own dtype
    db = sum_N dy                               only when the base bias is trainable

s A and B are cast to x's dtype for the products; the AdamW update stays on the fp32 parameters.
N is every leading dimension of x flattened. In fp16 (5 exponent bits) s stays out of the cast: u = x A^T, and s
scales y's LoRA product, dx's and dB after them, so that u does not overflow s times sooner (and subnormals do
not round differently); bf16 and fp32 have fp32's exponent range.

A projection much wider than its input (MLA's q_b_proj 768 -> 5120 and kv_b_proj 512 -> 8960 in GLM-4.7-Flash,
DeepSeek-V3's alike: out >= CONCAT_K_MIN_RATIO x in) computes y in one GEMM over the concatenated inner dimension,
y = [x | u] [W | B]^T (+ b), instead of the two GEMMs (lora_sum: u B^T written, the base GEMM reading it back; run
64's -14 ms of a whole GLM-4.7-Flash 8K step on an H100 was against the older order, a second pass over the wide
output after the base GEMM). The concatenations
copy x and W for the call (in + R columns each, freed after it; far fewer bytes than the pass over [N, out] once N
is a few times in + R, which the choice checks: decode steps keep the two GEMMs); the backward is the same. Where s
is not folded into A (fp16) the two-GEMM form stays.

Precision (bf16 activations, fp32 master factors):
- The LoRA term (+ b) is computed first and rounded to bf16; the base GEMM adds its product to it in fp32 (addmm_
  with beta=1, in its epilogue) and rounds the sum once (peft rounds the base output, adds in fp32 and casts
  back). The concatenated form rounds the sum once too. The input gradient alike: dx = (dy B) (s A), then + dy W.
- s A is rounded to bf16 once, as A alone would be: for a power-of-2 s (lora_alpha / r, and rsLoRA's
  lora_alpha / sqrt(r), at the usual ranks and alphas) every result is bitwise that of scaling after the
  products (tested on CPU; the same arithmetic on a GPU); otherwise it differs by that one rounding's place.
- dA and dB are reductions over all N tokens: on CUDA their GEMMs write fp32 directly (torch.mm with
  out_dtype, fp32 accumulation and no bf16 rounding of the [R, in] / [out, R] results); elsewhere the
  operands are upcast to fp32 first (CPU tests only, same result or better).
- The [N, R] intermediates (x A^T and dy B) are rounded to bf16 like any activation.

A checkpointed layer's recompute takes the casts of s A and B its forward made (forward_casts), rather than casting
the same parameters again: the forward's ctx holds them until backward anyway, so this costs no memory and saves a
launch a factor (7-10 a decoder layer of the supported models, each ~8-20 us of a GPU host's time).

Differentiable once: backward's products are not themselves recorded (create_graph is refused with torch's
once_differentiable error, as the experts' Functions refuse it).

install_fast_lora_linear(peft_model) swaps this in per instance (no class patch) on the lora.Linear
layers it covers exactly; each call re-checks the layer's state and hands anything else to peft's
own forward. Parameters, state dict keys and peft save/load are untouched.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import saved_tensors
from .fp32_matmul import mm_fp32
from .models import instance_forward, recompute

__all__ = ["LoRALinearFunction", "install_fast_lora_linear", "linear_with_lora", "uninstall_fast_lora_linear"]

GROUP_ATTR = "_moetune_lora_group"  # on a layer in a group of siblings that read the same input (lora_groups.py)
# out >= this x in: the LoRA term inside the base GEMM over the concatenated inner dimension (module docstring,
# _concatenates); None: never. Narrower projections save little (the write and read of y's LoRA term are not much
# more than the copies)
# and the concatenations are one launch more, host time where steps wait on their host (Qwen3's and gpt-oss's
# projections are at most 2x wider than their input).
CONCAT_K_MIN_RATIO: float | None = 4
# The LoRA term computed first and each base GEMM adding into it (lora_sum); False: the base GEMM first and the LoRA
# term added in a pass of its own (benchmarks' A/B)
LORA_TERM_FIRST = True


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for this device type, or None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def forward_casts(owner, factors: tuple, dtype: torch.dtype, scalings, make) -> tuple:
    """make(): the factors' casts to dtype (scaled by scalings) for a LoRA Function called by owner (a layer or a
    group); in a checkpointed layer's recompute, the casts the same owner made in that checkpoint's forward instead,
    when they come from the same factor tensors with the same contents (the same objects, storage and in-place
    version counts), dtype and scalings. They wait in the checkpoint call's own hand-over dict (recompute.handover),
    which goes with the checkpoint's graph. Under torch.compile every call makes its own (nothing is read that
    Dynamo would guard on)."""
    if torch.compiler.is_compiling():
        return make()
    store = recompute.handover()
    if store is None:
        return make()
    if recompute.recomputing():
        entry = store.pop(owner, None)
        if entry is not None and entry[0] == _made_from(factors, dtype, scalings):
            return entry[1]
        return make()
    casts = make()
    if torch.is_grad_enabled() and any(c is not f for c, f in zip(casts, factors)):
        store[owner] = (_made_from(factors, dtype, scalings), casts)
    return casts


def folds_scale(dtype: torch.dtype) -> bool:
    """Whether the LoRA Functions cast s into A for this compute dtype (see the module docstring): not in fp16."""
    return dtype != torch.float16


def cast_factors(factors: tuple, dtype: torch.dtype) -> tuple:
    """Each factor in dtype, outside autograd (a LoRA Function returns the factors' gradients itself): the factor
    itself where it has that dtype."""
    return tuple(f if f.dtype == dtype else f.detach().to(dtype) for f in factors)


def scaled_cast(factor: torch.Tensor, scaling: float, dtype: torch.dtype, out: torch.Tensor | None = None):
    """scaling * factor in dtype (rounded once), outside autograd, in one launch: into out where given, else the
    factor itself where there is nothing to do."""
    if out is None:
        if scaling == 1 and factor.dtype == dtype:
            return factor
        out = torch.empty(factor.shape, dtype=dtype, device=factor.device)
    return torch.mul(factor.detach(), scaling, out=out)


def lora_casts(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype) -> tuple:
    """(s A, B) in dtype, as LoRALinearFunction computes with them ((A, B) where the scale is not folded)."""
    if not folds_scale(dtype):
        return cast_factors((lora_A, lora_B), dtype)
    return (scaled_cast(lora_A, scaling, dtype), *cast_factors((lora_B,), dtype))


def _made_from(factors: tuple, dtype: torch.dtype, scalings) -> tuple:
    return (dtype, scalings, *((id(f), f.data_ptr(), f._version) for f in factors))


def _concatenates(x2: torch.Tensor, weight: torch.Tensor, rank: int) -> bool:
    """Whether y = [x | u] [W | B]^T in one GEMM (module docstring): a projection CONCAT_K_MIN_RATIO times wider
    than its input, in x's dtype (torch.cat would promote a mismatched W where the two-GEMM form refuses it), over
    enough rows that the pass it saves over y (N x out, read and written) outweighs copying x and W (N x K and
    out x K, K = in + R, each read and written): a decode step or a short eval batch keeps the two GEMMs."""
    rows, (out, inner) = x2.shape[0], weight.shape
    return (
        CONCAT_K_MIN_RATIO is not None
        and out >= CONCAT_K_MIN_RATIO * inner
        and weight.dtype == x2.dtype
        and rows * (out - inner - rank) > out * (inner + rank)
    )


def base_output(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) [..., out] from x's rows x2 [N, in], as a tensor of its own: a LoRA Function returns
    it, and a caller may change it in place (OLMoE's clip_qkv clamps the projections' outputs), which autograd
    refuses for a view made inside a Function. (F.linear of a 3-D x with a bias returns a view of its 2-D product.)"""
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    _write_product(y.view(-1, weight.shape[0]), x2, weight.t(), bias=bias)
    return y


def lora_output(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                B_c: torch.Tensor, alpha: float) -> torch.Tensor:
    """F.linear(x, weight, bias) + alpha u B_c^T [..., out] as a tensor of its own (as base_output's), through
    lora_sum."""
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    lora_sum(y.view(-1, weight.shape[0]), (u, B_c.t()), [(x2, weight.t())], alpha, bias)
    return y


def lora_sum(out: torch.Tensor, lora: tuple, bases: list, alpha: float, bias: torch.Tensor | None = None):
    """out = alpha a b (+ bias) + sum_i p_i q_i for lora = (a, b), the small LoRA product, and bases = [(p_i, q_i),
    ...], one or more base products, whatever out held before.

    LORA_TERM_FIRST: the LoRA product (+ bias) written first, each base GEMM then adding into it (addmm_, beta=1):
    cuBLAS reads the LoRA term in the base GEMM's epilogue, under that GEMM's compute. Otherwise (the order before,
    for benchmarks' A/B) the LoRA product is added last, in a pass of its own that reads and writes all of out again
    (Qwen3-30B-A3B's q_proj output at 8K, [8192, 4096]: ~63 us a call on an H100, run 60c)."""
    a, b = lora
    if LORA_TERM_FIRST:
        _write_product(out, a, b, alpha, bias)
        for p, q in bases:
            out.addmm_(p, q)
        return out
    (p, q), *rest = bases
    _write_product(out, p, q, bias=bias)
    for p, q in rest:
        out.addmm_(p, q)
    return out.addmm_(a, b, alpha=alpha)


def _write_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = alpha a b (+ bias), whatever out held before."""
    if bias is not None:
        return torch.addmm(bias, a, b, alpha=alpha, out=out)
    if alpha == 1:
        return torch.mm(a, b, out=out)
    # fp16 (s not folded): beta=0 reads none of out, NaN included, eagerly; inductor's decomposition of a rank-1
    # product computes beta * out, so under compile out starts at zero
    if torch.compiler.is_compiling():
        out.zero_()
    return torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)


class LoRALinearFunction(torch.autograd.Function):
    """y = F.linear(x, W, b) + s * F.linear(F.linear(x, A), B) in x's dtype; W gets no gradient.

    x [..., in], W [out, in] (must not require grad), b [out] or None, A [R, in], B [out, R] in any
    float dtype (cast to x's dtype for the products), s a Python number; casts: what lora_casts(A, B, s, x.dtype)
    returns, made by the caller (a recompute's from its forward, forward_casts), or None to make them here.
    Kept for backward: x, W (the parameter itself, no copy), s A and B cast to x's dtype ([R, in] and [out, R]),
    u = x (s A)^T [N, R] (cheaper to keep than to recompute: recomputing reads all of x again).
    Recomputed in backward: nothing.

    W, when it is the frozen parameter itself, is held on ctx rather than saved (moetune/saved_tensors.py says why);
    a W cast for this call (autocast) is saved, so that checkpointing frees it. Fresh casts of s A and B are held on
    ctx too, as they are small by construction (R x (in + out) elements: 544 KiB a Qwen3-30B-A3B layer, 25 MiB for
    all 48, freed with the graph): eight fewer saved tensors a layer, each of which costs a checkpointed layer three
    hook calls of host time.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, casts=None):
        assert not weight.requires_grad, "frozen base weight expected: trainable ones take peft's path"
        x2 = x.reshape(-1, x.shape[-1])
        A_c, B_c = casts if casts is not None else lora_casts(lora_A, lora_B, scaling, x.dtype)  # A_c: s A (folded)
        folded = folds_scale(x.dtype)
        u = x2 @ A_c.t()
        if folded and _concatenates(x2, weight, u.shape[1]):
            y = base_output(x, torch.cat((x2, u), 1), torch.cat((weight, B_c), 1), bias)  # [x | u] [W | B]^T
        else:
            y = lora_output(x, x2, weight, bias, u, B_c, 1 if folded else scaling)
        hold = tuple(cast for cast, factor in ((A_c, lora_A), (B_c, lora_B)) if cast is not factor)
        saved_tensors.save(ctx, x, weight, A_c, B_c, u, hold=hold)
        ctx.scaling = scaling
        ctx.dtypes = (None if bias is None else bias.dtype, lora_A.dtype, lora_B.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, A_c, B_c, u = saved_tensors.load(ctx)
        s, folded = ctx.scaling, folds_scale(x.dtype)
        bias_dtype, A_dtype, B_dtype = ctx.dtypes
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = db = dA = dB = None
        if need_x or need_A:
            g = dy2 @ B_c  # [N, R]
            if need_x:
                dx = lora_sum(x2.new_empty(x2.shape), (g, A_c), [(dy2, weight)], 1 if folded else s)  # folded: A_c has s
                dx = dx.reshape(x.shape)
            if need_A:
                dA = mm_fp32(g.t(), x2).mul_(s).to(A_dtype)
        if need_B:
            dB = mm_fp32(dy2.t(), u)  # folded: u has s
            dB = (dB if folded else dB.mul_(s)).to(B_dtype)
        if need_b:
            db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, None, db, dA, dB, None, None


def linear_with_lora(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B), see LoRALinearFunction.

    Under torch.autocast everything is cast to the autocast dtype first, as autocast's own F.linear
    would, and the Function runs with autocast off (forward and backward).
    """
    return _linear_with_lora(x, weight, bias, lora_A, lora_B, scaling, None)


def _linear_with_lora(x, weight, bias, lora_A, lora_B, scaling, owner) -> torch.Tensor:
    """linear_with_lora; with an owner (the layer), the factors' casts go through forward_casts."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    casts = None
    if owner is not None:
        casts = forward_casts(owner, (lora_A, lora_B), x.dtype, scaling,
                              lambda: lora_casts(lora_A, lora_B, scaling, x.dtype))
    if dtype is None:
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, casts)
    with torch.autocast(x.device.type, enabled=False):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, casts)


# --- peft integration --------------------------------------------------------------------------------


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _has_hooks(module: nn.Module) -> bool:
    # ZeRO-3 / offloading gather parameters in pre-hooks; peft's own forward runs them, ours would not.
    return instance_forward.runs_more_than_forward(module)


def _plain_lora(layer, name: str):
    """(lora_A, lora_B) Linear modules when `name` is plain LoRA on this layer, else None.

    Plain: no variant (DoRA, ...), no lora_B bias (lora_bias), no dropout, a numeric scale.
    """
    # This runs on every call: submodules and parameters are read from their dicts directly, since
    # nn.Module.__getattr__ costs ~1 us a lookup on the 2-core test host (the whole check: ~7.5 us -> ~2 us).
    modules = layer._modules
    A = modules["lora_A"]._modules.get(name)
    if A is None or name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    B = modules["lora_B"]._modules[name]
    if (
        type(A) is not nn.Linear
        or type(B) is not nn.Linear
        or A._parameters["bias"] is not None
        or B._parameters["bias"] is not None
        or type(modules["lora_dropout"]._modules[name]) is not nn.Identity
        or not isinstance(layer.scaling[name], (int, float))
    ):
        return None
    return A, B


def _fast_args(layer):
    """((W, b, A, B), scaling) of the layer when the fast path gives exactly peft's result now, else None: the base
    weight and bias and the factors' weights, as linear_with_lora takes them."""
    if layer.disable_adapters or layer.merged or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    lora = _plain_lora(layer, name)
    if lora is None:
        return None
    A, B = lora
    base = layer._modules["base_layer"]
    # type: a parametrization registered after install swaps the class (and moves the weight).
    if type(base) is not nn.Linear or base._parameters["weight"].requires_grad:
        return None
    if _has_hooks(base) or _has_hooks(A) or _has_hooks(B):
        return None
    tensors = base._parameters["weight"], base._parameters["bias"], A._parameters["weight"], B._parameters["weight"]
    return tensors, layer.scaling[name]


def _fast_forward(self, x, *args, **kwargs):
    # Extra arguments (adapter_names for mixed batches, aLoRA offsets, ...) are peft's business.
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    group = self.__dict__.get(GROUP_ATTR)  # siblings reading the same input: lora_groups.py
    if group is not None:
        out = group.output(self, x)
        if out is not None:
            return out
    fast = _fast_args(self)
    if fast is None:
        return type(self).forward(self, x, *args, **kwargs)
    tensors, scaling = fast
    return _linear_with_lora(x, *tensors, scaling, self)


def _is_installed(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fast_forward


def install_fast_lora_linear(peft_model: nn.Module, groups: bool = True) -> int:
    """Route peft's lora.Linear layers (nn.Linear base, plain LoRA, no dropout) through LoRALinearFunction, and with
    `groups` the siblings that read one input (q/k/v, ...) through one LoRAGroupFunction (lora_groups.py; False
    removes groups formed before).

    Per instance: each layer's `forward` attribute is replaced; the class is untouched. Layers with
    dropout > 0, DoRA or another variant, lora_bias, several active adapters, a non-Linear base (or a
    forward already replaced by someone else) keep peft's forward. Installed layers still take peft's
    path, checked at every call, while adapters are disabled (disable_adapter()) or merged, for a
    trainable base weight, extra forward arguments (adapter_names), hooks on the wrapped Linear layers,
    or disable_input_dtype_casting. Idempotent. Returns the number of layers on the fast path.
    """
    linear_class = _lora_linear_class()
    count = 0
    for module in peft_model.modules():
        if type(module) is not linear_class or type(module.base_layer) is not nn.Linear:
            continue
        if _is_installed(module):
            count += 1
            continue
        active = module.active_adapters
        if "forward" in module.__dict__ or len(active) != 1 or _plain_lora(module, active[0]) is None:
            continue
        module.forward = types.MethodType(_fast_forward, module)
        count += 1
    from .lora_groups import form_groups, ungroup  # (lora_groups builds on this module)

    if groups:
        form_groups(peft_model)
    else:
        ungroup(peft_model)
    return count


def uninstall_fast_lora_linear(peft_model: nn.Module) -> int:
    """Give every layer back peft's own forward. Returns the number of layers changed."""
    count = 0
    for module in peft_model.modules():
        if _is_installed(module):
            del module.forward
            module.__dict__.pop(GROUP_ATTR, None)
            count += 1
    return count
