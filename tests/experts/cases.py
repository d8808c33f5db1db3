"""Random MoE-block problems shared by the expert-engine tests (and the GPU tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.experts import ExpertLoRA, get_activation
from moetune.experts.activations import split_gate_up


@dataclass(frozen=True)
class Case:
    E: int
    k: int
    H: int
    I: int
    r: int | None  # None: no LoRA
    T: int
    routing: str = "random"  # random | one (every token to the same k experts) | half (only the first half used)
    activation: object = "swiglu"  # a name or an Activation instance
    interleaved: bool = False
    bias: bool = False
    lora_parts: str = "both"  # both | gate_up | down


def make_routing(case: Case, gen: torch.Generator, device) -> torch.Tensor:
    if case.routing == "one":
        chosen = torch.randperm(case.E, generator=gen)[: case.k]
        return chosen.expand(case.T, case.k).contiguous().to(device)
    pool = case.E if case.routing == "random" else max(case.k, case.E // 2)
    logits = torch.rand(case.T, pool, generator=gen)
    return logits.topk(case.k, dim=-1).indices.to(device)


def make_problem(case: Case, dtype, device="cpu", seed: int = 0, lora_dtype=None, weights_dtype=None):
    """Inputs with magnitudes like a trained layer (unit activations, 1/sqrt(fan_in) weights).

    For clamped activations (gpt_oss) the draw is repeated until no pre-activation lies within
    a bf16 rounding step of a clamp kink: there the derivative jumps, and a low-precision
    backend may legitimately fall on the other side than the float64 reference.
    """
    limit = getattr(get_activation(case.activation), "limit", None)
    for attempt in range(100):
        problem = _make_problem(case, dtype, device, seed + attempt, lora_dtype, weights_dtype)
        if limit is None or _clear_of_kinks(problem, limit, margin=0.02 * limit, interleaved=case.interleaved):
            return problem
    raise AssertionError(f"no draw clear of the clamp kinks for {case}")


def _clear_of_kinks(problem, limit: float, margin: float, interleaved: bool) -> bool:
    (x, ids, _, gate_up, _), kwargs, _ = problem
    W1 = gate_up.detach().double()[ids]  # [T, k, 2I, H]
    gu = torch.einsum("tkoh,th->tko", W1, x.detach().double())
    lora = kwargs["lora"]
    if lora is not None and lora.A_gate_up is not None:
        A, B = lora.A_gate_up.detach().double()[ids], lora.B_gate_up.detach().double()[ids]
        gu = gu + lora.scaling * torch.einsum("tkor,tkrh,th->tko", B, A, x.detach().double())
    if kwargs["gate_up_bias"] is not None:
        gu = gu + kwargs["gate_up_bias"].double()[ids]
    gate, up = split_gate_up(gu, interleaved)  # kinks: gate at +limit, up at -limit and +limit
    near = torch.cat([((gate - limit).abs() <= margin).flatten(), ((up.abs() - limit).abs() <= margin).flatten()])
    # Small problems: not one value near a kink (one flip moves a 100-value norm by percents).
    # Wide problems always have a few; up to 1 in 10^4 shifts the norm by far less than bf16 noise.
    return bool(near.float().mean() <= 1e-4)


def _make_problem(case: Case, dtype, device, seed, lora_dtype, weights_dtype):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    E, H, I = case.E, case.H, case.I
    x = randn(case.T, H).requires_grad_()
    ids = make_routing(case, gen, device)
    w = torch.rand(case.T, case.k, generator=gen).softmax(-1).to(device=device, dtype=weights_dtype or dtype)
    w.requires_grad_()
    gate_up = randn(E, 2 * I, H, scale=H**-0.5)
    down = randn(E, H, I, scale=I**-0.5)
    if case.interleaved:  # gpt-oss stores [E, H, 2I]; the engine takes the transposed view
        gate_up = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    b1 = randn(E, 2 * I, scale=0.5) if case.bias else None
    b2 = randn(E, H, scale=0.5) if case.bias else None
    lora = None
    if case.r is not None:
        ldt = lora_dtype or dtype
        gu, dn = case.lora_parts in ("both", "gate_up"), case.lora_parts in ("both", "down")
        mk = lambda *shape, fan: randn(*shape, scale=fan**-0.5, dt=ldt).requires_grad_()  # noqa: E731
        lora = ExpertLoRA(
            A_gate_up=mk(E, case.r, H, fan=H) if gu else None,
            B_gate_up=mk(E, 2 * I, case.r, fan=case.r) if gu else None,
            A_down=mk(E, case.r, I, fan=I) if dn else None,
            B_down=mk(E, H, case.r, fan=case.r) if dn else None,
            scaling=2.0,
        )
    grad_out = randn(case.T, H)
    kwargs = dict(gate_up_bias=b1, down_bias=b2, lora=lora, activation=case.activation, interleaved=case.interleaved)
    return (x, ids, w, gate_up, down), kwargs, grad_out


def differentiable(args, kwargs):
    x, _, w, *_ = args
    lora = kwargs["lora"]
    names = ["x", "topk_weights"]
    tensors = [x, w]
    if lora is not None:
        for name, f in zip(("A_gate_up", "B_gate_up", "A_down", "B_down"), lora.factors()):
            if f is not None:
                names.append(name)
                tensors.append(f)
    return names, tensors


def rel_err(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||got - ref|| / ||ref|| (or / ||scale|| where the values' own size is not the right yardstick)."""
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values"
    denom = (ref if scale is None else scale.double()).norm().clamp_min(1e-30)
    return ((got - ref).norm() / denom).item()
