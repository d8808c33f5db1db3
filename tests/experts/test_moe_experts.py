"""Every backend against the float64 loop reference: forward and every gradient."""

from __future__ import annotations

import importlib
import os
import random
import zlib

import pytest
import torch

from moetune.experts import ExpertLoRA, GeGLU, GptOssGLU, available_backends, moe_experts, reference_moe_experts

from .cases import Case, differentiable, make_problem, rel_err

# Fresh inputs on every run; the seed is in each failure message (set MOETUNE_TEST_SEED to replay).
BASE_SEED = int(os.environ.get("MOETUNE_TEST_SEED", random.randrange(2**31)))

# Relative error (Frobenius) allowed against float64, per compute dtype. bf16 rounds every
# intermediate (gu, h, y, out) to 8 bits of mantissa: over 150 draws of each small case below
# the median error was 0.7e-2 and the worst 1.7e-2 (grouped_mm and native alike).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

CASES = {
    "typical": Case(E=8, k=2, H=32, I=24, r=8, T=33),  # T not a multiple of any tile
    "T=1": Case(E=6, k=2, H=64, I=32, r=16, T=1),  # a single token; wide enough that bf16 norms average
    "k=1": Case(E=5, k=1, H=16, I=16, r=4, T=17),
    # Every expert on every token. T=9, r=2 put B_down's bf16 gradient over 2e-2 in 3 of 1,501 draws (a fresh-clone
    # CI run hit one: grouped_mm and native alike, 2.7e-2); T=32, r=4: none in 2,101.
    "k=E": Case(E=4, k=4, H=16, I=8, r=4, T=32),
    "prime_E_empty_experts": Case(E=7, k=2, H=24, I=16, r=8, T=11, routing="half"),
    "one_expert_takes_all": Case(E=6, k=1, H=16, I=16, r=4, T=19, routing="one"),
    "one_expert_set_takes_all": Case(E=6, k=2, H=16, I=8, r=4, T=12, routing="one"),
    "odd_H_I_rank": Case(E=5, k=2, H=19, I=13, r=3, T=10),  # no dim 16-byte aligned
    # r=1: each LoRA intermediate is one dot product, so bf16 cancellation shows unless
    # the gradient sums over enough rows (T=64 keeps the worst of 200 draws at 1.4e-2).
    "rank_1": Case(E=4, k=2, H=64, I=32, r=1, T=64),
    "no_lora": Case(E=4, k=2, H=16, I=8, r=None, T=8),
    "lora_down_only": Case(E=4, k=2, H=16, I=8, r=4, T=8, lora_parts="down"),
    "lora_gate_up_only": Case(E=4, k=2, H=16, I=8, r=4, T=8, lora_parts="gate_up"),
    "biases": Case(E=5, k=2, H=16, I=24, r=4, T=13, bias=True),
    "gpt_oss_interleaved": Case(E=4, k=2, H=24, I=16, r=4, T=14, activation="gpt_oss", interleaved=True, bias=True),
    # limit 1.0: many pre-activations beyond the clamp, so both clamp branches are exercised
    "gpt_oss_tight_clamp": Case(E=4, k=2, H=64, I=8, r=16, T=6, activation=GptOssGLU(limit=1.0), interleaved=True),
    "geglu_tanh": Case(E=4, k=2, H=16, I=8, r=4, T=9, activation=GeGLU(approximate="tanh")),
    "geglu": Case(E=5, k=3, H=16, I=8, r=8, T=9, activation="geglu"),
    "swiglu_interleaved": Case(E=4, k=2, H=16, I=8, r=4, T=7, interleaved=True),
}


def _backends(dtype):
    return available_backends("cpu", dtype)


PARAMS = [
    pytest.param(case_id, dtype, backend, id=f"{case_id}-{str(dtype)[6:]}-{backend}")
    for case_id in CASES
    for dtype in TOLERANCE
    for backend in _backends(dtype)
]


def check_against_reference(case: Case, dtype, backend, device="cpu", seed=None, **make_kw):
    seed = BASE_SEED + zlib.crc32(repr(case).encode()) if seed is None else seed
    args, kwargs, grad_out = make_problem(case, dtype, device=device, seed=seed, **make_kw)
    names, inputs = differentiable(args, kwargs)
    tol = TOLERANCE[dtype]

    ref = reference_moe_experts(*args, **kwargs)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out.double())

    out = moe_experts(*args, **kwargs, backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, inputs, grad_out)

    where = f"{case} dtype={dtype} backend={backend} seed={seed}"
    assert rel_err(out, ref) < tol, f"forward: {rel_err(out, ref):.2e} >= {tol} for {where}"
    for name, g, r, inp in zip(names, grads, ref_grads, inputs):
        assert g.dtype == inp.dtype and g.shape == inp.shape, f"grad {name}: {g.dtype}{tuple(g.shape)}"
        if name == "topk_weights":
            err = rel_err(g, r, scale=routing_grad_scale(args, kwargs, grad_out))
        else:
            err = rel_err(g, r)
        assert err < tol, f"grad {name}: {err:.2e} >= {tol} for {where}"


