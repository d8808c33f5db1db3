"""The cross-entropy kernel against a float64 reference: per-row loss and the gradient written over the logits."""

from __future__ import annotations

import pytest
import torch

from moetune.experts.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    triton_backend.probe("cuda" if torch.cuda.is_available() else "cpu", 0 if torch.cuda.is_available() else None,
                         torch.float32) is not None,
    reason="no Triton that can run here",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
# The interpreter runs fp32 and fp16 only; bf16 on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# (loss, gradient) absolute tolerances. Losses (~10) are fp32 sums either way: ~1e-6 seen. The gradient is
# rounded to the logits' dtype, entries in [-1, 1]: half an ulp at 1 (fp16 2^-11, bf16 2^-8).
TOL = {torch.float32: (2e-5, 1e-6), torch.float16: (2e-5, 2**-11), torch.bfloat16: (2e-5, 2**-8)}


def reference(logits, targets, scale):
    """float64 (loss [N], scaled gradient [N, V]) of the same (rounded) logits."""
    x = logits.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x, targets, ignore_index=IGNORE, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum() * scale, x)
    return loss.detach(), grad


def run(logits, targets, scale=1.0, compute_grad=True, block_v=0):
    from moetune.kernels.cross_entropy import cross_entropy_

    out = logits.clone()
    loss = cross_entropy_(out, targets, IGNORE, scale, compute_grad, block_v)
    return loss, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_rows, vocab, block_v",
    [
        (1, 1000, 0),      # n = 1, one block wider than V (1024)
        (6, 1000, 256),    # V not a multiple of the block: 3 full blocks and a 232-column tail
        (9, 4099, 1024),   # prime-ish V, 1-column tail block
        (4, 4099, 0),      # default block (8192), V far below it
        (3, 5, 4),         # tiny V, tail of one
    ],
)
def test_loss_and_gradient_match_float64(dtype, num_rows, vocab, block_v):
    gen = torch.Generator().manual_seed(num_rows * vocab)
    logits = (3 * torch.randn(num_rows, vocab, generator=gen)).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen).to(DEVICE)
    if num_rows > 2:
        targets[num_rows // 2] = IGNORE  # an ignored row between scored ones
    targets[0] = vocab - 1  # the last column: in the tail block
    loss, grad = run(logits, targets, scale=0.37, block_v=block_v)
    ref_loss, ref_grad = reference(logits, targets, 0.37)
    tol_loss, tol_grad = TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, atol=tol_loss, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol_grad, rtol=0)
    if num_rows > 2:
        assert loss[num_rows // 2] == 0 and not grad[num_rows // 2].any()


def test_all_rows_ignored_give_zero_loss_and_zero_gradient():
    logits = torch.randn(4, 300, device=DEVICE)
    loss, grad = run(logits, torch.full((4,), IGNORE, device=DEVICE), block_v=128)
    assert not loss.any() and not grad.any()


def test_loss_only_leaves_the_logits_alone():
    logits = torch.randn(3, 700, device=DEVICE)
    targets = torch.tensor([5, IGNORE, 699], device=DEVICE)
    loss, out = run(logits, targets, compute_grad=False, block_v=256)
    assert torch.equal(out, logits)
    torch.testing.assert_close(loss.double(), reference(logits, targets, 1.0)[0], atol=2e-5, rtol=0)


def test_row_stride_wider_than_the_vocabulary():
    """A column slice of a wider buffer: rows are contiguous but stride(0) > V; the pad columns stay untouched."""
    buf = torch.randn(5, 520, device=DEVICE)
    logits = buf[:, :500]
    targets = torch.tensor([0, 499, IGNORE, 250, 3], device=DEVICE)
    ref_loss, ref_grad = reference(logits, targets, 1.0)
    pad = buf[:, 500:].clone()

    from moetune.kernels.cross_entropy import cross_entropy_

    loss = cross_entropy_(logits, targets, IGNORE, 1.0, True, 128)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=0)
    torch.testing.assert_close(logits.double(), ref_grad, atol=1e-6, rtol=0)
    assert torch.equal(buf[:, 500:], pad)


def test_target_out_of_range_is_nan_not_a_bad_read():
    loss, _ = run(torch.randn(2, 64, device=DEVICE), torch.tensor([64, 3], device=DEVICE))
    assert loss[0].isnan() and loss[1].isfinite()


def test_rejects_bad_layouts():
    from moetune.kernels.cross_entropy import cross_entropy_

    with pytest.raises(ValueError, match="logits: expected a 2-D tensor with contiguous rows"):
        cross_entropy_(torch.randn(8, 4, device=DEVICE).t(), torch.zeros(4, dtype=torch.long, device=DEVICE), IGNORE,
                       1.0, True, 0)
    with pytest.raises(ValueError, match="targets: expected int64 of shape"):
        cross_entropy_(torch.randn(4, 8, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE), IGNORE,
                       1.0, True, 0)


def test_custom_op_registration():
    """Schema (logits mutated), fake implementation and dispatch agree: what torch.compile relies on."""
    from moetune.kernels.cross_entropy import cross_entropy_

    args = (torch.randn(3, 40, device=DEVICE), torch.tensor([1, IGNORE, 39], device=DEVICE), IGNORE, 0.5, True, 16)
    torch.library.opcheck(cross_entropy_, args, test_utils=("test_schema", "test_faketensor"))


def test_rows_that_overlap_in_memory_are_refused():
    from moetune.kernels.cross_entropy import cross_entropy_

    row = torch.randn(37, device=DEVICE)
    targets = torch.tensor([0, 5, 9, 36], device=DEVICE)
    with pytest.raises(ValueError, match=r"^logits: rows overlap in memory \(row stride 0 < 37 columns\)"):
        cross_entropy_(row.expand(4, 37), targets, IGNORE, 1.0, True, 0)
    # The loss alone writes nothing back: taken.
    loss = cross_entropy_(row.expand(4, 37), targets, IGNORE, 1.0, False, 0)
    want, _ = reference(row.expand(4, 37), targets, 1.0)
    assert torch.allclose(loss.double().cpu(), want.cpu(), atol=1e-5)
