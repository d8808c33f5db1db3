"""moetune.lora_linear: the LoRA Linear Function against a float64 reference, and the peft fast path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moetune import FastMoEModel, lora_groups, lora_linear
from moetune.lora_groups import linear_group_with_lora
from moetune.lora_linear import (
    LoRALinearFunction,
    install_fast_lora_linear,
    linear_with_lora,
    uninstall_fast_lora_linear,
)

from .models import helpers
from .models.helpers import (
    TOLERANCE,
    logits_and_lora_grads,
    lora_model,
    plain_peft_model,
    randomize_lora_B,
    relative_error,
    token_batch,
)

checkpoint = helpers.checkpoint  # session fixture: tiny checkpoints on disk

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")

# Relative (Frobenius) error against float64 computed from the same rounded inputs. bf16: inputs and
# the [N, R] intermediates are rounded to 8 mantissa bits (2^-9 = 2e-3 each); measured <= 4e-3.
def _reference(x, weight, bias, A, B, s):
    """Float64 y = x W^T + b + s (x A^T) B^T, with its gradients by autograd."""
    x, weight, A, B = (t.detach().double().requires_grad_() for t in (x, weight, A, B))
    bias = None if bias is None else bias.detach().double().requires_grad_()
    y = x @ weight.t() + s * (x @ A.t()) @ B.t()
    if bias is not None:
        y = y + bias
    return y, [x, A, B] + ([bias] if bias is not None else [])


def _factors(lead, d_in, d_out, rank, dtype, bias, gen):
    x = torch.randn(*lead, d_in, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).requires_grad_()  # fp32 master factors
    B = (torch.randn(d_out, rank, generator=gen) * 0.3).requires_grad_()
    return x, weight, b, A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, d_in, d_out, rank, bias",
    [
        ((13,), 17, 11, 1, False),   # [T, in], r=1, odd sizes
        ((2, 9), 24, 40, 4, True),   # [B, T, in], trainable base bias, out > in
        ((1,), 8, 5, 3, False),      # T=1
        ((3, 1, 5), 33, 7, 16, True),  # three leading dims, rank > out
        ((2, 33), 8, 40, 4, True),   # out >= 4 x in: one GEMM over [x | u] (bf16, fp32), with a bias
        ((1,), 6, 37, 2, False),     # the same at T=1, odd sizes: two GEMMs (too few rows to pay for the copies)
    ],
)
def test_function_matches_float64(dtype, lead, d_in, d_out, rank, bias):
    gen = torch.Generator().manual_seed(0)
    x, weight, b, A, B = _factors(lead, d_in, d_out, rank, dtype, bias, gen)
    s = 2.5
    y = linear_with_lora(x, weight, b, A, B, s)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    y_ref, inputs_ref = _reference(x, weight, b, A, B, s)
    dy = torch.randn(y.shape, generator=gen)
    inputs = [x, A, B] + ([b] if bias else [])
    grads = torch.autograd.grad(y, inputs, dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, dy.double())
    tol = TOLERANCE[dtype]
    assert relative_error(y, y_ref) < tol
    for name, g, g_ref, t in zip(("x", "A", "B", "bias"), grads, grads_ref, inputs):
        assert g.dtype == t.dtype, name  # dA, dB in the factors' fp32
        assert relative_error(g, g_ref) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("d_in, d_out", [(2048, 4096), (512, 8960)], ids=["qwen3-q_proj", "glm-kv_b_proj"])
def test_function_cuda_bf16_at_real_size(d_in, d_out):
    """Qwen3-30B-A3B's q_proj (2048 -> 4096) and GLM-4.7-Flash's kv_b_proj (512 -> 8960, one GEMM over [x | u]),
    r=16, 4096 tokens: the CUDA fp32-output GEMMs for dA, dB."""
    gen = torch.Generator().manual_seed(0)
    x, weight, b, A, B = (
        None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)
        for t in _factors((2, 2048), d_in, d_out, 16, torch.bfloat16, False, gen)
    )
    y = linear_with_lora(x, weight, b, A, B, 2.0)
    y_ref, inputs_ref = _reference(x, weight, b, A, B, 2.0)
    dy = torch.randn(y.shape, device="cuda")
    grads = torch.autograd.grad(y, [x, A, B], dy.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, dy.double())
    assert relative_error(y, y_ref) < TOLERANCE[torch.bfloat16]
    for g, g_ref, dtype in zip(grads, grads_ref, (torch.bfloat16, torch.float32, torch.float32)):
        assert g.dtype == dtype and relative_error(g, g_ref) < TOLERANCE[torch.bfloat16]


def test_function_skips_unneeded_gradients_and_refuses_a_trainable_base():
    gen = torch.Generator().manual_seed(0)
    x, weight, _, A, B = _factors((6,), 8, 4, 2, torch.float32, False, gen)
    (dB,) = torch.autograd.grad(linear_with_lora(x.detach(), weight, None, A, B, 1.0).sum(), [B])
    assert dB.shape == B.shape
    with pytest.raises(AssertionError, match="frozen base weight"):
        LoRALinearFunction.apply(x, weight.requires_grad_(), None, A, B, 1.0)


def _saved(fn):
    """(what fn's graph saves through save_for_backward, by id) and fn's output."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return {id(t) for t in packed}, out


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("s", [2.0, 0.5, 8.0])
def test_a_power_of_two_scale_folded_into_a_is_bitwise_scaling_after_the_products(s, first, monkeypatch):
    """s A is cast with A: for a power-of-2 s that is exact, so output and gradients are bitwise those of casting A
    and scaling each product's result (alpha), as before the fold; in either order of the LoRA and base products
    (lora_linear.LORA_TERM_FIRST)."""
    monkeypatch.setattr(lora_linear, "LORA_TERM_FIRST", first)
    gen = torch.Generator().manual_seed(5)
    x, weight, _, A, B = _factors((7,), 24, 20, 4, torch.bfloat16, False, gen)
    y = LoRALinearFunction.apply(x, weight, None, A, B, s)
    dy = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    with torch.no_grad():
        A_c, B_c = A.to(torch.bfloat16), B.to(torch.bfloat16)
        u = x @ A_c.t()
        g = dy @ B_c
        if first:  # the LoRA term (alpha: s applied to the product), the base product added into it
            want_y = torch.addmm(u.new_empty(7, 20), u, B_c.t(), beta=0, alpha=s).addmm_(x, weight.t())
            want_dx = torch.addmm(g.new_empty(7, 24), g, A_c, beta=0, alpha=s).addmm_(dy, weight)
        else:  # the base product, the LoRA term added after it
            want_y = (x @ weight.t()).addmm_(u, B_c.t(), alpha=s)
            want_dx = (dy @ weight).addmm_(g, A_c, alpha=s)
        want_dA = (g.t().float() @ x.float()).mul_(s)
        want_dB = (dy.t().float() @ u.float()).mul_(s)
    for got, want in ((y, want_y), (dx, want_dx), (dA, want_dA), (dB, want_dB)):
        assert torch.equal(got, want)


class _ForwardOps(TorchDispatchMode):
    """The aten ops a forward runs, by name (addmm_, cat, mm, ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
def test_a_wide_projection_adds_the_lora_term_inside_its_one_gemm(bias, monkeypatch):
    """out >= CONCAT_K_MIN_RATIO x in: y = [x | u] [W | B]^T (+ b), no second pass over the wide output and one
    rounding of base + LoRA instead of two: closer to float64 than the two-GEMM form, the gradients the same."""
    gen = torch.Generator().manual_seed(3)
    x, weight, b, A, B = _factors((64,), 32, 256, 8, torch.bfloat16, bias, gen)
    dy = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    inputs = [x, A, B] + ([b] if bias else [])
    results = {}
    for ratio in (4, None):
        monkeypatch.setattr(lora_linear, "CONCAT_K_MIN_RATIO", ratio)
        with _ForwardOps() as ops:
            y = LoRALinearFunction.apply(x, weight, b, A, B, 2.0)
        results[ratio] = (y, torch.autograd.grad(y, inputs, dy), ops.names)
    y_ref, inputs_ref = _reference(x, weight, b, A, B, 2.0)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, dy.double())
    (y_one, grads_one, ops_one), (y_two, grads_two, ops_two) = results[4], results[None]
    assert "addmm_" not in ops_one and ops_one.count("cat") == 2
    assert "addmm_" in ops_two and "cat" not in ops_two
    assert relative_error(y_one, y_ref) < relative_error(y_two, y_ref)
    for got, want, ref in zip(grads_one, grads_two, grads_ref):
        assert torch.equal(got, want)  # the backward is the same
        assert relative_error(got, ref) < TOLERANCE[torch.bfloat16]
    monkeypatch.setattr(lora_linear, "CONCAT_K_MIN_RATIO", 4)
    narrow = _factors((64,), 32, 127, 8, torch.bfloat16, bias, gen)  # out < 4 x in
    decode = (x[:8], weight, b, A, B)  # too few rows: copying W would cost more than the pass over y saves
    for factors in (narrow, decode):
        with _ForwardOps() as ops:
            LoRALinearFunction.apply(*factors, 2.0)
        assert "addmm_" in ops.names and "cat" not in ops.names


def test_a_wide_projection_refuses_a_weight_of_another_dtype_in_its_forward():
    """torch.cat would promote [W | B] to x's dtype and run; the backward's dy @ W would then fail. Refused in the
    forward, as F.linear refuses it."""
    gen = torch.Generator().manual_seed(4)
    x, weight, _, A, B = _factors((64,), 32, 256, 8, torch.float32, False, gen)
    with pytest.raises(RuntimeError, match="dtype"):
        LoRALinearFunction.apply(x, weight.bfloat16(), None, A, B, 2.0)


def test_only_activations_casts_of_w_and_uncast_factors_go_through_save_for_backward():
    """Each saved tensor costs checkpoint hook calls of host time: x and u are saved; the frozen W parameter and
    the small fresh casts of s A and B ride on ctx. A W cast for the call (autocast) is saved, so checkpointing frees
    it; factors already in x's dtype are the parameters, saved so that an in-place change before backward is
    caught."""
    gen = torch.Generator().manual_seed(3)
    x, weight, _, A, B = _factors((5,), 8, 6, 2, torch.float32, False, gen)
    x64 = x.detach().double().requires_grad_()  # fp32 factors cast to float64: fresh copies
    w64 = nn.Parameter(weight.double(), requires_grad=False)
    saved, y = _saved(lambda: LoRALinearFunction.apply(x64, w64, None, A, B, 2.0))
    assert len(saved) == 2 and id(x64) in saved and id(w64) not in saved
    cast_w = weight.double()  # what linear_with_lora passes under autocast: a copy made for this call
    saved, _ = _saved(lambda: LoRALinearFunction.apply(x64, cast_w, None, A, B, 2.0))
    assert len(saved) == 3 and id(cast_w) in saved
    want, leaves = _reference(x64, weight, None, A, B, 2.0)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x64, A, B), dy)
    for g, w in zip(got, torch.autograd.grad(want, leaves, dy)):
        assert relative_error(g, w) < 1e-6
    weight = nn.Parameter(weight, requires_grad=False)
    saved, _ = _saved(lambda: LoRALinearFunction.apply(x, weight, None, A, B, 1.0))  # same dtype, s = 1: A, B saved
    assert len(saved) == 4 and id(A) in saved and id(B) in saved and id(weight) not in saved
    saved, _ = _saved(lambda: LoRALinearFunction.apply(x, weight, None, A, B, 2.0))  # s A made for the call: held
    assert len(saved) == 3 and id(A) not in saved and id(B) in saved
    for factor in (A, B):
        y = LoRALinearFunction.apply(x, weight, None, A, B, 1.0)  # (saved-tensor hooks skip the version check)
        with torch.no_grad():
            factor.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_autocast_casts_like_autocast_linear():
    """Under CPU bf16 autocast with fp32 weights: bf16 output, fp32 factor grads, peft's result."""
    gen = torch.Generator().manual_seed(0)
    x, weight, b, A, B = _factors((2, 5), 16, 12, 4, torch.float32, True, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_with_lora(x, weight, b, A, B, 2.0)
        y_peft = torch.nn.functional.linear(x, weight, b) + torch.nn.functional.linear(
            torch.nn.functional.linear(x, A), B
        ) * 2.0
    assert y.dtype == y_peft.dtype == torch.bfloat16
    y_ref, _ = _reference(x, weight, b, A, B, 2.0)
    assert relative_error(y, y_ref) < TOLERANCE[torch.bfloat16]
    grads = torch.autograd.grad(y.float().sum(), [x, b, A, B])
    grads_peft = torch.autograd.grad(y_peft.float().sum(), [x, b, A, B])
    for g, g_peft in zip(grads, grads_peft):
        assert g.dtype == torch.float32 and relative_error(g, g_peft) < TOLERANCE[torch.bfloat16]


# --- peft layers: what is covered, what falls back -------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(12, 10, bias=True, dtype=dtype)
        self.o_proj = nn.Linear(10, 12, bias=False, dtype=dtype)

    def forward(self, x, **kwargs):
        return self.o_proj(self.q_proj(x, **kwargs), **kwargs)


def _tiny_peft(dtype=torch.float32, **config):
    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(**{"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "o_proj"], **config}), _Tiny(dtype)
    )
    model.requires_grad_(False)
    randomize_lora_B(model, std=0.3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # what PeftModel's autocast_adapter_dtype does on a bf16 base
        p.requires_grad_("lora_" in name)
    return model


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts layer calls on the fast path: one a layer alone, one a member of a group computed together."""
    calls = []

    def spy(*args):
        calls.append(1)
        return real(*args)

    def group_spy(x, members, scalings, owner=None):
        calls.extend([1] * len(members))
        return linear_group_with_lora(x, members, scalings, owner)

    real = lora_linear._linear_with_lora
    monkeypatch.setattr(lora_linear, "_linear_with_lora", spy)
    monkeypatch.setattr(lora_groups, "linear_group_with_lora", group_spy)
    return calls


def _outputs_and_grads(model, x, params=None, **kwargs):
    """model(x) and the gradients of x and the trainable parameters (params: model's, where model is a function)."""
    x = x.detach().requires_grad_()
    out = model(x, **kwargs)
    params = [x] + [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    return [out, *torch.autograd.grad(out.float().square().sum(), params, materialize_grads=True)]


def _same_as_peft(model, x, **kwargs):
    """Installed vs peft's own forward on the same layers: output and every trainable gradient."""
    fast = _outputs_and_grads(model, x, **kwargs)
    uninstall_fast_lora_linear(model)
    peft = _outputs_and_grads(model, x, **kwargs)
    install_fast_lora_linear(model)
    return max(relative_error(a, b) for a, b in zip(fast, peft))


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}])  # rsLoRA: only the scaling number differs
def test_install_is_per_instance_idempotent_and_reversible(config, fast_calls):
    model, other = _tiny_peft(**config), _tiny_peft()
    peft_forward = LoraLinear.forward
    assert install_fast_lora_linear(model) == 2 and install_fast_lora_linear(model) == 2
    assert "forward" not in other.q_proj.__dict__ and LoraLinear.forward is peft_forward
    keys = set(model.state_dict())
    x = torch.randn(2, 4, 12)
    assert _same_as_peft(model, x) < 1e-6 and fast_calls
    assert set(model.state_dict()) == keys
    assert uninstall_fast_lora_linear(model) == 2 and "forward" not in model.q_proj.__dict__


def test_bf16_base_with_fp32_adapters_close_to_peft():
    """peft keeps the factors in fp32 on a bf16 base; the fast path computes in bf16, grads stay fp32."""
    model = _tiny_peft(dtype=torch.bfloat16)
    assert model.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert install_fast_lora_linear(model) == 2
    x = torch.randn(3, 7, 12, dtype=torch.bfloat16)
    assert _same_as_peft(model, x) < TOLERANCE[torch.bfloat16]
    out, dx, *grads = _outputs_and_grads(model, x)
    assert out.dtype == dx.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)


def _disable(model):
    for m in (model.q_proj, model.o_proj):
        m.enable_adapters(False)


def _merge(model):
    for m in (model.q_proj, model.o_proj):
        m.merge()


def _second_adapter_active(model):
    config = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    with pytest.warns(UserWarning, match="multiple adapters"):
        inject_adapter_in_model(config, model, adapter_name="other")
    randomize_lora_B(model, std=0.3, seed=2)
    for m in (model.q_proj, model.o_proj):
        m.set_adapter("other")


def _two_adapters_active(model):
    _second_adapter_active(model)
    for m in (model.q_proj, model.o_proj):
        m.set_adapter(["default", "other"])


def _trainable_base(model):
    model.q_proj.base_layer.weight.requires_grad_(True)


def _hooked_base(model):
    model.q_proj.base_layer.register_forward_pre_hook(lambda module, args: None)


@pytest.mark.parametrize(
    "change, fast",
    [
        (_disable, 0),                 # disable_adapter(): base output
        (_merge, 0),                   # merged: base layer alone
        (_second_adapter_active, 2),   # set_adapter: the fast path follows the active adapter and its scaling
        (_two_adapters_active, 0),     # several active adapters: peft sums them
        (_trainable_base, 1),          # q_proj's base weight needs a gradient: peft's path there
        (_hooked_base, 1),             # a hook on the base Linear (ZeRO-3 style) must run
    ],
)
def test_state_changes_after_install_are_checked_at_call_time(change, fast, fast_calls):
    model = _tiny_peft()
    assert install_fast_lora_linear(model) == 2
    change(model)
    assert _same_as_peft(model, torch.randn(5, 12)) < 1e-6
    assert len(fast_calls) == fast


def test_extra_forward_arguments_take_peft_path(fast_calls):
    """Mixed-batch adapter_names arrive as a keyword argument (peft's pre-hook): peft's own forward."""
    model = _tiny_peft()
    install_fast_lora_linear(model)
    assert _same_as_peft(model, torch.randn(2, 3, 12), adapter_names=["default", "__base__"]) < 1e-6
    assert not fast_calls


@pytest.mark.parametrize(
    "config",
    [{"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}],
)
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_uncovered_variants_are_not_installed(config):
    assert install_fast_lora_linear(_tiny_peft(**config)) == 0


# --- a checkpointed recompute takes its forward's casts of the factors ---------------------------------------


@pytest.fixture
def casts_made(monkeypatch):
    """Each time a LoRA call makes its factors' casts itself: (the owner's label, whether in a recompute, weak
    references to the new cast tensors)."""
    import weakref

    from moetune.models import recompute

    made = []
    real = lora_linear.forward_casts

    def spy(owner, factors, dtype, scalings, make):
        def counted():
            casts = make()
            fresh = [weakref.ref(c) for c, f in zip(casts, factors) if c is not f]
            made.append((getattr(owner, "label", None) or type(owner).__name__, recompute.recomputing(), fresh))
            return casts

        return real(owner, factors, dtype, scalings, counted)

    monkeypatch.setattr(lora_linear, "forward_casts", spy)
    return made


def _recomputing(made) -> list[bool]:
    return [recomputing for _, recomputing, _ in made]


def _alive(made) -> int:
    """How many of the casts made are still held by anything."""
    import gc

    gc.collect()
    return sum(ref() is not None for *_, refs in made for ref in refs)


def _checkpointed(model, reentrant=False):
    from moetune.models import recompute

    return lambda *inputs: recompute.checkpoint(model, *inputs, use_reentrant=reentrant)


def test_a_checkpointed_recompute_takes_the_casts_its_forward_made(casts_made):
    """q_proj and o_proj alone: each casts its factors once a step (in forward), and the gradients are bitwise those
    of the same layers without checkpointing; nothing is held after backward."""
    model = _tiny_peft(torch.bfloat16)
    install_fast_lora_linear(model)
    x = torch.randn(2, 5, 12).to(torch.bfloat16)
    want = _outputs_and_grads(model, x)
    assert _recomputing(casts_made) == [False, False]
    casts_made.clear()
    got = _outputs_and_grads(_checkpointed(model), x, params=list(model.parameters()))
    assert _recomputing(casts_made) == [False, False]  # none in the recompute
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    del got
    assert _alive(casts_made) == 0


def test_a_factor_changed_between_forward_and_recompute_is_cast_again(casts_made):
    model = _tiny_peft(torch.bfloat16)
    install_fast_lora_linear(model)
    x = torch.randn(2, 5, 12).to(torch.bfloat16)
    out = _checkpointed(model)(x)
    with torch.no_grad():
        model.q_proj.lora_A["default"].weight.mul_(2.0)  # in place: its version count moves
    out.float().square().sum().backward()
    assert _recomputing(casts_made) == [False, False, True]  # q_proj's recompute casts again


@pytest.mark.parametrize("how", ["not checkpointed", "no grad", "no backward"])
def test_nothing_outlives_a_forward_without_its_recompute(how, casts_made):
    """The forward's casts wait in its checkpoint's own store: they go with the output (and its graph) where no
    recompute follows."""
    model = _tiny_peft(torch.bfloat16)
    install_fast_lora_linear(model)
    x = torch.randn(2, 5, 12).to(torch.bfloat16)
    call = model if how == "not checkpointed" else _checkpointed(model)
    with torch.set_grad_enabled(how != "no grad"):
        out = call(x)
    assert len(casts_made) == 2
    del out
    assert _alive(casts_made) == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_left_over_forward_feeds_no_other_checkpoint(reentrant, casts_made):
    """A checkpointed forward whose backward never runs (a skipped step), then a factor changed without a version
    count (a .data write), then another checkpoint: its recompute casts what is there now."""
    model = _tiny_peft(torch.bfloat16)
    install_fast_lora_linear(model)
    x = torch.randn(2, 5, 12).to(torch.bfloat16)
    left_over = _checkpointed(model)(x)  # noqa: F841 (kept: its checkpoint and casts stay alive)
    model.q_proj.lora_A["default"].weight.data.mul_(3.0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for call in (model, _checkpointed(model, reentrant)):  # (a reentrant checkpoint takes backward(), not grad())
        x_in = x.detach().requires_grad_()
        call(x_in).float().square().sum().backward()
        grads.append([x_in.grad] + [p.grad for p in params])
        for p in params:
            p.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_compiled_layers_after_a_left_over_forward(casts_made):
    """torch.compile inside moetune's checkpoint after an eager checkpointed forward left its casts: the compiled
    recompute makes its own (nothing is read that Dynamo would guard on), and backward gives eager's gradients."""
    model = _tiny_peft(torch.bfloat16)
    install_fast_lora_linear(model)
    x = torch.randn(2, 5, 12).to(torch.bfloat16)
    left_over = _checkpointed(model)(x)  # noqa: F841
    want = _outputs_and_grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got = _outputs_and_grads(_checkpointed(compiled), x, params=list(model.parameters()))
    assert all(relative_error(a, b) < 1e-2 for a, b in zip(got, want))


def test_fp16_keeps_the_scale_out_of_the_lora_input():
    """In fp16 (max 65504) u = x A^T stays unscaled: a u of ~5,000 with s = 16 would overflow as s x A^T."""
    gen = torch.Generator().manual_seed(7)
    x = torch.full((4, 24), 2000.0).to(torch.float16).requires_grad_()
    weight = (torch.randn(6, 24, generator=gen) * 1e-3).to(torch.float16)
    A = torch.full((2, 24), 0.104).requires_grad_()  # x A^T ~ 4,992
    B = (torch.randn(6, 2, generator=gen) * 1e-3).requires_grad_()
    y = LoRALinearFunction.apply(x, weight, None, A, B, 16.0)
    dy = torch.ones_like(y)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    want, leaves = _reference(x, weight, None, A, B, 16.0)
    assert torch.isfinite(y).all() and relative_error(y, want) < 1e-2
    for g, w in zip(grads, torch.autograd.grad(want, leaves, dy.double())):
        assert torch.isfinite(g).all() and relative_error(g, w) < 1e-2


@pytest.mark.parametrize("group", [False, True])
def test_a_second_derivative_is_refused(group):
    gen = torch.Generator().manual_seed(8)
    x, weight, _, A, B = _factors((5,), 8, 6, 2, torch.float32, False, gen)
    if group:
        y = linear_group_with_lora(x, [(weight, None, A, B), (weight, None, A, B)], (2.0, 2.0))[0]
    else:
        y = linear_with_lora(x, weight, None, A, B, 2.0)
    (dA,) = torch.autograd.grad(y.square().sum(), [A], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dA.sum().backward()


def test_a_group_recompute_takes_the_casts_its_forward_made(casts_made):
    from .test_lora_groups import _Attention, _peft

    model = _peft(_Attention().to(torch.bfloat16))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    install_fast_lora_linear(model)
    x = torch.randn(5, 12).to(torch.bfloat16)
    want = _outputs_and_grads(model, x)
    casts_made.clear()
    got = _outputs_and_grads(_checkpointed(model), x, params=list(model.parameters()))
    assert [(label, recomputing) for label, recomputing, _ in casts_made] == [
        ("q_proj, k_proj, v_proj of _Attention", False), ("Linear", False)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_model_recompute_casts_no_factor_and_keeps_its_gradients(checkpoint, casts_made, monkeypatch, model_type):
    """A bf16 model with every layer checkpointed: no LoRA Linear casts its factors in a recompute, and logits and
    every LoRA gradient equal (bitwise) those with each recompute casting its own."""
    model, _ = FastMoEModel.from_pretrained(checkpoint(model_type), dtype=torch.bfloat16)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    randomize_lora_B(model)
    model.train()
    ids = token_batch()
    logits, grads = logits_and_lora_grads(model, ids)
    assert casts_made and not any(_recomputing(casts_made))
    assert _alive(casts_made) == 0  # the logits keep no graph (autograd.grad freed it)
    monkeypatch.setattr(lora_linear, "forward_casts", lambda owner, factors, dtype, scalings, make: make())
    own_logits, own_grads = logits_and_lora_grads(model, ids)
    assert torch.equal(logits, own_logits)
    assert all(torch.equal(g, own_grads[name]) for name, g in grads.items())


# --- whole moetune model -----------------------------------------------------------------------------


def test_model_logits_and_every_lora_gradient_unchanged(checkpoint, fast_calls):
    """qwen3_moe, q/k/v/o + dense MLP Linear LoRA + expert LoRA, gradient checkpointing on: peft's own forward (the
    reference) against the fast path get_peft_model installs."""
    model = lora_model(checkpoint("qwen3_moe"))
    model.train()
    ids = token_batch()
    linear = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert uninstall_fast_lora_linear(model) == len(linear) > 0
    logits, grads = logits_and_lora_grads(model, ids)
    assert not fast_calls
    assert install_fast_lora_linear(model) == len(linear)
    fast_logits, fast_grads = logits_and_lora_grads(model, ids)
    assert len(fast_calls) >= 2 * len(linear)  # forward and checkpointing recompute
    assert relative_error(fast_logits, logits) < 1e-5
    assert any("experts.lora_" in n for n in grads) and any("q_proj.lora_A" in n for n in grads)
    for name, g in grads.items():
        assert relative_error(fast_grads[name], g) < 1e-5, name


@pytest.mark.parametrize("model_type", ["glm4_moe_lite", "deepseek_v3"])
def test_model_latent_attention_kv_b_takes_one_gemm_and_matches_peft(checkpoint, model_type, monkeypatch):
    """MLA's kv_b_proj (the tiny configs: 8 -> 64) is wide enough for [x | u] [W | B]^T: peft's own forward against
    the fast path, checkpointed, logits and every LoRA gradient. The latent projections as train_step targets them."""
    targets = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_up_proj", "down_proj")
    model = lora_model(checkpoint(model_type), target_modules=targets)
    model.train()
    ids = token_batch()
    wide = []
    real = lora_linear._concatenates

    def spy(x2, weight, rank):
        taken = real(x2, weight, rank)
        wide.append((tuple(weight.shape), taken))
        return taken

    monkeypatch.setattr(lora_linear, "_concatenates", spy)
    fast_logits, fast_grads = logits_and_lora_grads(model, ids)
    assert any(taken for _, taken in wide) and all(taken == (shape[0] >= 4 * shape[1]) for shape, taken in wide)
    uninstall_fast_lora_linear(model)
    logits, grads = logits_and_lora_grads(model, ids)
    assert relative_error(fast_logits, logits) < 1e-5
    assert any("kv_b_proj.lora_A" in n for n in grads)
    for name, g in grads.items():
        assert relative_error(fast_grads[name], g) < 1e-5, name


def test_model_disable_merge_and_plain_peft_load(checkpoint, tmp_path, fast_calls):
    model_dir = checkpoint("qwen3_moe")
    base, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    ids = token_batch()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = lora_model(model_dir, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert install_fast_lora_linear(model) > 0
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        assert fast_calls and relative_error(logits, base_logits) > 1e-2
        fast_calls.clear()
        with model.disable_adapter():
            assert relative_error(model(ids).logits, base_logits) < 1e-6
        model.merge_adapter()
        assert relative_error(model(ids).logits, logits) < 1e-5
        assert not fast_calls
        model.unmerge_adapter()
        assert relative_error(model(ids).logits, logits) < 1e-5 and fast_calls
    model.save_pretrained(tmp_path)
    reference = plain_peft_model(model_dir, str(tmp_path))
    with torch.no_grad():
        assert relative_error(reference(ids).logits, logits) < 1e-5


def test_model_with_dropout_keeps_peft_path(checkpoint):
    model = lora_model(checkpoint("qwen3_moe"), lora_dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert install_fast_lora_linear(model) == 0