def routing_grad_scale(args, kwargs, grad_out):
    """||y(t, j)|| * ||d_out[t]||: the size of the terms of d_weights[t, j] = <y(t, j), d_out[t]>.

    A dot product of low-precision vectors is accurate relative to this, not to its own
    value, which cancellation can make arbitrarily small (and with T=1 there are only k of them).
    """
    x, ids, w, gate_up, down = args
    norms = []
    for j in range(ids.shape[1]):
        y_j = reference_moe_experts(x, ids[:, j : j + 1], torch.ones_like(w[:, :1]), gate_up, down, **kwargs)
        norms.append(y_j.detach().norm(dim=-1))
    return torch.stack(norms, dim=1) * grad_out.double().norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("case_id, dtype, backend", PARAMS)
def test_matches_float64_reference(case_id, dtype, backend):
    check_against_reference(CASES[case_id], dtype, backend)


@pytest.mark.parametrize("backend", _backends(torch.bfloat16))
def test_fp32_lora_and_routing_weights_with_bf16_base(backend):
    """PEFT keeps adapters in fp32 over a bf16 model; routers often emit fp32 weights."""
    check_against_reference(
        CASES["typical"], torch.bfloat16, backend, lora_dtype=torch.float32, weights_dtype=torch.float32
    )


@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_zero_tokens(backend):
    """No token: an empty output that still depends on its inputs, so backward gives zero gradients (as nn.Linear
    on an empty batch) instead of failing on an output outside the graph."""
    x = torch.randn(0, 16, requires_grad=True)
    weights = torch.zeros(0, 2, requires_grad=True)
    lora = ExpertLoRA.init(4, 16, 8, 2)
    for factor in lora.factors():
        factor.requires_grad_()
    out = moe_experts(x, torch.zeros(0, 2, dtype=torch.long), weights, torch.randn(4, 16, 16), torch.randn(4, 16, 8),
                      lora=lora, backend=backend)
    assert out.shape == (0, 16) and out.dtype == x.dtype and out.requires_grad
    out.sum().backward()
    assert x.grad.shape == (0, 16) and weights.grad.shape == (0, 2)
    assert all(f.grad is not None and not f.grad.any() for f in lora.factors())


@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_output_can_change_in_place(backend):
    """A caller may add a shared expert into the output in place (out += shared(x))."""
    args, kwargs, _ = make_problem(CASES["typical"], torch.float32, seed=BASE_SEED)
    out = moe_experts(*args, **kwargs, backend=backend)
    expected = out.detach() * 2
    out.mul_(2)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert args[0].grad is not None


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_a_second_order_is_refused_clearly(backend):
    """grouped_mm's and triton's backward save no graph: create_graph would give wrong (or missing) terms, so it
    is refused in one line; native is differentiable twice."""
    if backend not in _backends(torch.float32):
        pytest.skip(f"{backend} does not run here")
    args, kwargs, _ = make_problem(CASES["typical"], torch.float32, seed=BASE_SEED)
    out = moe_experts(*args, **kwargs, backend=backend)
    with pytest.raises(RuntimeError, match=f"the {backend} backend's gradients cannot be differentiated again"):
        torch.autograd.grad(out.square().sum(), args[0], create_graph=True)
    (dx,) = torch.autograd.grad(moe_experts(*args, **kwargs, backend="native").square().sum(), args[0],
                                create_graph=True)
    assert dx.requires_grad


