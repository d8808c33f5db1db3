"""The fused SwiGLU (moetune/kernels/swiglu.py) in transformers' gated MLPs, one module instance at a time.

On by default on CUDA GPUs (`FastMoEModel.from_pretrained(..., fused_mlp=False)` keeps transformers' ops). The
gated MLPs of the supported models (the shared experts of qwen2_moe, deepseek_v3, glm4_moe, glm4_moe_lite; the
dense layers of deepseek_v3, glm4_moe and qwen3_moe's mlp_only_layers) write

    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj

`install_fast_mlp(model)` gives each module whose class's forward is exactly that (docstring, comments aside),
with a SiLU act_fn, an instance `forward` that calls the same three projections in the same order (gate_proj,
then up_proj: what lora_groups.py's gate/up group expects) and computes silu(gate) * up in one launch each way
instead of five (kernels/swiglu.py: the same roundings as torch's ops, a result within one rounding of theirs).
The projections stay the modules they are (LoRA layers included). Parameters and state_dict keys are untouched;
`uninstall_fast_mlp(model)` deletes the instance attributes.

At call time the fused forward computes transformers' way where the kernel cannot run (a CPU tensor outside Triton's
interpreter, bf16 in the interpreter, torch.compile, an act_fn changed or hooked since, projection outputs of
another shape, dtype or layout).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import instance_forward
from .code_match import known_form, source_body_dump
from .fast_norms import fast_norm_available

__all__ = ["fused_mlps", "install_fast_mlp", "mlp_variant", "uninstall_fast_mlp"]

_VARIANT_ATTR = "_moetune_mlp_variant"
_FORWARD = """
down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
return down_proj
"""
_KNOWN_BODIES = {source_body_dump(_FORWARD): "swiglu"}


def _silu_classes() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return SiLUActivation, nn.SiLU


@functools.cache
def _forward_variant(forward) -> str | None:
    return known_form(forward, _KNOWN_BODIES, ("self", "x"))


def mlp_variant(module: nn.Module) -> str | None:
    """"swiglu" when the fused forward computes what this module's forward does, else None (also for an MLP whose
    forward is already replaced on the instance)."""
    forward = instance_forward.class_forward(module)
    if forward is None or _forward_variant(forward) is None:
        return None
    children = module._modules
    if not all(isinstance(children.get(name), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        return None
    return "swiglu" if type(children.get("act_fn")) in _silu_classes() else None


def _kernel_runs(gate: torch.Tensor, act_fn: nn.Module) -> bool:
    from ..experts.backends.triton import probe

    return (
        not torch.compiler.is_compiling()
        and type(act_fn) in _silu_classes()
        and not instance_forward.runs_more_than_forward(act_fn)  # the fused path does not call act_fn
        and probe(gate.device.type, gate.device.index, gate.dtype) is None
    )


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)
    act_fn = self.act_fn
    if not _kernel_runs(gate, act_fn):
        return self.down_proj(act_fn(gate) * self.up_proj(x))  # transformers' order: act_fn before up_proj
    up = self.up_proj(x)
    from ..kernels.swiglu import SwiGLUFunction, check_inputs

    if check_inputs(gate, up) is not None:  # shapes, dtypes, devices, layouts the kernel does not take
        return self.down_proj(act_fn(gate) * up)
    return self.down_proj(SwiGLUFunction.apply(gate, up))


def install_fast_mlp(model: nn.Module) -> int:
    """Swap in the fused forward on every recognised gated MLP of `model`. Idempotent. Returns how many MLPs now
    run fused (0 where no CUDA GPU and no Triton interpreter: nothing is changed)."""
    if not fast_norm_available():
        return 0
    return instance_forward.install(model, _VARIANT_ATTR, mlp_variant, _fused_forward)[0]


def uninstall_fast_mlp(model: nn.Module) -> int:
    """Undo `install_fast_mlp`. Returns how many MLPs got their class's forward back (a forward another wrapper put
    on after it stays)."""
    return instance_forward.uninstall(model, _VARIANT_ATTR, _fused_forward)


def fused_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs of `model` that run the fused forward."""
    return [module for module in model.modules() if _VARIANT_ATTR in module.__dict__]
