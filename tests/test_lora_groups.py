"""moetune.lora_groups: sibling LoRA Linear layers on one input as one Function, against float64 and peft."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from moetune import FastMoEModel, lora_linear
from moetune.fast_model import _decoder_layers
from moetune.lora_groups import (
    GROUPS,
    LoRAGroupFunction,
    form_groups,
    grouped_layers,
    linear_group_with_lora,
    ungroup,
)
from moetune.lora_linear import install_fast_lora_linear, uninstall_fast_lora_linear

from .models import helpers
from .models.helpers import (
    TOLERANCE,
    logits_and_lora_grads,
    lora_model,
    randomize_lora_B,
    relative_error,
    token_batch,
)

checkpoint = helpers.checkpoint  # session fixture: tiny checkpoints on disk

pytestmark = pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")


def _member(d_in, d_out, rank, dtype, bias, gen):
    weight = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    b = None
    if bias == "frozen":
        b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype)
    elif bias == "trainable":
        b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).requires_grad_()
    A = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).requires_grad_()  # fp32 master factors
    B = (torch.randn(d_out, rank, generator=gen) * 0.3).requires_grad_()
    return weight, b, A, B


def _reference(x, members, scalings):
    """Float64 outputs x W_i^T + b_i + s_i (x A_i^T) B_i^T, and the leaves to differentiate."""
    x64 = x.detach().double().requires_grad_()
    outputs, leaves = [], []
    for (weight, b, A, B), s in zip(members, scalings):
        A64, B64 = (t.detach().double().requires_grad_() for t in (A, B))
        y = x64 @ weight.double().t() + s * (x64 @ A64.t()) @ B64.t()
        leaf_b = None
        if b is not None:
            leaf_b = b.detach().double().requires_grad_(b.requires_grad)
            y = y + leaf_b
        outputs.append(y)
        leaves.append((A64, B64, leaf_b))
    return x64, outputs, leaves


# (lead shape, input width, (out, rank, bias) a member, scalings)
CASES = [
    ((1,), 16, ((24, 4, None), (8, 4, None), (8, 4, None)), (2.0, 2.0, 2.0)),               # T=1, q/k/v-like
    ((2, 9), 24, ((40, 3, "frozen"), (12, 5, "trainable")), (1.0, 0.37)),                     # ranks, scales differ
    ((13,), 17, ((11, 1, "frozen"), (7, 2, None), (5, 16, "frozen")), (4.0, 2.0, 0.5)),       # odd sizes, r=1
]


@pytest.mark.parametrize("first", [True, False])  # lora_linear.LORA_TERM_FIRST: either order of the products
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, d_in, shapes, scalings", CASES)
def test_function_matches_float64(dtype, lead, d_in, shapes, scalings, first, monkeypatch):
    monkeypatch.setattr(lora_linear, "LORA_TERM_FIRST", first)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, d_in, generator=gen).to(dtype).requires_grad_()
    members = [_member(d_in, out, rank, dtype, bias, gen) for out, rank, bias in shapes]
    outputs = linear_group_with_lora(x, members, scalings)
    x64, ref_outputs, ref_leaves = _reference(x, members, scalings)
    assert len(outputs) == len(members)
    for out, ref in zip(outputs, ref_outputs):
        assert out.dtype == dtype and out.shape == ref.shape
        assert relative_error(out, ref) < TOLERANCE[dtype]

    weights = [torch.randn(out.shape, generator=gen).to(dtype) for out in outputs]
    sum(((o.float() * w.float()).sum() for o, w in zip(outputs, weights))).backward()
    sum(((o * w.double()).sum() for o, w in zip(ref_outputs, weights))).backward()
    assert relative_error(x.grad, x64.grad) < TOLERANCE[dtype]
    for (_, b, A, B), (A64, B64, b64) in zip(members, ref_leaves):
        assert A.grad.dtype == B.grad.dtype == torch.float32  # the factors' own dtype
        assert relative_error(A.grad, A64.grad) < TOLERANCE[dtype]
        assert relative_error(B.grad, B64.grad) < TOLERANCE[dtype]
        if b is not None and b.requires_grad:
            assert b.grad.dtype == dtype and relative_error(b.grad, b64.grad) < TOLERANCE[dtype]


class _NoGradient(torch.autograd.Function):
    """Passes its input on; backward gives it no gradient (None)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("first", [True, False])
