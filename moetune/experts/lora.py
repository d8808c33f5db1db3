"""Split LoRA on the 3-D expert weights.

For a row routed to expert e the adapted projections are

    gu = W1[e] x + s * B1[e] (A1[e] x)      A1 [E, R, H]   B1 [E, 2I, R]
    y  = W2[e] h + s * B2[e] (A2[e] h)      A2 [E, R, I]   B2 [E, H, R]

computed as two thin grouped products on the routed rows only. `W + s * B @ A` is never
formed (that is a full copy of the expert stack per layer per step).

Either pair may be left out (None) to adapt only gate_up or only down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertLoRA"]


@dataclass(eq=False)
class ExpertLoRA:
    """LoRA factors for one experts block, in moetune's internal (expert-major) layout.

    A_gate_up: [E, R, H] or None
    B_gate_up: [E, 2I, R] or None
    A_down:    [E, R, I] or None
    B_down:    [E, H, R] or None
    scaling:   s = lora_alpha / r
    """

    A_gate_up: torch.Tensor | None
    B_gate_up: torch.Tensor | None
    A_down: torch.Tensor | None
    B_down: torch.Tensor | None
    scaling: float = 1.0

    @property
    def has_gate_up(self) -> bool:
        return self.A_gate_up is not None

    @property
    def has_down(self) -> bool:
        return self.A_down is not None

    def factors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.A_gate_up, self.B_gate_up, self.A_down, self.B_down)

    @classmethod
    def init(
        cls,
        num_experts: int,
        hidden: int,
        intermediate: int,
        rank: int,
        *,
        alpha: float | None = None,
        gate_up: bool = True,
        down: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> "ExpertLoRA":
        """Fresh trainable factors with PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0.

        kaiming_uniform(a=sqrt(5)) on a [R, fan_in] matrix is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        """
        for name, value in (("num_experts", num_experts), ("hidden", hidden), ("intermediate", intermediate),
                            ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 < alpha < float("inf")):
            raise ValueError(f"alpha: expected a finite number > 0 (or None: the rank), got {alpha!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype for the factors, got {dtype}")

        def make_A(fan_in: int) -> torch.Tensor:
            bound = fan_in**-0.5
            A = torch.empty(num_experts, rank, fan_in, dtype=dtype, device=device)
            A.uniform_(-bound, bound, generator=generator)
            return A.requires_grad_()

        def make_B(fan_out: int) -> torch.Tensor:
            return torch.zeros(num_experts, fan_out, rank, dtype=dtype, device=device, requires_grad=True)

        scaling = (alpha if alpha is not None else rank) / rank
        return cls(
            A_gate_up=make_A(hidden) if gate_up else None,
            B_gate_up=make_B(2 * intermediate) if gate_up else None,
            A_down=make_A(intermediate) if down else None,
            B_down=make_B(hidden) if down else None,
            scaling=scaling,
        )


def cast_factors(factors, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """(factors cast to the compute dtype, their own dtypes): adapters may be kept wider than the base."""
    own = tuple(None if f is None else f.dtype for f in factors)
    return tuple(None if f is None else f.to(dtype) for f in factors), own


def refuse_create_graph(backend: str) -> None:
    """Called first in a backward whose saved tensors carry no graph: under create_graph a second order would come
    out wrong or missing, so it is refused in one line."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"moe_experts: the {backend} backend's gradients cannot be differentiated again "
                           "(create_graph=True); use backend='native' for higher-order gradients")


def grads_in(grads, dtypes) -> list:
    """Factor gradients back in each factor's own dtype (None stays None)."""
    return [None if g is None else g.to(dt) for g, dt in zip(grads, dtypes)]