@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_wide_unsigned_ids_autocast_and_compile(backend):
    """uint32 ids work (torch has no min/max for them); under autocast the output keeps x's dtype and the values
    its precision; torch.compile runs the block eagerly (a graph break) instead of failing inside Dynamo."""
    args, kwargs, _ = make_problem(CASES["typical"], torch.float32, seed=BASE_SEED)
    x, ids, weights, gate_up, down = args
    want = moe_experts(*args, **kwargs, backend=backend).detach()
    assert torch.equal(moe_experts(x, ids.to(torch.uint32), weights, gate_up, down, **kwargs, backend=backend), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe_experts(*args, **kwargs, backend=backend)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5
    compiled = torch.compile(lambda *a: moe_experts(*a, **kwargs, backend=backend) * 2, backend="eager")
    assert rel_err(compiled(*args), 2 * want) < 1e-6


def test_a_misspelt_geglu_approximation_is_refused():
    args, kwargs, _ = make_problem(CASES["typical"], torch.float32, seed=BASE_SEED)
    with pytest.raises(ValueError, match="activation: geglu approximate must be 'none' or 'tanh', got 'tahn'"):
        moe_experts(*args, **dict(kwargs, activation=GeGLU(approximate="tahn")))


@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_grad_mode_off_and_no_base_grad(backend):
    """Inference under no_grad and inference_mode works (the same output); the frozen base weights never receive a
    gradient."""
    args, kwargs, _ = make_problem(CASES["typical"], torch.float32, seed=BASE_SEED)
    with torch.no_grad():
        out = moe_experts(*args, **kwargs, backend=backend)
    assert not out.requires_grad
    with torch.inference_mode():  # its tensors keep no version counter (the tile schedules' memo reads it)
        assert torch.equal(moe_experts(*args, **kwargs, backend=backend), out)
    out = moe_experts(*args, **kwargs, backend=backend)
    out.sum().backward()
    assert args[3].grad is None and args[4].grad is None
    assert kwargs["lora"].A_gate_up.grad is not None


@pytest.mark.parametrize("case_id", ["typical", "biases", "lora_down_only", "no_lora", "gpt_oss_interleaved"])
@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_only_for_backward_gives_the_same_gradients(case_id, backend):
    """A checkpoint's recompute: the output values are skipped (zeros where a backend skips them), every
    gradient is bitwise that of the full call."""
    args, kwargs, grad_out = make_problem(CASES[case_id], torch.float32, seed=BASE_SEED)
    _, inputs = differentiable(args, kwargs)
    full = moe_experts(*args, **kwargs, backend=backend)
    skipped = moe_experts(*args, **kwargs, backend=backend, only_for_backward=True)
    assert skipped.shape == full.shape and skipped.dtype == full.dtype
    if backend != "native":  # native's autograd saves as it computes: it has nothing to skip
        assert not skipped.any()
    for g_full, g_skipped in zip(torch.autograd.grad(full, inputs, grad_out),
                                 torch.autograd.grad(skipped, inputs, grad_out)):
        assert torch.equal(g_full, g_skipped)


@pytest.mark.parametrize("in_loop", [True, False], ids=["in_loop", "own_launch"])
@pytest.mark.parametrize("case_id, dtype", [(c, torch.float32) for c in (
    "typical", "T=1", "prime_E_empty_experts", "one_expert_takes_all", "odd_H_I_rank", "lora_down_only",
    "lora_gate_up_only", "no_lora", "gpt_oss_interleaved", "rank_1")] + [("typical", torch.float16)])
def test_triton_with_the_lora_inputs_either_way(case_id, dtype, in_loop, monkeypatch):
    """The LoRA inputs su1, su2, sv2, sv1 in the next GEMM's main loop or by launches of their own, whichever
    grouped_gemm measures faster on a GPU (untuned, as here, it takes the first way offered)."""
    if "triton" not in _backends(dtype):
        pytest.skip("no Triton that can run here")
    grouped_gemm_module = importlib.import_module("moetune.kernels.grouped_gemm")  # the module, not the function
    monkeypatch.setattr(grouped_gemm_module, "_LORA_INPUT_WAYS", ({"in_loop": in_loop},))
    check_against_reference(CASES[case_id], dtype, "triton")
    # a checkpoint's recompute skips the down projection: su2 comes from its own launch there
    args, kwargs, grad_out = make_problem(CASES[case_id], dtype, seed=BASE_SEED)
    names, inputs = differentiable(args, kwargs)
    if inputs:
        ref = torch.autograd.grad(reference_moe_experts(*args, **kwargs), inputs, grad_out.double())
        got = torch.autograd.grad(moe_experts(*args, **kwargs, backend="triton", only_for_backward=True), inputs,
                                  grad_out)
        for name, g, r in zip(names, got, ref):
            scale = routing_grad_scale(args, kwargs, grad_out) if name == "topk_weights" else None
            assert rel_err(g, r, scale=scale) < TOLERANCE[dtype], name
    # x without a gradient (a first layer after frozen embeddings): sv1 comes from its own launch for dA1
    args, kwargs, grad_out = make_problem(CASES[case_id], dtype, seed=BASE_SEED)
    args[0].requires_grad_(False)
    names, inputs = zip(*[(n, t) for n, t in zip(*differentiable(args, kwargs)) if t.requires_grad] or [((), ())])
    if not inputs:
        return
    ref = torch.autograd.grad(reference_moe_experts(*args, **kwargs), inputs, grad_out.double())
    got = torch.autograd.grad(moe_experts(*args, **kwargs, backend="triton"), inputs, grad_out)
    for name, g, r in zip(names, got, ref):
        if name != "topk_weights":
            assert rel_err(g, r) < TOLERANCE[dtype], name


@pytest.mark.parametrize("sum_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("case_id", ["typical", "T=1", "one_expert_takes_all", "odd_H_I_rank"])
def test_triton_sums_over_k_by_the_kernel_or_torch(case_id, sum_kernel, monkeypatch):
    """The block's output and x's gradient are sums over each token's k slots: by kernels/sum_over_k.py (two
    launches a block, forward and backward) or, with SUM_KERNEL off, by torch's sum; against float64 either way."""
    if "triton" not in _backends(torch.float32):
        pytest.skip("no Triton that can run here")
    from moetune.experts.backends import triton as triton_backend
    from moetune.kernels import sum_over_k as sum_module

    calls = []
    kernel = sum_module.sum_over_k
    monkeypatch.setattr(sum_module, "sum_over_k", lambda y: calls.append(tuple(y.shape)) or kernel(y))
    monkeypatch.setattr(triton_backend, "SUM_KERNEL", sum_kernel)
    case = CASES[case_id]
    check_against_reference(case, torch.float32, "triton")
    # forward and backward: the block's output and x's gradient, [T, k, H] each (the reference check calls once)
    assert calls == ([(case.T, case.k, case.H)] * 2 if sum_kernel else [])