def test_no_member_gradient_gives_x_none_from_the_group(first, monkeypatch):
    """Every member output used, none of them with a gradient back: the group adds nothing to x's gradient."""
    monkeypatch.setattr(lora_linear, "LORA_TERM_FIRST", first)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen).requires_grad_()
    members = [_member(16, out, 4, torch.float32, None, gen) for out in (24, 8)]
    outputs = linear_group_with_lora(x, members, (2.0, 2.0))
    (sum(_NoGradient.apply(o).sum() for o in outputs) + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.gpu
def test_function_cuda_bf16_at_real_size():
    """Qwen3-30B-A3B's q/k/v (2048 -> 4096, 512, 512; r=16), 4096 tokens: strided U columns in the CUDA GEMMs
    (the LoRA products and dB's fp32-output GEMM read a member's columns of U in place)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2048, 2048, generator=gen).to(torch.bfloat16).cuda().requires_grad_()
    members = [tuple(None if t is None else t.detach().cuda().requires_grad_(t.requires_grad) for t in
                     _member(2048, out, 16, torch.bfloat16, "frozen", gen)) for out in (4096, 512, 512)]
    outputs = linear_group_with_lora(x, members, (2.0, 2.0, 2.0))
    x64, ref_outputs, ref_leaves = _reference(x, members, (2.0, 2.0, 2.0))
    dys = [torch.randn(o.shape, device="cuda") for o in outputs]
    leaves = [x] + [t for _, _, A, B in members for t in (A, B)]
    grads = torch.autograd.grad(outputs, leaves, [dy.bfloat16() for dy in dys])
    ref_grads = torch.autograd.grad(ref_outputs, [x64] + [t for A, B, _ in ref_leaves for t in (A, B)],
                                    [dy.double() for dy in dys])
    for out, ref in zip(outputs, ref_outputs):
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == (torch.bfloat16 if i == 0 else torch.float32)
        assert relative_error(g, g_ref) < TOLERANCE[torch.bfloat16], i


def test_an_unused_member_output_gets_no_factor_gradients():
    """A member whose output does not reach the loss: its factors get no gradient (as if never called), the others'
    gradients and dx are those of the used members alone."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=gen).requires_grad_()
    members = [_member(10, out, 2, torch.float32, None, gen) for out in (8, 4, 4)]
    q, k, v = linear_group_with_lora(x, members, (2.0, 2.0, 2.0))
    leaves = [x, members[0][2], members[0][3], members[1][2], members[2][2], members[2][3]]
    dx, dA_q, dB_q, dA_k, dA_v, dB_v = torch.autograd.grad(q.square().sum() + v.sum(), leaves, allow_unused=True)
    assert dA_k is None
    x64, (q64, _, v64), ref = _reference(x, members, (2.0, 2.0, 2.0))
    expected = torch.autograd.grad(q64.square().sum() + v64.sum(), [x64, *ref[0][:2], *ref[2][:2]])
    for got, want in zip((dx, dA_q, dB_q, dA_v, dB_v), expected):
        assert relative_error(got, want) < 1e-5


def test_a_scale_not_a_power_of_two_rounds_as_one_layer_does():
    """bf16, s = 1.7: each member's dA as lora_linear's own Function computes it (s applied in fp32, after the GEMM)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    members = [_member(32, out, 4, torch.bfloat16, None, gen) for out in (16, 8)]
    outputs = linear_group_with_lora(x, members, (1.7, 1.7))
    grads = torch.autograd.grad(sum(o.float().square().sum() for o in outputs), [m[2] for m in members])
    for (weight, _, A, B), dA in zip(members, grads):
        y = lora_linear.linear_with_lora(x, weight, None, A, B, 1.7)
        (alone,) = torch.autograd.grad(y.float().square().sum(), [A])
        assert relative_error(dA, alone) < 1e-6


@pytest.mark.parametrize("bias", [None, "frozen"])
def test_outputs_may_be_changed_in_place(bias):
    """OLMoE's clip_qkv clamps the projections' outputs in place: no view made inside the Function (F.linear of a
    3-D input with a bias returns one)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, generator=gen).requires_grad_()
    members = [_member(8, out, 2, torch.float32, bias, gen) for out in (8, 4)]
    q, k = linear_group_with_lora(x, members, (2.0, 2.0))
    single = lora_linear.linear_with_lora(x, *members[1], 2.0)
    for y in (q, k, single):
        y.clamp_(-0.5, 0.5)
    (q.sum() + k.sum() + single.sum()).backward()
    assert x.grad.shape == x.shape and all(m[2].grad is not None for m in members)


