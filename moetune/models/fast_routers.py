"""The fused router top-k (moetune/kernels/router_topk.py) on a transformers model, one router instance at a time.

On by default on NVIDIA GPUs (`FastMoEModel.from_pretrained(..., fused_router=False)` keeps transformers' ops).
`install_fast_routers(model)` gives each router module whose forward it recognises an instance `forward` that keeps
the router's Linear (torch's GEMM, so a trainable router weight still gets its gradient; the sigmoid routers' fp32
Linear of a bf16 model on bf16 tensor cores, _Bf16RouterLogits) and replaces what follows it:
softmax, top-k, the weights' normalisation and cast, five launches and their gradients (a sigmoid router's group-
limited choice: about twenty), by one launch each way.
Parameters and state_dict keys stay as they are; `uninstall_fast_routers(model)` deletes the instance attributes.

A router is recognised by the code of its class's forward: the body (docstring, comments aside) must be, statement for
statement, one of the forms transformers 5.17 - 5.25 write:

    "softmax_topk"            softmax, top-k, normalised when self.norm_topk_prob, cast to the logits' dtype
                              qwen3_moe, qwen2_moe, olmoe
    "softmax_topk_normalized" the same, always normalised: qwen3_vl_moe
    "mixtral"                 the same, always normalised, the weights left in fp32
    "gpt_oss"                 top-k of the logits (Linear with a bias), softmax over them in the logits' dtype:
                              the same weights as the normalised form
    "sigmoid_group_topk"      sigmoid, a choice bias, group-limited top-k, normalised, scaled (its own kernel,
                              kernels/sigmoid_router_topk.py): deepseek_v3, glm4_moe, glm4_moe_lite

The chosen experts are those transformers' routers choose on NVIDIA GPUs, ties included (but for experts whose
weights are ~0 either way); the weights agree with theirs to ~1e-6 relative before their rounding to the logits'
dtype, not bitwise: kernels/router_topk.py says why (the sigmoid routers' weights agree to fp32 rounding, and their
order among a token's experts is the kernel's: kernels/sigmoid_router_topk.py). A bf16 sigmoid router's logits
come from tensor cores, ~2e-6 relative from transformers' fp32 GEMM (_Bf16RouterLogits): a token whose experts'
choice scores tie within that may choose the other of the two. At call time the fused forward falls back to the
class's forward where the kernel cannot run (a CPU tensor outside Triton's interpreter, bf16 in the interpreter,
more experts than MAX_E, torch.compile).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from ..fp32_matmul import mm_fp32
from ..lora_linear import _autocast_dtype
from . import instance_forward
from .code_match import known_form, source_body_dump
from .fast_norms import fast_norm_available

__all__ = ["VARIANTS", "fused_routers", "install_fast_routers", "router_variant", "uninstall_fast_routers"]

_VARIANT_ATTR = "_moetune_router_variant"
# The sigmoid routers' fp32 Linear of bf16 inputs on bf16 tensor cores with fp32 sums (_Bf16RouterLogits); False:
# transformers' fp32 GEMM (benchmarks' A/B)
TENSOR_CORE_LOGITS = True
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_SOFTMAX_TOPK = """
hidden_states = hidden_states.reshape(-1, self.hidden_dim)
router_logits = F.linear(hidden_states, self.weight)
router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
{normalise}
router_top_value = router_top_value.to(router_logits.dtype)
router_scores = router_top_value
return router_logits, router_scores, router_indices
"""
_NORMALISE = "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)"

# variant -> the forward body transformers writes
VARIANTS: dict[str, str] = {
    "softmax_topk": _SOFTMAX_TOPK.format(normalise=f"if self.norm_topk_prob:\n    {_NORMALISE}"),
    "softmax_topk_normalized": _SOFTMAX_TOPK.format(normalise=_NORMALISE),
    "mixtral": f"""
hidden_states = hidden_states.reshape(-1, self.hidden_dim)
router_logits = F.linear(hidden_states, self.weight)
router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
{_NORMALISE}
router_scores = router_top_value
return router_logits, router_scores, router_indices
""",
    "gpt_oss": """
router_logits = F.linear(hidden_states, self.weight, self.bias)
router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
return router_logits, router_scores, router_indices
""",
    "sigmoid_group_topk": """
