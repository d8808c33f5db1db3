"""The triton backward's LoRA weight gradients on a second stream (moetune/experts/backends/side_stream.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import pytest
import torch

from moetune.experts import available_backends, moe_experts
from moetune.experts.backends import side_stream
from moetune.experts.backends import triton as triton_backend

from .cases import Case, differentiable, make_problem
from .test_moe_experts import CASES


def test_off_a_gpu_the_side_stream_is_the_callers():
    side = side_stream.SideStream(torch.zeros(1))
    assert not side.enabled
    with side.work():
        pass
    side.join()
    assert not side.forked


class _Recorder:
    """Stands in for SideStream: notes the forks and the join among a backward's launches."""

    def __init__(self, log):
        self.log = log

    def __call__(self, reference, enabled=True):
        self.log.append(("side stream", enabled))
        return self

    @contextlib.contextmanager
    def work(self):
        self.log.append("fork")
        yield
        self.log.append("back")

    def join(self):
        self.log.append("join")


WGRADS = {"typical": ["dB2", "dA2", "dB1", "dA1"], "lora_down_only": ["dB2", "dA2"],
          "lora_gate_up_only": ["dB1", "dA1"], "no_lora": []}


@pytest.mark.parametrize("case_id", list(WGRADS))
def test_every_lora_weight_gradient_and_nothing_else_is_issued_on_the_side_stream(case_id, monkeypatch):
    """The order a backward issues its work in and each launch's stream: the first three wgrad launches prepared
    (allocated, tuned) on the block's stream after the down projection's backward, then forked; dA1 forked after the
    dx GEMM (which writes sv1); no GEMM on the side stream."""
    if "triton" not in available_backends("cpu", torch.float32):
        pytest.skip("no Triton that can run here")
    from moetune import kernels

    log = []
    monkeypatch.setattr(side_stream, "SideStream", _Recorder(log))
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    grouped_wgrad = importlib.import_module("moetune.kernels.grouped_wgrad")  # (the package's name is the function)
    kernel = kernels.grouped_gemm
    monkeypatch.setattr(kernels, "grouped_gemm", lambda *a, **kw: log.append("gemm") or kernel(*a, **kw))
    prepare = grouped_wgrad.wgrad_launch

    def wgrad_launch(a, b, offsets_E, **kw):  # named by its operands' shapes, logged where prepared and where run
        name = {(32, 8): "dB2", (8, 48): "dA2", (48, 8): "dB1", (8, 32): "dA1"}[(a.shape[1], b.shape[1])]
        log.append(("prepare", name))
        launch = prepare(a, b, offsets_E, **kw)
        return lambda: log.append(name) or launch()

    monkeypatch.setattr(grouped_wgrad, "wgrad_launch", wgrad_launch)
    case = CASES[case_id]  # (typical: H=32, I=24, r=8)
    if case_id != "typical":
        case = dataclasses.replace(CASES["typical"], lora_parts=case.lora_parts, r=None if case.r is None else 8)
    (x, ids, w, gate_up, down), kwargs, grad_out = make_problem(case, torch.float32)
    out = moe_experts(x, ids, w, gate_up, down, **kwargs, backend="triton")
    del log[:]
    out.backward(grad_out)

    wgrads = WGRADS[case_id]
    first, dA1 = [n for n in wgrads if n != "dA1"], "dA1" in wgrads
    gemms = [i for i, entry in enumerate(log) if entry == "gemm"]  # the down backward, (sv1,) the dx GEMM
    forks = [i for i, entry in enumerate(log) if entry == "fork"]
    assert gemms[0] < forks[0] < gemms[-1] and log[-1] == "join"
    assert [e[1] for e in log[:forks[0]] if isinstance(e, tuple) and e[0] == "prepare"] == first
    on_side, inside = [], False
    for i, entry in enumerate(log):
        if entry in ("fork", "back"):
            inside = entry == "fork"
        elif entry in ("dB2", "dA2", "dB1", "dA1"):
            on_side.append((entry, inside, i > gemms[-1]))
        elif entry == "gemm":
            assert not inside
    assert on_side == [(name, True, False) for name in first] + [("dA1", True, True)] * dA1


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
    for _ in range(3):
        two = _grads(problem)
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.gpu
def test_the_side_stream_waits_for_what_it_reads_on_gpu(monkeypatch):
    """Every GEMM launch of the block's stream held back by a sleep: a wgrad launch that did not wait for the
    launch writing its input (d_gu, sv2, sv1) would read the memory's stale contents, here another problem's."""
    _gpu_triton()
    from moetune import kernels

    problem, other = (make_problem(GPU_CASE, torch.bfloat16, device="cuda", seed=seed) for seed in (6, 7))
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", False)
    one = _grads(problem)
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
    gemm = kernels.grouped_gemm
    monkeypatch.setattr(kernels, "grouped_gemm", lambda *a, **kw: torch.cuda._sleep(20_000_000) or gemm(*a, **kw))
    for _ in range(2):
        _grads(other)
        two = _grads(problem)
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.gpu
def test_side_stream_inside_a_captured_cuda_graph(monkeypatch):
    """The fork and join inside a capture: the replay gives the eager step's bits, with new inputs copied in."""
    _gpu_triton()
    monkeypatch.setattr(triton_backend, "WGRAD_SIDE_STREAM", True)
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