def _saved(fn):
    """Tensors that go through save_for_backward (what checkpointing packs), by identity."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return packed


def test_only_x_and_the_lora_input_are_saved():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 12, generator=gen).to(torch.bfloat16).requires_grad_()
    members = [_member(12, out, 3, torch.bfloat16, "frozen", gen) for out in (12, 4, 4)]
    members = [(nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False), A, B)
               for w, b, A, B in members]
    packed = _saved(lambda: linear_group_with_lora(x, members, (2.0,) * 3))
    assert len(packed) == 2
    assert packed[0].data_ptr() == x.data_ptr() and packed[0].shape == x.shape  # x (flattened: the same tensor here)
    assert packed[1].shape == (5, 9)  # U [N, sum R]


def test_autocast_casts_like_autocast_linear():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen).requires_grad_()
    members = [_member(8, out, 2, torch.float32, "frozen", gen) for out in (8, 6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = linear_group_with_lora(x, members, (2.0, 2.0))
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    sum(o.float().sum() for o in outputs).backward()
    x64, ref_outputs, ref_leaves = _reference(x, members, (2.0, 2.0))
    sum(o.sum() for o in ref_outputs).backward()
    assert x.grad.dtype == torch.float32 and relative_error(x.grad, x64.grad) < TOLERANCE[torch.bfloat16]
    for out, ref in zip(outputs, ref_outputs):
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
    for (_, _, A, B), (A64, B64, _) in zip(members, ref_leaves):
        assert A.grad.dtype == B.grad.dtype == torch.float32
        assert relative_error(A.grad, A64.grad) < TOLERANCE[torch.bfloat16]
        assert relative_error(B.grad, B64.grad) < TOLERANCE[torch.bfloat16]


# --- groups of peft layers ---------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """q/k/v/o as transformers' attention calls them: q, k, v on one input, in that order (or as given: `order`;
    `kv_input`: k and v read that tensor instead, as cross-attention does)."""

    def __init__(self, order=("q_proj", "k_proj", "v_proj")):
        super().__init__()
        self.q_proj = nn.Linear(12, 8, bias=True)
        self.k_proj = nn.Linear(12, 4, bias=True)
        self.v_proj = nn.Linear(12, 4, bias=False)
        self.o_proj = nn.Linear(16, 12, bias=False)
        self.order = order

    def forward(self, x, kv_input=None):
        inputs = {"q_proj": x, "k_proj": x if kv_input is None else kv_input, "v_proj": x if kv_input is None else
                  kv_input}
        out = {name: getattr(self, name)(inputs[name]) for name in self.order}
        return self.o_proj(torch.cat([out["q_proj"], out["k_proj"], out["v_proj"]], dim=-1))


def _peft(module, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=list(targets)), module)
    randomize_lora_B(model, std=0.3)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _outputs_and_grads(model, *inputs, call=None):
    """model's output and the gradients of its inputs and trainable parameters; call: how to run it (model)."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = (call or model)(*inputs)
    params = inputs + [p for p in model.parameters() if p.requires_grad]
    return [out, *torch.autograd.grad(out.square().sum(), params, materialize_grads=True)]


