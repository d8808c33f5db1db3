"""Sibling LoRA Linear layers that read the same input, computed by one autograd Function.

An attention module calls q_proj, k_proj and v_proj one after another on the same hidden states (MLA: q_a_proj and
kv_a_proj_with_mqa; an MLP: gate_proj and up_proj). Through lora_linear.py each is a Function of its own: x is read
by three LoRA products in forward and three in backward, autograd sums three [N, in] input gradients with two more
kernels, and the host pays three Functions' Python, three times a checkpointed layer (forward, recompute, backward).
Here the first member of a group (its leader) computes every member's output when it is called, and each other
member, called next with the same tensor, takes its output instead of computing it:

    U   = x [s_1 A_1; s_2 A_2; ...]^T             [N, R_1 + R_2 + ...]: one GEMM reads x for every member (s_i A_i
                                                  cast with A_i, as lora_linear.py, which says why)
    y_i = x W_i^T (+ b_i) + U_i B_i^T              U_i: member i's columns of U
  backward (dy_i: member i's output gradient; members whose output was not used get no gradient):
    G_i = dy_i B_i                                side by side in G [N, R_1 + R_2 + ...]
    dx  = sum_i dy_i W_i + G [s_1 A_1; s_2 A_2; ...]   accumulated in place (addmm): no per-member dx tensors, no
                                                  kernels to sum them
    [dA_1; dA_2; ...] = G^T x, then each block times s_i   one GEMM (fp32 result on CUDA, as lora_linear.py); one
                                                  scaling for all blocks where the s_i are equal
    dB_i = dy_i^T U_i,  db_i = sum_N dy_i         (db only for a trainable base bias)
  In fp16 the s_i stay out of the cast and scale each member's products after them instead, as lora_linear.py says.

Kept for backward: x and U (instead of x and u_i for every member); the frozen W_i, and the factors' casts for this
call, held on ctx (saved_tensors.py; the casts are R_i x (in + out_i) elements a member).

The hand-over is checked, not assumed. A member takes the leader's output only when it is called, before the leader's
next call and without extra arguments, with the very tensor the leader was called with (same object, not changed in
place since), in the same grad, autocast and recompute mode, and with its own state as it was then (lora_linear's
`_fast_args`: adapters enabled, one plain adapter, frozen base, no hooks on the wrapped layers; the same factor
tensors, not changed in place). Otherwise it computes alone, as without groups (the leader's work for it is wasted;
a warning says so once). The leader groups a call only when every member is on the fast path and has no forward
pre-hooks (they could change its input or parameters before the leader reads them). Every supported architecture
calls its groups' members in GROUPS' order on one tensor (tests/test_lora_groups.py runs each).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import lora_linear, saved_tensors
from .fp32_matmul import mm_fp32
from .models import recompute

__all__ = ["GROUPS", "LoRAGroupFunction", "form_groups", "grouped_layers", "linear_group_with_lora", "ungroup"]

# Sibling layer names (children of one module) that transformers' models call in this order on one input. A group
# forms from the names present as fast-path LoRA layers, at least two.
GROUPS = (
    ("q_proj", "k_proj", "v_proj"),              # attention
    ("q_a_proj", "kv_a_proj_with_mqa"),          # multi-head latent attention (DeepSeek-V3, GLM-4.7-Flash)
    ("q_proj", "kv_a_proj_with_mqa"),            # the same without a query LoRA rank
    ("gate_proj", "up_proj"),                    # gated MLPs: shared experts, dense layers
)


class LoRAGroupFunction(torch.autograd.Function):
    """Every member's F.linear(x, W_i, b_i) + s_i F.linear(F.linear(x, A_i), B_i) in x's dtype; no W_i gradient.

    forward(ctx, x, scalings, casts, W_1, b_1, A_1, B_1, W_2, ...): x [..., in]; per member W [out_i, in] (frozen),
    b [out_i] or None, A [R_i, in], B [out_i, R_i] in any float dtype (cast to x's); scalings: one number a member;
    casts: what group_casts returns for them, made by the caller (a recompute's from its forward), or None.
    Returns one output [..., out_i] a member (not views made here: a caller may change them in place, as with
    lora_linear). See the module docstring for the math and what is kept.
    """

    @staticmethod
    def forward(ctx, x, scalings, casts, *members):
        weights, biases, As, Bs = members[0::4], members[1::4], members[2::4], members[3::4]
        assert not any(w.requires_grad for w in weights), "frozen base weights expected"
        x2 = x.reshape(-1, x.shape[-1])
        # A_cat [R_1 + R_2 + ..., in]: the s_i A_i stacked (the A_i where the scales are not folded: fp16)
        A_cat, *B_c = casts if casts is not None else group_casts(As, Bs, scalings, x.dtype)
        B_c = tuple(B_c)
        folded = lora_linear.folds_scale(x.dtype)
        U = x2 @ A_cat.t()
        ranks = tuple(A.shape[0] for A in As)
        outputs, start = [], 0
        for weight, bias, B, rank, s in zip(weights, biases, B_c, ranks, scalings):
            outputs.append(lora_linear.lora_output(x, x2, weight, bias, U[:, start:start + rank], B, 1 if folded else s))
            start += rank
        casts = (A_cat,) + tuple(c for c, B in zip(B_c, Bs) if c is not B)
        saved_tensors.save(ctx, x, U, A_cat, *weights, *B_c, hold=casts)
        ctx.scalings, ctx.ranks = scalings, ranks
        ctx.dtypes = tuple((None if b is None else b.dtype, A.dtype, B.dtype) for b, A, B in zip(biases, As, Bs))
        ctx.set_materialize_grads(False)  # an unused member output gets None, not a zero tensor
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        count = len(dys)
        x, U, A_cat, *rest = saved_tensors.load(ctx)
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        dys = tuple(None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys)
        weights, B_c = rest[:count], rest[count:]
        need = ctx.needs_input_grad  # x, scalings, casts, then (W, b, A, B) a member
        scalings, ranks, folded = ctx.scalings, ctx.ranks, lora_linear.folds_scale(x.dtype)
        need_A = [need[5 + 4 * i] and dys[i] is not None for i in range(count)]

        # G [N, sum R]: dy_i B_i side by side (zeros for a member without an output gradient). A_cat and U carry the
        # s_i where folded; dA's is applied after its product, as lora_linear applies it.
        G = None
        if need[0] or any(need_A):
            G = x.new_empty(x.shape[0], sum(ranks))
            start = 0
            for dy, B, rank in zip(dys, B_c, ranks):  # each product written into its columns: no concatenation
                if dy is None:
                    G[:, start:start + rank].zero_()
                else:
                    torch.mm(dy, B, out=G[:, start:start + rank])
                start += rank

        dx = None
        bases = [(dy, weight) for dy, weight in zip(dys, weights) if dy is not None]
        if need[0] and bases:  # (every output gradient None: x gets None too)
            if folded or len(set(scalings)) == 1:
                lora, alpha = (G, A_cat), 1 if folded else scalings[0]
            else:  # fp16, unequal scales: each member's columns of G scaled by its own s
                scale = torch.cat([G.new_full((rank,), s) for rank, s in zip(ranks, scalings)])
                lora, alpha = (G * scale, A_cat), 1
            dx = lora_linear.lora_sum(x.new_empty(x.shape), lora, bases, alpha).view(shape)

        dA_cat = mm_fp32(G.t(), x) if any(need_A) else None  # [sum R, in], fp32, unscaled
        scaled = dA_cat is not None and len(set(scalings)) == 1
        if scaled:  # one launch for every member's block (the same products as scaling each block)
            dA_cat.mul_(scalings[0])
        grads, start = [], 0
        for i, (dy, rank, s, (bias_dtype, A_dtype, B_dtype)) in enumerate(zip(dys, ranks, scalings, ctx.dtypes)):
            db = dA = dB = None
            if dy is not None:
                if need[4 + 4 * i]:
                    db = dy.sum(0, dtype=torch.float32).to(bias_dtype)
                if need_A[i]:
                    dA = dA_cat[start:start + rank]
                    dA = (dA if scaled else dA.mul_(s)).to(A_dtype)
                if need[6 + 4 * i]:
                    dB = mm_fp32(dy.t(), U[:, start:start + rank])
                    dB = (dB if folded else dB.mul_(s)).to(B_dtype)
            grads += [None, db, dA, dB]
            start += rank
        return (dx, None, None, *grads)


def group_casts(As: tuple, Bs: tuple, scalings: tuple, dtype: torch.dtype) -> tuple:
    """(A_cat, B_1, B_2, ...) for LoRAGroupFunction: the s_i A_i stacked (the A_i in fp16), everything in dtype,
    outside autograd. Two launches with one s for all (stack, then scale and cast), else one a member, into its
    rows."""
    folded = lora_linear.folds_scale(dtype)
    if not folded or len(set(scalings)) == 1:
        A_cat = lora_linear.scaled_cast(torch.cat([A.detach() for A in As]), scalings[0] if folded else 1, dtype)
    else:
        A_cat = torch.empty(sum(A.shape[0] for A in As), As[0].shape[1], dtype=dtype, device=As[0].device)
        start = 0
        for A, s in zip(As, scalings):
            lora_linear.scaled_cast(A, s, dtype, out=A_cat[start:start + A.shape[0]])
            start += A.shape[0]
    return (A_cat, *lora_linear.cast_factors(Bs, dtype))


def linear_group_with_lora(x, members, scalings, owner=None) -> tuple[torch.Tensor, ...]:
    """One output [..., out_i] per member (W, b, A, B) of x [..., in], see LoRAGroupFunction. Under torch.autocast
    everything is cast to the autocast dtype first and the Function runs with autocast off, as
    lora_linear.linear_with_lora. owner (the group): a checkpointed recompute takes its forward's factor casts
    (lora_linear.forward_casts)."""
    dtype = lora_linear._autocast_dtype(x.device.type)
    if dtype is not None:
        x = x.to(dtype)
        members = [(W.to(dtype), None if b is None else b.to(dtype), A, B) for W, b, A, B in members]
    casts = None
    if owner is not None:
        As, Bs = tuple(m[2] for m in members), tuple(m[3] for m in members)
        scalings = tuple(scalings)
        casts = lora_linear.forward_casts(owner, As + Bs, x.dtype, scalings,
                                          lambda: group_casts(As, Bs, scalings, x.dtype))
    args = (x, tuple(scalings), casts, *(t for member in members for t in member))
    if dtype is None:
        return LoRAGroupFunction.apply(*args)
    with torch.autocast(x.device.type, enabled=False):
        return LoRAGroupFunction.apply(*args)


def _mode(x: torch.Tensor) -> tuple:
    # A recompute's leftovers must not serve the next forward, nor the forward's its recompute (checkpointing then
    # sees the same input tensor again, where the projections read the layer's input directly).
    return torch.is_grad_enabled(), lora_linear._autocast_dtype(x.device.type), x._version, recompute.recomputing()


def _signature(tensors: tuple, scaling) -> tuple:
    """What a member's output depends on besides x: its (W, b, A, B), their versions, its scaling."""
    return (scaling, *(id(t) for t in tensors), *(None if t is None else t._version for t in tensors))


class _Group:
    """A leader and the members after it, and the outputs the leader computed for the others until they take them.

    Each call decides alone, from the members' state and what is waiting, never from a count of earlier calls: a
    checkpointed layer's recompute must make the forward's decisions, or it saves other tensors than the forward did.
    """

    def __init__(self, members: tuple[nn.Module, ...], label: str):
        self.members = members  # peft lora.Linear layers, leader first
        self.label = label  # for the warning: "q_proj, k_proj, v_proj of Qwen3MoeAttention"
        self.warned = False
        self._clear()

    def _clear(self) -> None:
        self.x = None  # a weak reference to the leader's input
        self.mode = None  # see _mode, at the leader's call
        self.waiting: dict[nn.Module, tuple[torch.Tensor, tuple]] = {}  # member -> (its output, its _signature)

    def __getstate__(self) -> dict:  # copy.deepcopy and pickle: outputs in flight are not part of the model
        state = dict(self.__dict__)
        state.update(x=None, mode=None, waiting={})
        return state

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """layer's output as the group gives it, or None: compute it as an ungrouped layer."""
        if layer is self.members[0]:
            return self._lead(x)
        return self._take(layer, x)

    def _lead(self, x: torch.Tensor) -> torch.Tensor | None:
        self._clear()
        # Inference tensors have no version counter to check the hand-over by; torch.compile traces the layers alone.
        if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or x.is_inference():  # (is_inference:
            # a graph break under compile)
            return None
        members, scalings = [], []
        for layer in self.members:
            fast = None if layer._forward_pre_hooks else lora_linear._fast_args(layer)
            if fast is None:
                return None
            members.append(fast[0])
            scalings.append(fast[1])
        if len({w.shape[1] for w, *_ in members}) != 1:
            return None  # not one input width: these layers cannot be reading the same tensor
        outputs = linear_group_with_lora(x, members, scalings, self)
        self.x, self.mode = weakref.ref(x), _mode(x)
        self.waiting = {layer: (out, _signature(tensors, s))
                        for layer, out, tensors, s in zip(self.members[1:], outputs[1:], members[1:], scalings[1:])}
        return outputs[0]

    def _take(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        entry = self.waiting.pop(layer, None)
        if entry is None:
            return None
        out, signature = entry
        fast = lora_linear._fast_args(layer)
        if (self.x() is x and self.mode == _mode(x) and fast is not None
                and _signature(*fast) == signature):
            if not self.waiting:
                self._clear()
            return out
        # Called with another input (or its state changed): the leader's work for it is wasted; it computes alone.
        self._clear()
        if not self.warned:
            self.warned = True
            warnings.warn(f"moetune: the LoRA layers {self.label} were grouped as reading one input but are not "
                          "called in that order on the same tensor (or one changed in between); such calls compute "
                          "alone, after the group's work for them", stacklevel=4)
        return None


def form_groups(model: nn.Module) -> int:
    """Group the fast-path LoRA layers (lora_linear.install_fast_lora_linear) that GROUPS names among each module's
    children. Idempotent; returns the number of groups in the model."""
    count = 0
    for parent in model.modules():
        children = parent._modules
        taken: set[str] = set()
        for names in GROUPS:
            present = [n for n in names if n in children and n not in taken and lora_linear._is_installed(children[n])]
            if len(present) < 2:
                continue
            members = tuple(children[n] for n in present)
            groups = {id(m.__dict__.get(lora_linear.GROUP_ATTR)) for m in members}
            current = members[0].__dict__.get(lora_linear.GROUP_ATTR)
            if current is not None and groups == {id(current)} and current.members == members:
                count += 1  # already formed
            elif all(lora_linear.GROUP_ATTR not in m.__dict__ for m in members):
                group = _Group(members, f"{', '.join(present)} of {type(parent).__name__}")
                for m in members:
                    m.__dict__[lora_linear.GROUP_ATTR] = group
                count += 1
            else:
                continue
            taken.update(present)
    return count


def ungroup(model: nn.Module) -> int:
    """Every layer computes alone again (still on lora_linear's fast path). Returns the number of layers changed."""
    return sum(m.__dict__.pop(lora_linear.GROUP_ATTR, None) is not None for m in model.modules())


def grouped_layers(model: nn.Module) -> int:
    """How many layers of the model belong to a group."""
    return sum(lora_linear.GROUP_ATTR in m.__dict__ for m in model.modules())
