"""linear_cross_entropy / causal_lm_loss against float64 F.cross_entropy on full logits, and transformers' loss.

Each test that takes `path` runs twice: through the Triton kernel (forced onto Triton's interpreter on CPU, where
it is never chosen by itself) and through the torch path (what CPU uses).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetune import linear_cross_entropy as lce
from moetune.linear_cross_entropy import causal_lm_loss, linear_cross_entropy

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE_KEY = ("cuda", 0) if torch.cuda.is_available() else ("cpu", None)
B, S, H, V = 3, 13, 24, 1000  # N = 39 rows, prime: no chunk size below divides it
# Relative errors vs float64 (loss, input gradients). fp32: ~5e-7 seen. fp16 / bf16: the logits and the gradient
# rows are rounded to the dtype before the GEMMs (as in transformers): 3.4e-4 / 2.6e-3 seen (seeds 0-3), under
# one unit roundoff (2^-11 / 2^-8); the bounds are two.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "kernel":
        force_kernel(monkeypatch)
    else:
        monkeypatch.setattr(lce, "_use_triton", lambda device, dtype: False)
    return request.param


def force_kernel(monkeypatch):
    """The Triton kernel wherever it can run at all (on CPU: Triton's interpreter, fp32 and fp16)."""
    from moetune.experts.backends.triton import probe

    if probe(*DEVICE_KEY, torch.float32) is not None:
        pytest.skip("no Triton that can run here")
    monkeypatch.setattr(lce, "_use_triton", lambda device, dtype: probe(device.type, device.index, dtype) is None)


def problem(dtype=torch.float32, weight_grad=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(DEVICE, dtype).requires_grad_(weight_grad)
    b = (0.1 * torch.randn(V, generator=gen)).to(DEVICE, dtype).requires_grad_(weight_grad) if bias else None
    labels = torch.randint(0, V, (B, S), generator=gen).to(DEVICE)
    labels[0, :4] = IGNORE  # a prompt
    labels[1, 6] = IGNORE  # one in the middle
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, reduction, num_items=None):
    """float64 loss and gradients of everything that requires grad, with the shift written as logits[:, :-1]."""
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    copies = {id(t): t.detach().double().requires_grad_() for t in inputs}
    h, w = copies.get(id(hidden), hidden.double()), copies.get(id(weight), weight.double())
    b = None if bias is None else copies.get(id(bias), bias.double())
    logits = F.linear(h, w, b)[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction="sum" if num_items is not None else reduction)
    if num_items is not None:
        loss = loss / num_items
    grads = torch.autograd.grad(loss, [copies[id(t)] for t in inputs]) if inputs else ()
    return loss.detach(), grads, inputs


def relative_error(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "reduction, num_items",
    [("mean", None), ("sum", None), ("mean", 29), ("mean", torch.tensor(29))],  # 29: a count from a larger batch
)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])  # one chunk; a chunk per row; 7 does not divide 39
def test_matches_float64_cross_entropy_on_shifted_labels(path, reduction, num_items, chunk_size):
    hidden, weight, _, labels = problem(weight_grad=chunk_size == 7)
    ref, ref_grads, inputs = reference(hidden, weight, None, labels, reduction, num_items)
    if reduction == "sum":  # the shifted targets written out, through linear_cross_entropy itself
        targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        loss = linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk_size=chunk_size)
    else:
        loss = causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert relative_error(loss, ref) < TOL[torch.float32]
    for got, want in zip(torch.autograd.grad(loss, inputs), ref_grads):
        assert relative_error(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # on CPU: fp16 on the kernel, bf16 on torch
def test_half_precision(dtype, monkeypatch):
    force_kernel(monkeypatch)
    hidden, weight, bias, labels = problem(dtype, weight_grad=True, bias=True)
    ref, ref_grads, inputs = reference(hidden, weight, bias, labels, "mean")
    loss = causal_lm_loss(hidden, weight, labels, bias=bias, chunk_size=10)
    assert loss.dtype == torch.float32
    assert relative_error(loss, ref) < TOL[dtype]
    grads = torch.autograd.grad(loss, inputs)
    assert [g.dtype for g in grads] == [dtype] * 3
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < TOL[dtype]


def test_matches_transformers_for_causal_lm_loss(path):
    """transformers' own loss (fp32 upcast, pad-shift, shift_labels, num_items_in_batch) on the real logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, bias, labels = problem(weight_grad=True, bias=True)
    shifted = torch.roll(labels, -1, dims=1)  # pre-shifted labels (context parallelism passes these)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(17)}, {"shift_labels": shifted}):
        want = ForCausalLMLoss(F.linear(hidden, weight, bias), labels, V, **kwargs)
        got = causal_lm_loss(hidden, weight, labels, bias=bias, chunk_size=8, **kwargs)
        assert relative_error(got, want.double()) < 1e-6
        for g, w in zip(torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(want, (hidden, weight, bias))):
            assert relative_error(g, w.double()) < TOL[torch.float32]


def test_one_row_and_all_ignored(path):
    hidden, weight, _, _ = problem()
    one = hidden[:1, :1]
    loss = linear_cross_entropy(one, weight, torch.tensor([[7]]))  # labels on the CPU: moved like transformers'
    (grad,) = torch.autograd.grad(loss, one)
    ref = F.cross_entropy(F.linear(one.double(), weight.double()).reshape(1, V), torch.tensor([7], device=DEVICE))
    assert relative_error(loss, ref) < TOL[torch.float32]
    assert grad.shape == one.shape

    ignored = torch.full((B, S), IGNORE, device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, ignored, reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    assert loss == 0 and not grad.any()
    # mean over nothing is 0/0, as in F.cross_entropy and transformers
    assert linear_cross_entropy(hidden, weight, ignored).isnan()


@pytest.mark.parametrize("num_items", [None, 0, "tensor"])
def test_all_ignored_mean_has_zero_gradients(path, num_items):
    """Every label ignored (a completion cut off by truncation): the mean is NaN, as in F.cross_entropy and
    transformers, but the gradients are 0 there too, not NaN, so one such micro-batch cannot poison an accumulated
    step. The saved gradients must not be multiplied by 1/0."""
    hidden, weight, _, _ = problem(weight_grad=True)
    ignored = torch.full((B, S), IGNORE, device=DEVICE)
    items = torch.tensor(0, device=DEVICE) if num_items == "tensor" else num_items
    loss = linear_cross_entropy(hidden, weight, ignored, num_items_in_batch=items)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    ref = F.cross_entropy(F.linear(hidden, weight).reshape(-1, V).float(), ignored.reshape(-1))
    ref_hidden, ref_weight = torch.autograd.grad(ref, [hidden, weight])
    assert loss.isnan() and ref.isnan()
    assert not grad_hidden.isnan().any() and not grad_hidden.any() and not ref_hidden.any()
    assert not grad_weight.isnan().any() and not grad_weight.any() and not ref_weight.any()


def test_fp16_weight_gradient_sums_chunks_in_fp32(path):
    """A trainable fp16 weight: one chunk's grad_weight sums the unscaled logits gradient over its rows (here 4096 rows
    of ~20 each toward one class: ~-8e4, past fp16's 65504), which must not overflow before the mean's 1/count."""
    gen = torch.Generator().manual_seed(0)
    hidden = (20 + torch.rand(4096, 8, generator=gen)).to(DEVICE, torch.float16).requires_grad_()
    weight = (0.01 * torch.randn(16, 8, generator=gen)).to(DEVICE, torch.float16).requires_grad_()
    targets = torch.zeros(4096, dtype=torch.long, device=DEVICE)
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), weight)
    h64, w64 = hidden.detach().double(), weight.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(h64 @ w64.t(), targets), w64)
    assert grad.isfinite().all()
    assert relative_error(grad, ref) < 2 * TOL[torch.float16]


def test_without_grad_only_the_loss():
    hidden, weight, _, labels = problem()
    with torch.no_grad():
        loss = causal_lm_loss(hidden, weight, labels)
    assert not loss.requires_grad
    assert relative_error(loss, reference(hidden.detach(), weight, None, labels, "mean")[0]) < TOL[torch.float32]
    assert relative_error(causal_lm_loss(hidden.detach(), weight, labels), loss) < 1e-7  # nothing requires grad


def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, _, labels = problem(weight_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = causal_lm_loss(hidden, weight, labels)
        want = F.cross_entropy(F.linear(hidden[:, :-1], weight).float().reshape(-1, V), labels[:, 1:].reshape(-1))
    assert relative_error(got, want.double()) < 1e-6  # same bf16 logits, fp32 softmax: 7e-8 seen
    for g, w in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        assert g.dtype == w.dtype == torch.float32
        assert relative_error(g, w.double()) < TOL[torch.bfloat16]


def test_backward_runs_once():
    hidden, weight, _, labels = problem()
    loss = causal_lm_loss(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_chunk_rows_bounds_the_logits_chunk():
    assert lce.chunk_rows(151936, torch.bfloat16) == 883  # 256 MiB / (151936 * 2 bytes)
    assert lce.chunk_rows(151936, torch.float32) == 441
    assert lce.chunk_rows(2**40, torch.float32) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": torch.zeros(V, H + 1)}, r"weight: expected \[V, 24\]"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, "targets: expected 39 integer class ids"),
        ({"targets": torch.zeros(B, S)}, "targets: expected 39 integer class ids"),
        ({"bias": torch.zeros(V - 1)}, r"bias: expected \[1000\]"),
        ({"reduction": "none"}, "reduction: expected one of mean, sum, got 'none'"),
        ({"reduction": "sum", "num_items_in_batch": 3}, "num_items_in_batch: divides a 'mean'"),
        ({"chunk_size": 0}, "chunk_size: expected an integer >= 1"),
        ({"weight": torch.zeros(V, H, dtype=torch.float16)}, "weight: expected dtype torch.float32"),
        ({"targets": torch.full((B, S), V)}, r"targets: expected class ids in \[0, 1000\) or ignore_index -100, got 1000"),
        ({"targets": torch.full((B, S), -5)}, r"targets: expected class ids in \[0, 1000\) .*got -5 \(39 of 39"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    args = {"hidden": torch.zeros(B, S, H), "weight": torch.zeros(V, H), "targets": torch.zeros(B, S, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)