def _peft_error(model, *inputs):
    fast = _outputs_and_grads(model, *inputs)
    uninstall_fast_lora_linear(model)
    peft = _outputs_and_grads(model, *inputs)
    install_fast_lora_linear(model)
    return max(relative_error(a, b) for a, b in zip(fast, peft))


def _expected_k(model, x):
    k = model.k_proj
    return k.base_layer(x) + k.scaling["default"] * k.lora_B["default"](k.lora_A["default"](x))


@pytest.fixture
def group_calls(monkeypatch):
    """Counts LoRAGroupFunction calls (each entry: the number of tensors it got after x, the scalings and the casts)."""
    calls = []
    real = LoRAGroupFunction.apply

    def spy(*args):
        calls.append(len(args) - 3)
        return real(*args)

    monkeypatch.setattr(LoRAGroupFunction, "apply", spy)
    return calls


def test_attention_projections_form_one_group_and_match_peft(group_calls):
    model = _peft(_Attention())
    assert install_fast_lora_linear(model) == 4
    assert grouped_layers(model) == 3 and form_groups(model) == 1  # idempotent: the same group
    assert install_fast_lora_linear(model) == 4 and grouped_layers(model) == 3
    assert _peft_error(model, torch.randn(2, 5, 12)) < 1e-6
    assert group_calls == [12]  # one call for q, k and v (4 tensors a member), none for peft's pass
    assert ungroup(model) == 3 and grouped_layers(model) == 0 and form_groups(model) == 1
    assert uninstall_fast_lora_linear(model) == 4 and grouped_layers(model) == 0


def test_group_of_the_members_that_have_lora():
    """k_proj without LoRA: q and v still form a group (v is called after k, with the same tensor)."""
    model = _peft(_Attention(), targets=("q_proj", "v_proj", "o_proj"))
    install_fast_lora_linear(model)
    assert grouped_layers(model) == 2
    assert _peft_error(model, torch.randn(3, 12)) < 1e-6


class _LatentAttention(nn.Module):
    """MLA without a query LoRA rank (DeepSeek-V3's q_lora_rank=None): q_proj and kv_a_proj_with_mqa on one input."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 8)
        self.kv_a_proj_with_mqa = nn.Linear(12, 6, bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.kv_a_proj_with_mqa(x)], dim=-1)


def test_latent_attention_without_query_rank_groups_q_and_kv_a(group_calls):
    model = _peft(_LatentAttention(), targets=("q_proj", "kv_a_proj_with_mqa"))
    install_fast_lora_linear(model)
    assert grouped_layers(model) == 2
    assert _peft_error(model, torch.randn(4, 12)) < 1e-6 and group_calls == [8]


def test_another_call_order_computes_alone_and_warns_once(group_calls):
    """k before q: k finds nothing waiting (first call) or a stale output (later calls) and computes alone; the
    group's work for it is wasted, results are peft's."""
    model = _peft(_Attention(order=("k_proj", "q_proj", "v_proj")))
    inputs = [torch.randn(4, 12) for _ in range(3)]
    peft = [_outputs_and_grads(model, x) for x in inputs]
    install_fast_lora_linear(model)
    with pytest.warns(UserWarning, match="not called in that order") as record:
        fast = [_outputs_and_grads(model, x) for x in inputs]
    assert len(record) == 1 and group_calls == [12] * 3
    assert "q_proj, k_proj, v_proj of _Attention" in str(record[0].message)
    for got, want in zip(fast, peft):
        assert max(relative_error(a, b) for a, b in zip(got, want)) < 1e-6


@pytest.mark.parametrize("case", ["k first", "cross-attention"])
@pytest.mark.filterwarnings("ignore:moetune. the LoRA layers")
def test_checkpointed_recompute_decides_as_its_forward(case):
    """moetune's checkpoint with the projections reading the checkpoint's own input (the same tensor in forward and
    recompute): the recompute must save what the forward saved, and take none of the forward's leftovers."""
    from moetune.models import recompute

    order = ("k_proj", "q_proj", "v_proj") if case == "k first" else ("q_proj", "k_proj", "v_proj")
    model = _peft(_Attention(order=order))
    x, kv = torch.randn(5, 12), torch.randn(5, 12)
    inputs = (x,) if case == "k first" else (x, kv)

    def checkpointed(*args):
        return recompute.checkpoint(model, *args, use_reentrant=False)

    want = _outputs_and_grads(model, *inputs)
    install_fast_lora_linear(model)
    for _ in range(2):
        got = _outputs_and_grads(model, *inputs, call=checkpointed)
        assert max(relative_error(a, b) for a, b in zip(got, want)) < 1e-6