hidden_states = hidden_states.view(-1, self.hidden_dim)
router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
scores = router_logits.sigmoid()
scores_for_choice = scores + self.e_score_correction_bias
group_scores = (
    scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
    .topk(2, dim=-1)[0]
    .sum(dim=-1)
)
group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
group_mask = torch.zeros_like(group_scores)
group_mask.scatter_(1, group_idx, 1)
score_mask = (
    group_mask.unsqueeze(-1)
    .expand(-1, self.num_group, self.num_experts // self.num_group)
    .reshape(-1, self.num_experts)
)
scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
topk_weights = scores.gather(1, topk_indices)
if self.norm_topk_prob:
    denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    topk_weights /= denominator
topk_weights = topk_weights * self.routed_scaling_factor
return router_logits, topk_weights, topk_indices
""",
}
_KNOWN_BODIES = {source_body_dump(source): name for name, source in VARIANTS.items()}


@functools.cache
def _forward_variant(forward) -> str | None:
    """The VARIANTS name whose body `forward` (a function) has, or None."""
    return known_form(forward, _KNOWN_BODIES, ("self", "hidden_states"))


def router_variant(module: nn.Module) -> str | None:
    """The VARIANTS name when the fused kernel computes what this router's forward does, else None (also for a
    router whose forward is already replaced on the instance)."""
    from ..kernels.router_topk import MAX_E

    forward = instance_forward.class_forward(module)
    if forward is None:
        return None
    weight = module._parameters.get("weight")
    top_k = getattr(module, "top_k", None)
    if weight is None or weight.dim() != 2 or not 1 <= weight.shape[0] <= MAX_E or module._modules:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= weight.shape[0]:
        return None
    variant = _forward_variant(forward)
    if variant is None or set(module._parameters) != ({"weight", "bias"} if variant == "gpt_oss" else {"weight"}):
        return None
    if variant != "gpt_oss" and getattr(module, "hidden_dim", None) != weight.shape[1]:
        return None
    if variant == "sigmoid_group_topk" and not _sigmoid_router_fits(module):
        return None
    return variant


def _sigmoid_router_fits(module: nn.Module) -> bool:
    """A sigmoid router whose attributes the kernel takes as they are: num_experts its weight's rows, the choice bias
    buffer [E], a grouping it can route (kernels/sigmoid_router_topk.py's check_routing)."""
    from ..kernels.sigmoid_router_topk import check_routing

    num_experts, bias = module._parameters["weight"].shape[0], module._buffers.get("e_score_correction_bias")
    if getattr(module, "num_experts", None) != num_experts:
        return False
    if not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,) or not bias.is_floating_point():
        return False
    if isinstance(module.__dict__.get("routed_scaling_factor"), bool) \
            or not isinstance(getattr(module, "routed_scaling_factor", None), (int, float)):
        return False
    return check_routing(num_experts, module.top_k, getattr(module, "num_group", None),
                         getattr(module, "topk_group", None)) is None


def _kernel_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can take the logits F.linear(x, weight) will make (their dtype under autocast too)."""
    from ..experts.backends.triton import probe

    if torch.compiler.is_compiling() or x.device != weight.device:
        return False
    dtype = _autocast_dtype(x.device.type) or torch.promote_types(x.dtype, weight.dtype)
    return dtype in _DTYPES and probe(x.device.type, x.device.index, dtype) is None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor):
    from ..kernels.router_topk import router_topk

    variant = self.__dict__[_VARIANT_ATTR]
    if not _kernel_runs(hidden_states, self.weight) or (variant == "gpt_oss" and hidden_states.dim() != 2):
        return type(self).forward(self, hidden_states)
    if variant == "sigmoid_group_topk":
        return _sigmoid_forward(self, hidden_states)
    if variant == "gpt_oss":
        router_logits = F.linear(hidden_states, self.weight, self.bias)
    else:
        router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    normalize = bool(self.norm_topk_prob) if variant == "softmax_topk" else True
    out_dtype = torch.float32 if variant == "mixtral" else router_logits.dtype
    router_scores, router_indices = router_topk(router_logits, self.top_k, normalize=normalize, out_dtype=out_dtype)
    return router_logits, router_scores, router_indices


def _sigmoid_forward(self: nn.Module, hidden_states: torch.Tensor):
    """transformers' sigmoid router: its fp32 Linear (a bf16 model's on bf16 tensor cores, _router_logits), the rest
    in one launch each way."""
    from ..kernels.sigmoid_router_topk import sigmoid_router_topk

    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = _router_logits(hidden_states, self.weight)
    topk_weights, topk_indices = sigmoid_router_topk(
        router_logits, self.e_score_correction_bias, self.top_k, num_groups=self.num_group,
        topk_groups=self.topk_group, normalize=bool(self.norm_topk_prob), scale=self.routed_scaling_factor,
    )
    return router_logits, topk_weights, topk_indices


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), weight.float()), the sigmoid routers' fp32 Linear: through _Bf16RouterLogits for bf16 x and
    weight on CUDA (TENSOR_CORE_LOGITS), as transformers writes it otherwise. fp16 keeps the fp32 GEMM: the split of
    the fp32 gradient into fp16 parts would overflow or flush where bf16's exponent range does not."""
    if _tensor_core_logits(x.device.type, x.dtype, weight.dtype):
        return _Bf16RouterLogits.apply(x, weight)
    return F.linear(x.type(torch.float32), weight.type(torch.float32))


