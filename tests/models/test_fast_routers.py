"""install_fast_routers: which routers each architecture gets fused, and that the model computes the same thing.

Every architecture in the registry (fp32, Triton's interpreter on CPU): the fused routers choose the same experts as
transformers' own, and leave logits and every LoRA gradient equal to transformers' routers' to fp32 rounding;
uninstalling restores the class forward.
"""

from __future__ import annotations

import pytest
import torch

from moetune.models import fast_routers
from moetune.models.fast_routers import fused_routers, install_fast_routers, router_variant, uninstall_fast_routers

from .helpers import ALL_ARCHS, auto_class, logits_and_lora_grads, lora_model, needs_triton, relative_error, token_batch
from .tiny import tiny_config

# Fused routers per tiny model (2 decoder layers, one of them dense in qwen3_moe's, qwen2_moe's and the sigmoid
# routers' models).
EXPECTED = {
    "qwen3_moe": ("softmax_topk", 1),
    "qwen2_moe": ("softmax_topk", 1),
    "olmoe": ("softmax_topk", 2),
    "qwen3_vl_moe": ("softmax_topk_normalized", 2),
    "mixtral": ("mixtral", 2),
    "gpt_oss": ("gpt_oss", 2),
    "deepseek_v3": ("sigmoid_group_topk", 1),
    "glm4_moe": ("sigmoid_group_topk", 1),
    "glm4_moe_lite": ("sigmoid_group_topk", 1),
}
RTOL = 1e-5  # fp32: the weights differ from transformers' by a few ulps


@ALL_ARCHS
def test_each_router_is_recognised_by_its_code(model_type):
    torch.manual_seed(0)
    model = auto_class(model_type).from_config(tiny_config(model_type), dtype=torch.float32)
    variant, count = EXPECTED[model_type]
    found = [router_variant(m) for m in model.modules()]
    assert [v for v in found if v is not None] == [variant] * count


@needs_triton
@ALL_ARCHS
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_lora_step_with_checkpointing_is_unchanged(checkpoint, monkeypatch, model_type):
    """The same experts, logits and LoRA gradients (attention and experts) with and without the fused routers, with
    gradient checkpointing (the recompute runs the router again)."""
    from moetune.models import hook

    chosen = []
    real = hook.moe_experts

    def spy(x, topk_ids, *args, **kwargs):
        chosen.append(topk_ids.detach().clone())
        return real(x, topk_ids, *args, **kwargs)

    monkeypatch.setattr(hook, "moe_experts", spy)
    model = lora_model(checkpoint(model_type))
    model.train()
    ids = token_batch()
    fused = install_fast_routers(model)
    assert fused == EXPECTED[model_type][1] and install_fast_routers(model) == fused  # idempotent
    logits, grads = logits_and_lora_grads(model, ids)
    fused_ids, chosen[:] = list(chosen), []
    assert uninstall_fast_routers(model) == fused
    ref_logits, ref_grads = logits_and_lora_grads(model, ids)
    assert len(fused_ids) == len(chosen) > 0 and all(torch.equal(a, b) for a, b in zip(fused_ids, chosen))
    assert relative_error(logits, ref_logits) < RTOL
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < RTOL, name


@needs_triton
@pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning")
def test_a_trainable_router_gets_its_weight_gradient(checkpoint):
    """train_router=True: the router's Linear stays torch's, so its weight gradient is transformers' to rounding."""
    model = lora_model(checkpoint("qwen3_moe"), train_router=True)
    model.train()
    ids = token_batch()
    assert install_fast_routers(model) == 2  # the router and peft's trainable copy of it (modules_to_save)
    _, grads = logits_and_lora_grads(model, ids)
    uninstall_fast_routers(model)
    _, ref_grads = logits_and_lora_grads(model, ids)
    router = [n for n in grads if "mlp.gate" in n]
    assert router
    for name in router:
        assert relative_error(grads[name], ref_grads[name]) < RTOL, name


def test_float64_and_three_dim_gpt_oss_inputs_take_the_class_forward():
    for model_type, dtype in (("qwen3_moe", torch.float64), ("gpt_oss", torch.float32)):
        torch.manual_seed(0)
        model = auto_class(model_type).from_config(tiny_config(model_type), dtype=dtype)
        router = next(m for m in model.modules() if router_variant(m) is not None)
        install_fast_routers(model)
        shape = (5, router.weight.shape[1]) if model_type == "qwen3_moe" else (1, 5, router.weight.shape[1])
        x = torch.randn(*shape, dtype=dtype)
        got = router(x)
        uninstall_fast_routers(model)
        assert all(torch.equal(a, b) for a, b in zip(got, router(x)))


