"""The transformers hook: moetune's expert engine behind transformers' `ExpertsInterface`.

transformers v5 dispatches every `@use_experts_implementation` experts module through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. moetune registers one function there,
"moetune", and `install` switches one model instance to it with the public
`set_experts_implementation`: each model keeps its own router code, the expert weights stay the
same parameters (shared storage, no copy), no class is patched, and `uninstall` switches back.

Per experts module, `install` stores an `ExpertsBinding` (layout, activation) and LoRA adds four factors in
moetune's internal layout, one per adapter name as peft keeps its own (`<factor>.<adapter>.weight`, so code that
walks peft's parameter names, as TRL's reference adapter copy does, finds them):
    lora_A_gate_up [E, R, H]   lora_B_gate_up [E, 2I, R]   lora_A_down [E, R, I]   lora_B_down [E, H, R]
The experts compute with the active adapter's factors (`set_expert_adapter`), with none under
`expert_lora_disabled`, or with none while they are merged into the base weights (`merge_expert_lora`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..experts import ExpertLoRA, moe_experts
from ..experts.activations import Activation
from .recompute import recomputing
from .spec import ArchSpec

__all__ = [
    "IMPLEMENTATION",
    "ExpertsBinding",
    "LORA_PARAMS",
    "install",
    "uninstall",
    "installed",
    "find_experts",
    "add_expert_lora",
    "expert_lora",
    "expert_lora_disabled",
    "expert_adapters",
    "add_expert_adapter",
    "set_expert_adapter",
    "delete_expert_adapter",
    "merge_expert_lora",
    "remove_expert_lora",
]

IMPLEMENTATION = "moetune"
LORA_PARAMS = ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down")
_BINDING = "moetune_binding"
_PREVIOUS = "_moetune_previous_experts_implementation"
_LORA_OFF = "_moetune_expert_lora_off"
_ACTIVE = "_moetune_active_adapter"
_MERGED = "_moetune_expert_lora_merged"
DEFAULT_ADAPTER = "default"

# Used when the base expert weights are trainable (full fine-tuning): moetune never computes base-weight
# gradients, so it hands those calls to transformers' own grouped implementation.
_FALLBACK = "grouped_mm"


class ExpertFactor(nn.Module):
    """One LoRA factor of one adapter (a module, so its parameter is named `<factor>.<adapter>.weight` as peft's)."""

    def __init__(self, weight: torch.Tensor, requires_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)


@dataclass(frozen=True)
class ExpertsBinding:
    """What the moetune experts forward needs to know about one experts module."""

    transposed: bool
    interleaved: bool
    bias: bool
    activation: Activation
    scaling: float = 1.0


def expert_lora(module: nn.Module, adapter: str | None = None) -> ExpertLoRA | None:
    """The module's LoRA factors of `adapter` (default: the active one) as an ExpertLoRA; None without LoRA.
    (Read at every experts call: plain dict lookups, not nn.Module's attribute fallbacks.)"""
    held = module._modules
    if held.get(LORA_PARAMS[0]) is None and held.get(LORA_PARAMS[2]) is None:
        return None
    adapter = adapter or module.__dict__.get(_ACTIVE, DEFAULT_ADAPTER)
    factors = []
    for name in LORA_PARAMS:
        factor = held[name]._modules.get(adapter) if name in held else None
        factors.append(None if factor is None else factor._parameters["weight"])
    if factors[0] is None and factors[2] is None:
        return None
    return ExpertLoRA(*factors, scaling=module.__dict__[_BINDING].scaling)


def expert_adapters(module: nn.Module) -> list[str]:
    """The adapter names the module holds expert LoRA for."""
    held = module._modules.get(LORA_PARAMS[0]) or module._modules.get(LORA_PARAMS[2])
    return list(held.keys()) if held is not None else []


def add_expert_adapter(module: nn.Module, adapter: str, generator: torch.Generator | None = None) -> None:
    """A new adapter's factors beside the existing ones, of the same parts, shapes and dtype: fresh as peft makes
    them (A uniform, B = 0, so it changes nothing until trained or copied into) and frozen until made active."""
    held = expert_lora(module, expert_adapters(module)[0])
    if held.has_gate_up:
        (num_experts, rank, hidden), intermediate = held.A_gate_up.shape, held.B_gate_up.shape[1] // 2
    else:
        (num_experts, rank, intermediate), hidden = held.A_down.shape, held.B_down.shape[1]
    like = held.A_gate_up if held.has_gate_up else held.A_down
    fresh = ExpertLoRA.init(num_experts, hidden, intermediate, rank, gate_up=held.has_gate_up, down=held.has_down,
                            dtype=like.dtype, device=like.device, generator=generator)
    for name, factor in zip(LORA_PARAMS, fresh.factors()):
        if factor is not None:
            module._modules[name][adapter] = ExpertFactor(factor.detach(), requires_grad=False)


def set_expert_adapter(module: nn.Module, adapter: str, trainable: bool | None = None) -> None:
    """Compute with `adapter`'s factors; with `trainable` given, they require grad where it is True and the other
    adapters' do not (as peft's set_adapter does for its layers)."""
    if adapter not in expert_adapters(module):
        raise ValueError(f"adapter_name: expected one of {expert_adapters(module)}, got {adapter!r}")
    setattr(module, _ACTIVE, adapter)
    if trainable is None:
        return
    for name in LORA_PARAMS:
        for key, factor in (module._modules.get(name) or {}).items():
            factor.weight.requires_grad_(trainable and key == adapter)


def delete_expert_adapter(module: nn.Module, adapter: str) -> None:
    for name in LORA_PARAMS:
        held = module._modules.get(name)
        if held is not None and adapter in held:
            del held[adapter]


@torch.no_grad()
def merge_expert_lora(module: nn.Module, merge: bool) -> None:
    """Fold the active adapter's update into the base expert weights (W += s B A per expert, in the weight's dtype:
    each merge and unmerge rounds them, as peft's own merge does), or take the merged adapter's out again; while
    merged the experts compute without LoRA. Biases are untouched."""
    merged = module.__dict__.get(_MERGED)
    if bool(merged) == merge:
        return
    lora = expert_lora(module, None if merge else merged)
    gate_up, down, _, _ = _base_weights(module, getattr(module, _BINDING))
    scale = lora.scaling if merge else -lora.scaling
    for weight, A, B in ((gate_up, lora.A_gate_up, lora.B_gate_up), (down, lora.A_down, lora.B_down)):
        if A is not None:  # [E, out, in] += s * [E, out, R] @ [E, R, in]
            weight.baddbmm_(B.to(weight.dtype), A.to(weight.dtype), alpha=scale)
    setattr(module, _MERGED, module.__dict__.get(_ACTIVE, DEFAULT_ADAPTER) if merge else None)


def remove_expert_lora(module: nn.Module) -> None:
    """Drop every adapter's expert LoRA: the module computes its base experts again."""
    for name in LORA_PARAMS:
        module._modules.pop(name, None)
    for flag in (_ACTIVE, _MERGED, _LORA_OFF):
        module.__dict__.pop(flag, None)


@contextlib.contextmanager
def expert_lora_disabled(modules):
    """Within, the experts modules compute without their LoRA (the base experts): peft's disable_adapter for the
    expert LoRA, which lives outside peft's layers. Nests; each module's earlier state comes back on exit."""
    previous = [(module, getattr(module, _LORA_OFF, False)) for module in modules]
    for module, _ in previous:
        setattr(module, _LORA_OFF, True)
    try:
        yield
    finally:
        for module, was in previous:
            setattr(module, _LORA_OFF, was)


def _base_weights(module: nn.Module, binding: ExpertsBinding):
    gate_up, down = module.gate_up_proj, module.down_proj
    if binding.transposed:  # [E, H, 2I] / [E, I, H] -> views in moetune's [E, 2I, H] / [E, H, I]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    b1 = module.gate_up_proj_bias if binding.bias else None
    b2 = module.down_proj_bias if binding.bias else None
    return gate_up, down, b1, b2


def moetune_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ExpertsInterface entry: hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    binding: ExpertsBinding | None = getattr(self, _BINDING, None)
    if binding is None:
        raise ValueError(
            f"experts_implementation: {IMPLEMENTATION!r} is set on a {type(self).__name__} that moetune did not "
            "install; use moetune.FastMoEModel.from_pretrained or moetune.models.install"
        )
    gate_up, down, b1, b2 = _base_weights(self, binding)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gate_up, down, b1, b2)):
        warnings.warn(
            "moetune: expert base weights are trainable (no LoRA applied?); running transformers' "
            f"{_FALLBACK} experts for this call, moetune trains experts through LoRA only",
            stacklevel=2,
        )
        return ALL_EXPERTS_FUNCTIONS[_FALLBACK](self, hidden_states, top_k_index, top_k_weights)
    # Routers compute weights in fp32 or the model dtype; the engine takes either.
    return moe_experts(
        hidden_states, top_k_index, top_k_weights, gate_up, down,
        gate_up_bias=b1, down_bias=b2,
        lora=None if self.__dict__.get(_LORA_OFF) or self.__dict__.get(_MERGED) else expert_lora(self),
        activation=binding.activation, interleaved=binding.interleaved,
        only_for_backward=recomputing(),  # see recompute.py: only additions follow in every supported architecture
    )