def _tensor_core_logits(device_type: str, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether _router_logits takes _Bf16RouterLogits: TENSOR_CORE_LOGITS, CUDA, bf16 x and weight, no autocast
    (under which transformers' F.linear would run in autocast's dtype)."""
    return (TENSOR_CORE_LOGITS and device_type == "cuda" and dtype == weight_dtype == torch.bfloat16
            and _autocast_dtype("cuda") is None)


class _Bf16RouterLogits(torch.autograd.Function):
    """x weight^T in fp32 for bf16 x [N, H] and weight [E, H], as F.linear(x.float(), weight.float()) computes it.

    A bf16 x bf16 product is exact in fp32, so a bf16 tensor-core GEMM that accumulates and stores in fp32 computes
    those sums, without the fp32 copy of x and cuBLAS' fp32 GEMM, which runs on the FMA units (GLM-4.7-Flash at
    8K: 58 us a call and a 67 MB copy of x, run 61g's profile). Tensor cores add in fp32 but truncate: the logits
    err ~2e-6 relative on an H100 against the fp32 GEMM's ~2e-7 (run 68), both far inside the bf16 rounding of the
    hidden states they come from; a token whose k-th and (k+1)-th expert score within that may choose the other.
    The input gradient g weight (g the fp32 logits' gradient) runs as one bf16 GEMM over g split in two bf16 parts,
    [hi | lo] [weight ; weight] with hi = bf16(g), lo = bf16(g - hi): g to ~2^-17 relative, the products exact, the
    sum accumulated in fp32 and rounded to bf16 once, as the cast after transformers' fp32 GEMM rounds it (hi alone
    would differ from it by an ulp in a large share of the elements: tests/models/test_fast_routers.py).
    A trainable weight gets g^T x in fp32, cast to its dtype, as autograd through transformers' casts gives it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        saved_tensors.save(ctx, x if ctx.needs_input_grad[1] else None, weight)  # a frozen weight is held
        return mm_fp32(x, weight.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = saved_tensors.load(ctx)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            parts = grad.new_empty(grad.shape[0], 2 * grad.shape[1], dtype=weight.dtype)
            hi, lo = parts.split(grad.shape[1], 1)
            hi.copy_(grad)
            lo.copy_(grad - hi)  # fp32 (promoted), exact: hi is g rounded
            grad_x = parts @ torch.cat((weight, weight))
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t() @ x.float()).to(weight.dtype)
        return grad_x, grad_weight


def install_fast_routers(model: nn.Module) -> int:
    """Swap in the fused router forward on every recognised router of `model`. Idempotent. Returns how many routers
    now run fused (0 where no CUDA GPU and no Triton interpreter, and on ROCm: nothing is changed)."""
    if not fast_norm_available() or torch.version.hip:  # ROCm's top-k breaks ties otherwise
        return 0
    return instance_forward.install(model, _VARIANT_ATTR, router_variant, _fused_forward)[0]


def uninstall_fast_routers(model: nn.Module) -> int:
    """Undo `install_fast_routers`. Returns how many routers got their class's forward back (a forward another
    wrapper put on after it stays)."""
    return instance_forward.uninstall(model, _VARIANT_ATTR, _fused_forward)


def fused_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of `model` that run the fused forward."""
    return [module for module in model.modules() if _VARIANT_ATTR in module.__dict__]
