"""Backend registry: availability, automatic choice, forcing by argument or environment."""

from __future__ import annotations

import pytest
import torch

from moetune.experts import available_backends, moe_experts, select_backend
from moetune.experts.backends import grouped_mm as grouped_mm_backend
from moetune.experts.backends import triton as triton_backend


def test_cpu_backends_fastest_first():
    # conftest sets TRITON_INTERPRET=1 without a GPU: the kernels run (slowly) for tests,
    # given a Triton whose interpreter can run them.
    interpreter = ["triton"] if triton_backend.probe("cpu", None, torch.float32) is None else []
    assert available_backends("cpu", torch.float32) == ["grouped_mm", "native", *interpreter]
    # the interpreter is unreliable in bf16; grouped_mm has no float64 kernel.
    assert available_backends("cpu", torch.bfloat16) == ["grouped_mm", "native"]
    assert available_backends("cpu", torch.float64) == ["native"]


def test_triton_never_chosen_on_cpu_and_says_why_it_cannot_run(monkeypatch):
    assert select_backend("cpu", torch.float32) == "grouped_mm"
    with pytest.raises(ValueError, match="backend: 'triton' cannot run on cpu with torch.bfloat16: the Triton"):
        select_backend("cpu", torch.bfloat16, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in triton_backend.probe.__wrapped__("cpu", None, torch.float32)


def test_automatic_choice_explains_itself():
    name, why = select_backend("cpu", torch.float64, explain=True)
    assert name == "native"
    assert "grouped_mm" in why and "float64" in why.lower()
    assert select_backend("cpu", torch.float32) == "grouped_mm"


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "native")
    name, why = select_backend("cpu", torch.float32, explain=True)
    assert name == "native" and "MOETUNE_MOE_BACKEND=native" in why
    # The argument wins over the environment.
    assert select_backend("cpu", torch.float32, backend="grouped_mm") == "grouped_mm"


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_environment_value_means_automatic(monkeypatch, blank):
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", blank)
    monkeypatch.delenv("MOETUNE_MOE_BACKEND")
    automatic = select_backend(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", blank)
    assert select_backend(torch.device("cpu"), torch.float32) == automatic


def test_environment_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "grouped_mm")
    with pytest.raises(ValueError, match="MOETUNE_MOE_BACKEND: 'grouped_mm' cannot run on cpu with torch.float64"):
        select_backend("cpu", torch.float64)


def test_environment_reaches_moe_experts(monkeypatch):
    """MOETUNE_MOE_BACKEND is honoured by moe_experts itself, not only by select_backend."""
    calls = []
    real = grouped_mm_backend.GroupedExpertsFunction.apply
    monkeypatch.setattr(grouped_mm_backend.GroupedExpertsFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x, ids, w = torch.randn(3, 16), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    W1, W2 = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "native")
    moe_experts(x, ids, w, W1, W2)
    assert calls == []
    monkeypatch.setenv("MOETUNE_MOE_BACKEND", "grouped_mm")
    moe_experts(x, ids, w, W1, W2)
    assert calls == [1]


def test_cuda_choice_by_problem_size(monkeypatch):
    """On CUDA triton is chosen from TRITON_MIN_GEMM_SIZE (rows x hidden x expert width, measured), grouped_mm below."""
    from moetune.experts import backends

    monkeypatch.setattr(backends, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(backends, "_unavailable", lambda name, device, dtype: None)
    big, small = backends.TRITON_MIN_GEMM_SIZE, backends.TRITON_MIN_GEMM_SIZE - 1
    assert select_backend("cuda", torch.bfloat16, gemm_size=big) == "triton"
    name, why = select_backend("cuda", torch.bfloat16, gemm_size=small, explain=True)
    assert name == "grouped_mm" and "as fast or faster below" in why
    qwen3 = lambda tokens: tokens * 8 * 2048 * 768  # noqa: E731
    gpt_oss = lambda tokens: tokens * 4 * 2880 * 2880  # noqa: E731
    assert select_backend("cuda", torch.bfloat16, gemm_size=qwen3(4096)) == "grouped_mm"
    assert select_backend("cuda", torch.bfloat16, gemm_size=qwen3(8192)) == "triton"
    assert select_backend("cuda", torch.bfloat16, gemm_size=gpt_oss(4096)) == "triton"
    assert select_backend("cuda", torch.bfloat16) == "triton"  # size unknown: the large-problem choice


def test_moe_experts_passes_its_projection_size(monkeypatch):
    """moe_experts asks for a backend with rows x hidden x expert width of its own call."""
    from moetune.experts import api

    seen = []

    def record(device, dtype, *, backend=None, gemm_size=None):
        seen.append(gemm_size)
        return "native"

    monkeypatch.setattr(api, "select_backend", record)
    T, H, I, E, k = 5, 12, 6, 4, 2
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, k))
    moe_experts(x, ids, torch.rand(T, k), torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    assert seen == [T * k * H * I]


@pytest.mark.parametrize("device", ["cdua", "cuda:x", 5.0])
def test_bad_device_string_is_one_line(device):
    with pytest.raises(ValueError, match=r"device: expected a torch device such as 'cpu' or 'cuda:0', got "):
        select_backend(device)


def test_missing_gpu_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device: expected a device this machine has, got cuda:3 but it has 1 CUDA"):
        select_backend("cuda:3")
