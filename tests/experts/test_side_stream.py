"""The triton backward's LoRA weight gradients on a second stream (moetune/experts/backends/side_stream.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from moetune.experts import available_backends, moe_experts
from moetune.experts.backends import side_stream
from moetune.experts.backends import triton as triton_backend

from .cases import Case, differentiable, make_problem
from .test_moe_experts import CASES, check_against_reference


def test_off_a_gpu_the_side_stream_is_the_callers():
    side = side_stream.SideStream(torch.zeros(1))
    assert not side.enabled
    with side.work():
        pass
    side.join()
    assert not side.forked


class _Recorder:
    """Stands in for SideStream: notes which kernel launches a backward issues inside work()."""

    def __init__(self, log):
        self.log = log

    def __call__(self, reference, enabled=True):
        self.log.append(("side stream", enabled))
        return self

    def mark(self):
        return None

    @contextlib.contextmanager
    def work(self, after=None):
        self.log.append("fork")
        yield
        self.log.append("back")

    def join(self):
        self.log.append("join")


@pytest.mark.parametrize("case_id", ["typical", "lora_down_only", "lora_gate_up_only", "no_lora"])
def test_every_lora_weight_gradient_and_nothing_else_is_issued_on_the_side_stream(case_id, monkeypatch):
    if "triton" not in available_backends("cpu", torch.float32):
        pytest.skip("no Triton that can run here")
    from moetune import kernels

    log = []
    monkeypatch.setattr(side_stream, "SideStream", _Recorder(log))
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    for name in ("grouped_gemm", "grouped_wgrad"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, _n=name, **kw: log.append(_n) or _k(*a, **kw))
    case = CASES[case_id]
    (x, ids, w, gate_up, down), kwargs, grad_out = make_problem(case, torch.float32)
    out = moe_experts(x, ids, w, gate_up, down, **kwargs, backend="triton")
    del log[:]
    out.backward(grad_out)

    assert ("side stream", True) in log and log[-1] == "join"
    inside, launches_inside, launches_outside = False, [], []
    for entry in log[:-1]:
        if entry in ("fork", "back"):
            inside = entry == "fork"
        elif entry in ("grouped_gemm", "grouped_wgrad"):
            (launches_inside if inside else launches_outside).append(entry)
    wgrads = {"typical": 4, "lora_down_only": 2, "lora_gate_up_only": 2, "no_lora": 0}[case_id]
    assert launches_inside == ["grouped_wgrad"] * wgrads
    assert "grouped_wgrad" not in launches_outside and "grouped_gemm" in launches_outside
    if case_id in ("typical", "lora_gate_up_only"):  # dA1 reads sv1, which the dx GEMM writes: issued after it
        last_fork = len(log) - 1 - log[::-1].index("fork")
        assert "grouped_gemm" in log[1:last_fork][-3:]


@pytest.mark.parametrize("case_id", ["typical", "T=1", "one_expert_takes_all", "lora_gate_up_only"])
def test_triton_on_one_stream_matches_float64_too(case_id, monkeypatch):
    """WGRAD_SIDE_STREAM off (switch_ab.py's other way): every launch on the block's stream."""
    if "triton" not in available_backends("cpu", torch.float32):
        pytest.skip("no Triton that can run here")
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", False)
    check_against_reference(CASES[case_id], torch.float32, "triton")


@pytest.mark.parametrize("case_id", ["typical", "one_expert_takes_all", "lora_down_only"])
def test_triton_with_those_issued_after_the_dx_gemm_matches_float64(case_id, monkeypatch):
    """WGRAD_AFTER_DX (switch_ab.py's wgrad_order): dB2, dA2 and dB1 issued after the dx GEMM."""
    if "triton" not in available_backends("cpu", torch.float32):
        pytest.skip("no Triton that can run here")
    monkeypatch.setattr(triton_backend, "WGRAD_AFTER_DX", True)
    check_against_reference(CASES[case_id], torch.float32, "triton")


def _gpu_triton():
    if not torch.cuda.is_available() or "triton" not in available_backends("cuda", torch.bfloat16):
        pytest.skip("needs a CUDA GPU with the triton backend")


@pytest.mark.gpu
def test_join_orders_the_callers_stream_after_the_side_streams_work():
    _gpu_triton()
    main = torch.cuda.current_stream()
    target = torch.zeros(1 << 20, device="cuda")
    side = side_stream.SideStream(target)
    with side.work():
        assert torch.cuda.current_stream() != main
        torch.cuda._sleep(50_000_000)  # ~tens of ms: long past the host's next launches
        target.fill_(1.0)
    assert torch.cuda.current_stream() == main
    side.join()
    seen = target.sum()  # on the caller's stream, after the join
    assert seen.item() == target.numel()


GPU_CASE = Case(E=16, k=4, H=512, I=256, r=16, T=1000, routing="half")


def _grads(problem):
    (x, ids, w, gate_up, down), kwargs, grad_out = problem
    names, inputs = differentiable((x, ids, w, gate_up, down), kwargs)
    out = moe_experts(x, ids, w, gate_up, down, **kwargs, backend="triton")
    return [out.detach().clone()] + [g.clone() for g in torch.autograd.grad(out, inputs, grad_out)]


@pytest.mark.gpu
def test_side_stream_gives_the_same_bits_as_one_stream_on_gpu(monkeypatch):
    _gpu_triton()
    problem = make_problem(GPU_CASE, torch.bfloat16, device="cuda", seed=3)
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", False)
    one = _grads(problem)
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    for after_dx in (False, True, False, True):
        monkeypatch.setattr(triton_backend, "WGRAD_AFTER_DX", after_dx)
        two = _grads(problem)
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.gpu
@pytest.mark.parametrize("after_dx", [False, True], ids=["before_dx", "after_dx"])
def test_the_side_stream_waits_for_what_it_reads_on_gpu(after_dx, monkeypatch):
    """Every GEMM launch of the block's stream held back by a sleep: a wgrad launch that did not wait for the
    launch writing its input (d_gu, sv2, sv1) would read the memory's stale contents, here another problem's."""
    _gpu_triton()
    from moetune import kernels

    problem, other = (make_problem(GPU_CASE, torch.bfloat16, device="cuda", seed=seed) for seed in (6, 7))
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", False)
    one = _grads(problem)
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    monkeypatch.setattr(triton_backend, "WGRAD_AFTER_DX", after_dx)
    gemm = kernels.grouped_gemm
    monkeypatch.setattr(kernels, "grouped_gemm", lambda *a, **kw: torch.cuda._sleep(20_000_000) or gemm(*a, **kw))
    for _ in range(2):
        _grads(other)
        two = _grads(problem)
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.gpu
@pytest.mark.parametrize("after_dx", [False, True], ids=["before_dx", "after_dx"])
def test_side_stream_inside_a_captured_cuda_graph(after_dx, monkeypatch):
    """The fork and join inside a capture: the replay gives the eager step's bits, with new inputs copied in."""
    _gpu_triton()
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    monkeypatch.setattr(triton_backend, "WGRAD_AFTER_DX", after_dx)
    problem = make_problem(GPU_CASE, torch.bfloat16, device="cuda", seed=4)
    (x, ids, w, gate_up, down), kwargs, grad_out = problem
    names, inputs = differentiable((x, ids, w, gate_up, down), kwargs)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(2):
            _grads(problem)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, ids, w, gate_up, down, **kwargs, backend="triton")
        captured = torch.autograd.grad(out, inputs, grad_out)
    fresh = make_problem(GPU_CASE, torch.bfloat16, device="cuda", seed=5)
    (x2, ids2, w2, *_), kwargs2, grad_out2 = fresh
    with torch.no_grad():
        x.copy_(x2), ids.copy_(ids2), w.copy_(w2), grad_out.copy_(grad_out2)
        for mine, theirs in zip(kwargs["lora"].factors(), kwargs2["lora"].factors()):
            mine.copy_(theirs)
    graph.replay()
    torch.cuda.synchronize()
    eager = _grads(problem)
    assert torch.equal(out, eager[0])
    assert all(torch.equal(a, b) for a, b in zip(captured, eager[1:]))
