"""Input checks for moe_experts: one ValueError naming the argument and what was expected.

One exception: on CUDA the expert-id range is checked on the device (a host sync per MoE layer would stall the
step), so an out-of-range id stops the process with a device-side assert; where the routing plan's counting
sort runs, the plan makes that check (routing.checks_ids).
"""

from __future__ import annotations

import math

import torch

from .lora import ExpertLoRA
from .routing import checks_ids

__all__ = ["check_inputs"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _need_tensor(name: str, t, ndim: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {expected}, got {_shape(t)}")


def _need_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], expected: str) -> None:
    if tuple(t.shape) != shape:
        want = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{name}: expected shape {expected} = {want}, got {_shape(t)}")


def check_inputs(
    x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, lora, interleaved
) -> None:
    """Validate everything cheap to check, plus the id range (on CPU at once; on CUDA without a host sync)."""
    _need_tensor("x", x, 2, "[T, H]")
    _need_tensor("topk_ids", topk_ids, 2, "[T, k]")
    _need_tensor("topk_weights", topk_weights, 2, "[T, k]")
    _need_tensor("gate_up", gate_up, 3, "[E, 2I, H]")
    _need_tensor("down", down, 3, "[E, H, I]")

    num_tokens, hidden = x.shape
    num_experts, two_i = gate_up.shape[0], gate_up.shape[1]
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected an integer tensor, got {topk_ids.dtype}")
    if topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids: expected shape [T, k] with T = {num_tokens} and k >= 1, got {_shape(topk_ids)}")
    _need_shape("topk_weights", topk_weights, tuple(topk_ids.shape), "[T, k]")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights: expected a floating-point tensor, got {topk_weights.dtype}")
    if num_experts < 1 or two_i < 2 or two_i % 2 or gate_up.shape[2] != hidden:
        raise ValueError(
            f"gate_up: expected shape [E, 2I, H] with E >= 1, an even 2I and H = {hidden}, got {_shape(gate_up)}"
        )
    inter = two_i // 2
    _need_shape("down", down, (num_experts, hidden, inter), "[E, H, I]")
    for name, t in (("gate_up", gate_up), ("down", down)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if gate_up_bias is not None:
        _need_tensor("gate_up_bias", gate_up_bias, 2, "[E, 2I]")
        _need_shape("gate_up_bias", gate_up_bias, (num_experts, two_i), "[E, 2I]")
    if down_bias is not None:
        _need_tensor("down_bias", down_bias, 2, "[E, H]")
        _need_shape("down_bias", down_bias, (num_experts, hidden), "[E, H]")
    for name, t in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if not isinstance(interleaved, bool):
        raise ValueError(f"interleaved: expected True or False, got {interleaved!r}")

    tensors = {"x": x, "topk_ids": topk_ids, "topk_weights": topk_weights, "gate_up": gate_up, "down": down}
    tensors.update(gate_up_bias=gate_up_bias, down_bias=down_bias)
    if lora is not None:
        _check_lora(lora, num_experts, hidden, inter)
        tensors.update(zip(("lora.A_gate_up", "lora.B_gate_up", "lora.A_down", "lora.B_down"), lora.factors()))
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")

    if torch.is_grad_enabled():
        for name, t in (("gate_up", gate_up), ("down", down), ("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name}: expected a frozen base weight (requires_grad=False); moetune trains experts "
                    "through LoRA only and never computes a base-weight gradient"
                )

    if topk_ids.numel() and not checks_ids(topk_ids, num_experts):  # else plan_routing checks them, on the device
        lo, hi = torch.aminmax(topk_ids)
        if topk_ids.is_cuda:
            # A host sync per MoE layer call would stop the host from queueing kernels ahead of the GPU (the
            # whole-model step went idle between layers): check on the device instead. A bad id then stops the
            # process with a device-side assert, as CUDA's own index checks would.
            torch._assert_async((lo >= 0) & (hi < num_experts),
                                f"topk_ids: expected expert ids in [0, {num_experts - 1}]")
            return
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids: expected expert ids in [0, {num_experts - 1}], got values in [{lo}, {hi}]")


def _check_lora(lora, num_experts: int, hidden: int, inter: int) -> None:
    if not isinstance(lora, ExpertLoRA):
        raise ValueError(f"lora: expected a moetune.experts.ExpertLoRA or None, got {type(lora).__name__}")
    if not isinstance(lora.scaling, (int, float)) or not math.isfinite(lora.scaling):
        raise ValueError(f"lora.scaling: expected a finite number, got {lora.scaling!r}")
    pairs = (
        ("gate_up", lora.A_gate_up, lora.B_gate_up, hidden, 2 * inter, "[E, r, H]", "[E, 2I, r]"),
        ("down", lora.A_down, lora.B_down, inter, hidden, "[E, r, I]", "[E, H, r]"),
    )
    dtypes = set()
    for part, A, B, fan_in, fan_out, a_expected, b_expected in pairs:
        a_name, b_name = f"lora.A_{part}", f"lora.B_{part}"
        if (A is None) != (B is None):
            raise ValueError(f"{a_name}/{b_name}: expected both factors or neither, got one of them")
        if A is None:
            continue
        _need_tensor(a_name, A, 3, a_expected)
        _need_tensor(b_name, B, 3, b_expected)
        rank = A.shape[1]
        if rank < 1:
            raise ValueError(f"{a_name}: expected rank r >= 1, got {_shape(A)}")
        _need_shape(a_name, A, (num_experts, rank, fan_in), a_expected)
        _need_shape(b_name, B, (num_experts, fan_out, rank), b_expected)
        for name, t in ((a_name, A), (b_name, B)):
            if not t.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"lora: expected all factors in one dtype, got {sorted(str(d) for d in dtypes)}")