def test_uninstall_leaves_a_later_wrapper_alone():
    torch.manual_seed(0)
    model = auto_class("mixtral").from_config(tiny_config("mixtral"), dtype=torch.float32)
    install_fast_routers(model)
    router = fused_routers(model)[0]
    inner = router.forward
    router.forward = lambda x: inner(x)  # an offloading hook, say
    uninstall_fast_routers(model)
    assert "forward" in router.__dict__ and router_variant(router) is None  # (its forward is replaced still)


def test_the_class_forward_runs_where_the_kernel_cannot():
    """bf16 on CPU: Triton's interpreter does not take it, so the fused forward calls transformers' own."""
    torch.manual_seed(0)
    model = auto_class("qwen3_moe").from_config(tiny_config("qwen3_moe"), dtype=torch.bfloat16)
    router = next(m for m in model.modules() if router_variant(m) is not None)
    assert install_fast_routers(model) == (EXPECTED["qwen3_moe"][1] if fast_routers.fast_norm_available() else 0)
    x = torch.randn(5, router.hidden_dim, dtype=torch.bfloat16)
    got = router(x)
    uninstall_fast_routers(model)
    want = router(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _bf16_gradient_excess(grad: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> float:
    """How far grad (bf16) lies from the exact g @ weight beyond half a bf16 ulp of it, as a share of |g| @ |weight|
    (the scale a rounding of g or of the sum's terms errs by)."""
    exact = g.double() @ weight.double()
    half_ulp = torch.finfo(torch.bfloat16).eps / 2 * exact.abs()
    return (((grad.double() - exact).abs() - half_ulp) / (g.double().abs() @ weight.double().abs())).max().item()


def _router_case(device: str, tokens: int, hidden: int, experts: int, seed: int = 0):
    """bf16 hidden states and router weight, and a logits gradient spanning six orders of magnitude (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().to(device)
    weight = (torch.randn(experts, hidden, generator=gen) * 0.02).bfloat16().to(device)
    g = (torch.randn(tokens, experts, generator=gen) * torch.logspace(-6, 0, experts)).to(device)
    return x, weight, g


def _through_fp32_linear(x, weight, g):
    """transformers' sigmoid router Linear: logits and the gradients autograd gives through its casts."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    logits = torch.nn.functional.linear(x.type(torch.float32), weight.type(torch.float32))
    logits.backward(g)
    return logits.detach(), x.grad, weight.grad


def _through_bf16_logits(x, weight, g, *, train_weight: bool = False):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_(train_weight)
    logits = fast_routers._Bf16RouterLogits.apply(x, weight)
    logits.backward(g)
    return logits.detach(), x.grad, weight.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_router_logits_compute_the_fp32_linear(seed):
    """The logits are the fp32 Linear's; the input gradient, split in two bf16 parts, lies within 2^-15 of the exact
    gradient's scale beyond bf16's rounding (the fp32 GEMM's: ~2^-25; rounding g to bf16 alone: ~2^-8.5, rejected
    here) and equals the fp32 path's in >= 99% of the elements."""
    x, weight, g = _router_case("cpu", 257, 384, 64, seed)
    logits, grad_x, grad_weight = _through_bf16_logits(x, weight, g)
    ref_logits, ref_grad_x, _ = _through_fp32_linear(x, weight, g)
    assert logits.dtype == torch.float32 and torch.allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    assert grad_x.dtype == torch.bfloat16 and grad_weight is None
    assert _bf16_gradient_excess(grad_x, g, weight) < 2**-15
    assert _bf16_gradient_excess((g.bfloat16() @ weight), g, weight) > 2**-15  # the criterion tells hi alone apart
    assert (grad_x == ref_grad_x).float().mean().item() >= 0.99


def test_bf16_router_logits_give_a_trainable_weight_its_gradient():
    x, weight, g = _router_case("cpu", 65, 96, 8)
    _, grad_x, grad_weight = _through_bf16_logits(x, weight, g, train_weight=True)
    _, ref_grad_x, ref_grad_weight = _through_fp32_linear(x, weight, g)
    assert grad_weight.dtype == torch.bfloat16 and relative_error(grad_weight, ref_grad_weight) < 1e-2
    assert (grad_weight == ref_grad_weight).float().mean().item() >= 0.99


def test_bf16_router_logits_take_no_tokens():
    x, weight, g = _router_case("cpu", 0, 96, 8)
    logits, grad_x, _ = _through_bf16_logits(x, weight, g)
    assert logits.shape == (0, 8) and grad_x.shape == (0, 96)


def test_the_fp32_linear_stays_where_bf16_logits_do_not_apply(monkeypatch):
    """CPU tensors take transformers' fp32 GEMM as it writes it."""
    calls = []
    monkeypatch.setattr(fast_routers._Bf16RouterLogits, "apply", lambda *a: calls.append(a))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, weight = torch.randn(5, 16, dtype=dtype), torch.randn(4, 16, dtype=dtype)
        got = fast_routers._router_logits(x, weight)
        assert torch.equal(got, torch.nn.functional.linear(x.float(), weight.float()))
    assert not calls


def test_bf16_logits_only_for_bf16_on_cuda_without_autocast(monkeypatch):
    """fp16 (its range cannot hold the gradient's split), fp32, mixed dtypes, another device, autocast (transformers'
    Linear would run in autocast's dtype) and TENSOR_CORE_LOGITS off keep the fp32 GEMM."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    takes = fast_routers._tensor_core_logits
    assert takes("cuda", bf16, bf16)
    assert not any(takes(device, x, w) for device, x, w in (
        ("cuda", fp16, fp16), ("cuda", fp32, fp32), ("cuda", bf16, fp32), ("cpu", bf16, bf16), ("xpu", bf16, bf16)))
    monkeypatch.setattr(fast_routers, "_autocast_dtype", lambda device_type: bf16)
    assert not takes("cuda", bf16, bf16)
    monkeypatch.undo()
    monkeypatch.setattr(fast_routers, "TENSOR_CORE_LOGITS", False)
    assert not takes("cuda", bf16, bf16)


def test_bf16_router_logits_under_create_graph():
    """A first-order gradient with create_graph=True (a gradient penalty, say) is the plain one; only a second
    derivative through the router is refused, as moetune's other Functions refuse it."""
    x, weight, _ = _router_case("cpu", 9, 32, 4)
    x = x.requires_grad_()

    def loss():  # its logits gradient (the logits) is itself in the graph under create_graph
        logits = fast_routers._Bf16RouterLogits.apply(x, weight)
        return (logits * logits).sum() / 2

    (plain,) = torch.autograd.grad(loss(), x)
    (graphed,) = torch.autograd.grad(loss(), x, create_graph=True)
    assert torch.equal(plain, graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8192])
def test_bf16_router_logits_on_a_gpu(tokens):
    """GLM-4.7-Flash's router shape (2048 -> 64 experts) on cuBLAS: the fp32 GEMM's logits to fp32 rounding, the
    input gradient within 2^-15 of its scale beyond bf16's rounding, as on CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x, weight, g = _router_case("cuda", tokens, 2048, 64)
    logits, grad_x, _ = _through_bf16_logits(x, weight, g)
    taken = fast_routers._router_logits(x.detach().requires_grad_(), weight).grad_fn
    assert type(taken).__name__ == "_Bf16RouterLogitsBackward"
    ref_logits, ref_grad_x, _ = _through_fp32_linear(x, weight, g)
    exact = x.double() @ weight.double().t()
    scale = x.double().abs() @ weight.double().abs().t()
    assert ((logits.double() - exact).abs() / scale).max().item() < 1e-6
    assert ((ref_logits.double() - exact).abs() / scale).max().item() < 1e-6
    assert _bf16_gradient_excess(grad_x, g, weight) < 2**-15
    assert (grad_x == ref_grad_x).float().mean().item() >= 0.99


@pytest.mark.gpu
def test_a_bf16_sigmoid_router_on_a_gpu_chooses_transformers_experts():
    """glm4_moe_lite's router at GLM-4.7-Flash's width in bf16 on CUDA, fused (logits on tensor cores, which truncate
    in their fp32 sums) against its class forward: the same experts but where transformers' own choice scores of the
    two sets lie within 1e-5 (a near tie; 1e-3 of the tokens at most), the weights of the tokens that chose alike
    to fp32 rounding, the input gradient to bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    config = tiny_config("glm4_moe_lite")
    config.update({"hidden_size": 2048, "n_routed_experts": 64, "num_experts_per_tok": 4, "n_group": 1,
                   "topk_group": 1})
    torch.manual_seed(0)
    model = auto_class("glm4_moe_lite").from_config(config, dtype=torch.bfloat16).cuda()
    router = next(m for m in model.modules() if router_variant(m) is not None)
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        (install_fast_routers if fused else uninstall_fast_routers)(model)
        xi = x.clone().requires_grad_()
        logits, weights, ids = router(xi)
        order = ids.sort(-1)  # the kernel orders a token's experts its own way: compare in expert order
        weights = weights.gather(1, order.indices)
        (weights.float() * torch.linspace(-1, 1, weights.numel(), device="cuda").view_as(weights)).sum().backward()
        results.append((logits, weights, order.values, xi.grad))
    (logits, weights, ids, grad), (ref_logits, ref_weights, ref_ids, ref_grad) = results
    choice = ref_logits.sigmoid() + router.e_score_correction_bias  # transformers' scores_for_choice
    alike = (ids == ref_ids).all(-1)
    gap = choice.gather(1, ref_ids).sum(-1) - choice.gather(1, ids).sum(-1)
    assert alike.float().mean().item() >= 0.999 and gap.max().item() <= 1e-5
    assert relative_error(logits, ref_logits) < 1e-5 and relative_error(weights[alike], ref_weights[alike]) < 1e-5
    assert relative_error(grad[alike], ref_grad[alike]) < 1e-2
