"""Backend registry and selection.

A backend is a function (x, topk_weights, plan, gate_up, down, gate_up_bias, down_bias,
lora, act, interleaved, only_for_backward) -> out [T, H], plus an availability check for a device and
dtype. only_for_backward: the output values will be discarded (see moe_experts); a backend may skip
computing them.

Order of precedence: the `backend=` argument, then MOETUNE_MOE_BACKEND, then automatic:
the first backend in PREFERENCE that is usable for the device and dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...devices import resolve_device
from . import grouped_mm as _grouped_mm
from . import triton as _triton
from .native import native_experts

__all__ = ["Backend", "BACKENDS", "KNOWN_BACKENDS", "ENV_VAR", "available_backends", "select_backend", "get_backend"]

ENV_VAR = "MOETUNE_MOE_BACKEND"

# Every name a user may ask for.
KNOWN_BACKENDS = ("native", "grouped_mm", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[..., torch.Tensor]
    unavailable_reason: Callable[[torch.device, torch.dtype], str | None]


def _native_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _grouped_mm_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return _grouped_mm.probe(device.type, device.index, dtype)


def _triton_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return _triton.probe(device.type, device.index, dtype)


def _function_backend(function: type[torch.autograd.Function]) -> Callable[..., torch.Tensor]:
    """The backend call for an autograd Function taking (x, topk_weights, gate_up, down, biases,
    the four LoRA factors, plan, scaling, activation, interleaved, only_for_backward)."""

    def run(x, topk_weights, plan, gate_up, down, gate_up_bias, down_bias, lora, act, interleaved, only_for_backward):
        factors = lora.factors() if lora is not None else (None, None, None, None)
        scaling = lora.scaling if lora is not None else 0.0
        return function.apply(
            x, topk_weights, gate_up, down, gate_up_bias, down_bias, *factors, plan, scaling, act, interleaved,
            only_for_backward,
        )

    return run


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", _function_backend(_triton.TritonExpertsFunction), _triton_reason),
    "grouped_mm": Backend("grouped_mm", _function_backend(_grouped_mm.GroupedExpertsFunction), _grouped_mm_reason),
    "native": Backend("native", native_experts, _native_reason),
}

# Fastest first, per device type. grouped_mm runs each projection as one grouped GEMM over all
# experts; native launches 4-8 small GEMMs per expert and syncs once for the row counts. On CPU,
# triton exists only as Triton's interpreter (for tests): usable when forced, never chosen.
PREFERENCE = {
    "cuda": ("triton", "grouped_mm", "native"),
    "cpu": ("grouped_mm", "native", "triton"),
}


def _preference(device: torch.device) -> tuple[str, ...]:
    return PREFERENCE.get(device.type, ("native",))


def _unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name not in BACKENDS:
        return f"the {name} backend is not part of this moetune version yet"
    return BACKENDS[name].unavailable_reason(device, dtype)


def available_backends(device=None, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Backends usable for `device` (default: the current GPU, else CPU) and `dtype`, fastest first."""
    device = resolve_device(device)
    return [name for name in _preference(device) if _unavailable(name, device, dtype) is None]


def _check_name(name, source: str) -> str:
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(KNOWN_BACKENDS)}, got {name!r}")
    return name


# Measured: one experts block (forward + backward) runs faster on the Triton kernels at every shape
# benchmarked from 4K tokens (H100 run 24, H200 run 31: Qwen3 4K 3.5 vs 4.7 ms, gpt-oss 4K 6.8 vs 9.0).
# In whole models the host's launch overhead also counts, and small problems are host-bound:
#   Qwen3-30B-A3B 4K tokens (32768 rows x 2048 x 768): triton slower on an H100 (run 23: 34.5k/32.7k vs
#     37.9k/39.0k tok/s), a tie or faster on an H200 (run 32: 53.9k/49.2k vs 40.8k/48.1k);
#   GLM-4.7-Flash 8K (32768 x 2048 x 1536): a tie on an H200 (80.7k vs 81.7k tok/s, run 32);
#   gpt-oss-20b 8K (32768 x 2880 x 2880): triton 16% faster (59.7k vs 51.6k tok/s, run 32);
#   Qwen3 8K and 16K (65536+ rows x 2048 x 768): triton faster (runs 9, 16).
# So the choice goes by one projection's size, rows x hidden x expert width, not by rows alone:
# triton from Qwen3's 8K size (3 * 2**35 ~ 1.03e11) up.
TRITON_MIN_GEMM_SIZE = 3 * 2**35


def select_backend(
    device=None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
    gemm_size: int | None = None,
    explain: bool = False,
) -> str | tuple[str, str]:
    """The backend moe_experts will use; with explain=True, (name, why).

    backend= wins, then the MOETUNE_MOE_BACKEND environment variable, then the fastest usable one
    for the device, dtype and problem size (gemm_size = routed rows * hidden * expert width, the
    multiply-adds of one projection; None: a large problem).
    A forced backend that cannot run here raises ValueError with the reason.
    """
    device = resolve_device(device)
    forced, source = backend, "backend"
    if forced is None and os.environ.get(ENV_VAR, "").strip():  # set but blank counts as unset, as empty does
        forced, source = os.environ[ENV_VAR].strip(), ENV_VAR
    if forced is not None:
        _check_name(forced, source)
        reason = _unavailable(forced, device, dtype)
        if reason is not None:
            raise ValueError(f"{source}: {forced!r} cannot run on {device} with {dtype}: {reason}")
        why = f"forced by {'the backend argument' if source == 'backend' else f'{ENV_VAR}={forced}'}"
        return (forced, why) if explain else forced

    skipped = []
    for name in _preference(device):
        if name == "triton" and device.type == "cpu":
            continue
        if name == "triton" and gemm_size is not None and gemm_size < TRITON_MIN_GEMM_SIZE:
            skipped.append(f"triton: grouped_mm measured as fast or faster below {TRITON_MIN_GEMM_SIZE:.2e} "
                           "routed rows x hidden x expert width (host-bound)")
            continue
        reason = _unavailable(name, device, dtype)
        if reason is None:
            why = f"fastest usable backend on {device} for {dtype}"
            if skipped:
                why += " (" + "; ".join(skipped) + ")"
            return (name, why) if explain else name
        skipped.append(f"{name}: {reason}")
    raise AssertionError("the native backend is always usable")


def get_backend(name: str) -> Backend:
    return BACKENDS[name]