def test_inference_mode_computes_alone(group_calls):
    """Tensors made under inference_mode have no version counter to check the hand-over by."""
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    x = torch.randn(2, 12)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        out = model(x.clone())
    assert relative_error(out, expected) < 1e-6 and group_calls == [12]  # the no_grad call only


def test_a_member_called_with_another_tensor_computes_alone():
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    x, other = torch.randn(3, 12), torch.randn(3, 12)
    with torch.no_grad(), pytest.warns(UserWarning, match="not called in that order"):
        model.q_proj(x)
        assert relative_error(model.k_proj(other), _expected_k(model, other)) < 1e-6


def _disable_k(model):
    model.k_proj.enable_adapters(False)


def _pre_hook_on_v(model):
    model.v_proj.register_forward_pre_hook(lambda module, args: (args[0] * 2,))


def _second_adapter_on_v(model):
    with pytest.warns(UserWarning, match="multiple adapters"):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj"]), model, adapter_name="b")
    model.v_proj.set_adapter(["default", "b"])


@pytest.mark.parametrize("change", [_disable_k, _pre_hook_on_v, _second_adapter_on_v])
def test_a_member_off_the_fast_path_leaves_the_call_ungrouped(change, group_calls):
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    change(model)
    assert _peft_error(model, torch.randn(2, 3, 12)) < 1e-6
    assert not group_calls


def _k_adapter_disabled(model):
    model.k_proj.enable_adapters(False)


def _k_factor_changed(model):
    with torch.no_grad():
        model.k_proj.lora_B["default"].weight.mul_(3)


def _k_other_adapter(model):
    with pytest.warns(UserWarning, match="multiple adapters"):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj"]), model, adapter_name="b")
    randomize_lora_B(model, std=0.3, seed=3)
    model.k_proj.set_adapter("b")


@pytest.mark.parametrize("change", [_k_adapter_disabled, _k_factor_changed, _k_other_adapter])
def test_a_member_changed_after_the_leader_computes_alone(change):
    """The output waiting for k was computed with k's state at q's call: k, changed since, computes its own."""
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    x = torch.randn(3, 12)
    with torch.no_grad(), pytest.warns(UserWarning, match="not called in that order"):
        model.q_proj(x)
        change(model)
        got = model.k_proj(x)
        uninstall_fast_lora_linear(model)
        assert relative_error(got, model.k_proj(x)) < 1e-6


def test_an_input_changed_in_place_after_the_leader_computes_alone():
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    x = torch.randn(3, 12)
    with torch.no_grad(), pytest.warns(UserWarning, match="not called in that order"):
        model.q_proj(x)
        x.mul_(3)
        assert relative_error(model.k_proj(x), _expected_k(model, x)) < 1e-6


