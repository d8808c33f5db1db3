"""Bad input: a ValueError that names the argument and what was expected, never a wrong answer."""

from __future__ import annotations

import pytest
import torch

from moetune.experts import ExpertLoRA, moe_experts

E, H, I, T, K, R = 4, 16, 8, 5, 2, 4


def good():
    args = dict(
        x=torch.randn(T, H),
        topk_ids=torch.randint(0, E, (T, K)),
        topk_weights=torch.rand(T, K),
        gate_up=torch.randn(E, 2 * I, H),
        down=torch.randn(E, H, I),
    )
    lora = ExpertLoRA.init(E, H, I, R)
    return args, lora


def call(args, **kw):
    args = dict(args)
    return moe_experts(args.pop("x"), args.pop("topk_ids"), args.pop("topk_weights"), args.pop("gate_up"), args.pop("down"), **kw)


BAD = {
    # name: (mutation of the positional args, extra kwargs, words the message must contain)
    "x_1d": (lambda a: a.update(x=torch.randn(H)), {}, ["x", "[T, H]"]),
    "x_int": (lambda a: a.update(x=torch.ones(T, H, dtype=torch.long)), {}, ["x", "floating"]),
    "ids_float": (lambda a: a.update(topk_ids=torch.rand(T, K)), {}, ["topk_ids", "integer"]),
    "ids_rows": (lambda a: a.update(topk_ids=torch.randint(0, E, (T + 1, K))), {}, ["topk_ids", "[T, k]"]),
    "ids_too_big": (lambda a: a["topk_ids"].__setitem__((0, 0), E), {}, ["topk_ids", f"[0, {E - 1}]"]),
    "ids_negative": (lambda a: a["topk_ids"].__setitem__((1, 1), -1), {}, ["topk_ids", f"[0, {E - 1}]"]),
    "weights_shape": (lambda a: a.update(topk_weights=torch.rand(T, K + 1)), {}, ["topk_weights", "[T, k]", f"[{T}, {K}]"]),
    "weights_int": (lambda a: a.update(topk_weights=torch.ones(T, K, dtype=torch.long)), {}, ["topk_weights", "floating"]),
    "gate_up_H": (lambda a: a.update(gate_up=torch.randn(E, 2 * I, H + 1)), {}, ["gate_up", "[E, 2I, H]"]),
    "gate_up_odd": (lambda a: a.update(gate_up=torch.randn(E, 2 * I + 1, H)), {}, ["gate_up", "even"]),
    "down_shape": (lambda a: a.update(down=torch.randn(E, H, I + 1)), {}, ["down", "[E, H, I]", f"[{E}, {H}, {I}]"]),
    "down_experts": (lambda a: a.update(down=torch.randn(E + 1, H, I)), {}, ["down", "[E, H, I]"]),
    "dtype_mix": (lambda a: a.update(down=torch.randn(E, H, I, dtype=torch.bfloat16)), {}, ["down", "dtype", "float32"]),
    "bias_shape": (lambda a: None, {"gate_up_bias": torch.randn(E, I)}, ["gate_up_bias", "[E, 2I]"]),
    "bias_dtype": (lambda a: None, {"down_bias": torch.randn(E, H, dtype=torch.float64)}, ["down_bias", "dtype"]),
    "activation": (lambda a: None, {"activation": "relu"}, ["activation", "swiglu"]),
    "backend": (lambda a: None, {"backend": "cutlass"}, ["backend", "native", "grouped_mm", "triton"]),
    "backend_cannot_run": (lambda a: a.update(x=a["x"].double(), gate_up=a["gate_up"].double(), down=a["down"].double()),
                           {"backend": "grouped_mm"}, ["backend", "grouped_mm", "cannot run", "float64"]),
    "interleaved": (lambda a: None, {"interleaved": "yes"}, ["interleaved"]),
    "lora_type": (lambda a: None, {"lora": {"A": 1}}, ["lora", "ExpertLoRA"]),
    "frozen_base": (lambda a: a["gate_up"].requires_grad_(), {}, ["gate_up", "requires_grad=False"]),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_the_argument(name):
    mutate, kwargs, words = BAD[name]
    args, _ = good()
    mutate(args)
    with pytest.raises(ValueError) as info:
        call(args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


LORA_BAD = {
    "A_shape": (dict(A_gate_up=torch.randn(E, R, H + 1)), ["lora.A_gate_up", "[E, r, H]"]),
    "B_shape": (dict(B_down=torch.randn(E, H, R + 1)), ["lora.B_down", "[E, H, r]"]),
    "B_experts": (dict(B_gate_up=torch.randn(E - 1, 2 * I, R)), ["lora.B_gate_up", "[E, 2I, r]"]),
    "half_pair": (dict(B_down=None), ["lora.A_down", "both"]),
    "rank_0": (dict(A_down=torch.randn(E, 0, I), B_down=torch.randn(E, H, 0)), ["lora.A_down", "r >= 1"]),
    "dtype_mix": (dict(A_down=torch.randn(E, R, I, dtype=torch.float64)), ["lora", "one dtype"]),
    "scaling": (dict(scaling=float("nan")), ["lora.scaling", "finite"]),
}


@pytest.mark.parametrize("name", LORA_BAD)
def test_bad_lora_names_the_factor(name):
    changes, words = LORA_BAD[name]
    args, lora = good()
    for field, value in changes.items():
        setattr(lora, field, value)
    with pytest.raises(ValueError) as info:
        call(args, lora=lora)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_bad_environment_variable(monkeypatch):
    args, _ = good()
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MOETUNE_MOE_BACKEND: expected one of native, grouped_mm, triton, got 'fastest'"):
        call(args)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank: expected an integer >= 1"):
        ExpertLoRA.init(E, H, I, 0)


@pytest.mark.parametrize("args, kwargs, message", [
    ((E, H, I, 2.5), {}, "rank: expected an integer >= 1, got 2.5"),
    ((E, H, I, "4"), {}, "rank: expected an integer >= 1, got '4'"),
    ((-1, H, I, 2), {}, "num_experts: expected an integer >= 1, got -1"),
    ((E, H, I, 2), {"alpha": 0}, "alpha: expected a finite number > 0"),
    ((E, H, I, 2), {"dtype": torch.int64}, "dtype: expected a floating dtype"),
])
def test_lora_init_names_a_bad_argument(args, kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        ExpertLoRA.init(*args, **kwargs)


def test_an_activation_of_another_type_is_named():
    from moetune.experts.activations import get_activation

    with pytest.raises(ValueError, match=r"^activation: expected one of .* got \['swiglu'\]"):
        get_activation(["swiglu"])