# The documented extension point of transformers' experts dispatch (a name -> function entry, no patching).
ExpertsInterface.register(IMPLEMENTATION, moetune_experts_forward)


def find_experts(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Experts modules of the model, by qualified name (those ending in spec.experts_module)."""
    found = {
        name: module
        for name, module in model.named_modules()
        if (name == spec.experts_module or name.endswith("." + spec.experts_module))
        and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
    }
    for name, module in found.items():
        if module.gate_up_proj.is_floating_point() and module.gate_up_proj.element_size() == 1:  # a float8 kind
            raise ValueError(f"model: its experts are FP8-quantized ({name}.gate_up_proj is {module.gate_up_proj.dtype});"
                             " moetune trains on dequantized experts: load with "
                             "quantization_config=FineGrainedFP8Config(dequantize=True)")
    if not found:
        if any(name.endswith("gate_up_proj_blocks") for name, _ in model.named_parameters()):
            raise ValueError("model: its experts are MXFP4-quantized (gate_up_proj_blocks); moetune trains on "
                             "dequantized experts: load with quantization_config=Mxfp4Config(dequantize=True)")
        raise ValueError(
            f"model: expected {spec.experts_module} modules with gate_up_proj for model_type {spec.model_type!r}, "
            f"found none in {type(model).__name__}"
        )
    return found


def install(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Route the model's expert compute through moetune. Idempotent; returns the experts modules."""
    config = spec.language_config(model.config)
    experts = find_experts(model, spec)
    for module in experts.values():
        if not hasattr(module, _BINDING):
            setattr(
                module, _BINDING,
                ExpertsBinding(spec.transposed, spec.interleaved, spec.bias, spec.activation(config, module)),
            )
    if not hasattr(model, _PREVIOUS):
        setattr(model, _PREVIOUS, model.get_experts_implementation())
    model.set_experts_implementation(IMPLEMENTATION)
    return experts


def uninstall(model: nn.Module) -> None:
    """Undo `install`: previous experts implementation back, bindings and expert LoRA removed (of a peft model's
    base model too). The model is then no longer one moetune's get_peft_model takes."""
    if hasattr(model, "get_base_model"):  # a peft model: its attribute reads reach the base model, deletes do not
        model = model.get_base_model()
    previous = model.__dict__.get(_PREVIOUS)
    if previous is None:
        return
    model.set_experts_implementation(previous)
    delattr(model, _PREVIOUS)
    for module in model.modules():
        if installed(module):
            delattr(module, _BINDING)
            remove_expert_lora(module)


def installed(module: nn.Module) -> bool:
    """Whether `install` bound this experts module (and `uninstall` has not unbound it)."""
    return _BINDING in module.__dict__


def add_expert_lora(
    module: nn.Module, rank: int, alpha: float, *, gate_up: bool, down: bool, generator: torch.Generator | None = None
) -> None:
    """Fresh trainable expert LoRA on one installed experts module (PEFT's init: A uniform, B = 0; fp32)."""
    binding: ExpertsBinding = getattr(module, _BINDING)
    gate_up_w, down_w, _, _ = _base_weights(module, binding)
    num_experts, two_i, hidden = gate_up_w.shape
    # fp32 factors over a bf16 base, as PEFT keeps them; the engine casts for the compute.
    lora = ExpertLoRA.init(
        num_experts, hidden, two_i // 2, rank, alpha=alpha, gate_up=gate_up, down=down,
        device=gate_up_w.device, generator=generator,
    )
    setattr(module, _BINDING, ExpertsBinding(**{**binding.__dict__, "scaling": lora.scaling}))
    for name, factor in zip(LORA_PARAMS, lora.factors()):
        if factor is not None:
            module.add_module(name, nn.ModuleDict({DEFAULT_ADAPTER: ExpertFactor(factor.detach(), requires_grad=True)}))
    setattr(module, _ACTIVE, DEFAULT_ADAPTER)