def test_grad_mode_change_between_members_computes_alone():
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    x = torch.randn(3, 12)
    q = model.q_proj(x)
    with torch.no_grad(), pytest.warns(UserWarning, match="not called in that order"):
        k = model.k_proj(x)
        expected = _expected_k(model, x)
    assert q.requires_grad and not k.requires_grad and relative_error(k, expected) < 1e-6


def test_a_copy_leaves_outputs_in_flight_behind(group_calls):
    """A model deep-copied between a leader's call and its members' (after an exception, say): the copy's group is
    its own layers', with nothing waiting, and groups its calls."""
    model = _peft(_Attention())
    install_fast_lora_linear(model)
    model.q_proj(torch.randn(3, 12, requires_grad=True))  # k's and v's outputs now wait, with their graph
    copied = copy.deepcopy(model)
    group = copied.q_proj.__dict__[lora_linear.GROUP_ATTR]
    assert not group.waiting and all(a is b for a, b in zip(group.members, (copied.q_proj, copied.k_proj,
                                                                              copied.v_proj)))
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert relative_error(copied(x), model(x)) < 1e-6
    assert group_calls == [12] * 3


# --- whole moetune models ----------------------------------------------------------------------------------------


def _group_targets(model_dir) -> tuple[str, ...]:
    """Every name GROUPS lists that is a Linear layer of this model, and o_proj."""
    base, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    linear = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    return tuple(sorted(linear & ({n for names in GROUPS for n in names} | {"o_proj"})))


@helpers.ALL_ARCHS
def test_every_architecture_groups_in_forward_and_recompute_alike(checkpoint, group_calls, model_type):
    """Gradient checkpointing on every layer: each group computes once in forward and once in the recompute, and
    logits and every LoRA gradient equal the ungrouped fast path's."""
    model_dir = checkpoint(model_type)
    model = lora_model(model_dir, target_modules=_group_targets(model_dir))
    model.train()
    groups = {id(g) for m in model.modules() if (g := m.__dict__.get(lora_linear.GROUP_ATTR)) is not None}
    layers = len(_decoder_layers(model))
    assert len(groups) >= layers  # attention's group in every layer at least
    ids = token_batch()
    logits, grads = logits_and_lora_grads(model, ids)
    assert len(group_calls) == 2 * len(groups)
    ungroup(model)
    ungrouped_logits, ungrouped_grads = logits_and_lora_grads(model, ids)
    assert relative_error(logits, ungrouped_logits) < 1e-5
    for name, g in grads.items():
        assert relative_error(g, ungrouped_grads[name]) < 1e-5, name


def test_get_peft_model_without_groups(checkpoint, group_calls):
    model = lora_model(checkpoint("qwen3_moe"), lora_groups=False)
    model.train()
    logits, grads = logits_and_lora_grads(model, token_batch())
    assert grouped_layers(model) == 0 and not group_calls
    assert install_fast_lora_linear(model) > 0 and grouped_layers(model) > 0  # groups=True by default
    grouped_logits, grouped_grads = logits_and_lora_grads(model, token_batch())
    assert group_calls and relative_error(grouped_logits, logits) < 1e-5
    for name, g in grads.items():
        assert relative_error(grouped_grads[name], g) < 1e-5, name


def test_groups_keep_parameters_and_leave_nothing_waiting(checkpoint):
    """Parameters and state dict keys stay peft's; nothing waits in a group after a step."""
    model = lora_model(checkpoint("qwen3_moe"))
    keys = set(model.state_dict())
    model.train()
    model(input_ids=token_batch(), labels=token_batch()).loss.backward()
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get(lora_linear.GROUP_ATTR)) is not None}
    assert groups and all(not g.waiting for g in groups.values())
    assert set(model.state_dict()) == keys
