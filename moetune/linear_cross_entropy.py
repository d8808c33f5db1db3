"""Linear + cross-entropy fused: the loss of `hidden @ weight.T` without ever holding the [N, V] logits.

    loss = linear_cross_entropy(hidden, weight, targets)       # == F.cross_entropy(F.linear(hidden, weight), targets)
    loss = causal_lm_loss(hidden, lm_head.weight, labels, num_items_in_batch=n)   # == transformers' ForCausalLMLoss

Shape legend: N rows (tokens), H hidden, V vocabulary, C rows per chunk.

Forward, chunk by chunk over the rows:
    logits_CV  = hidden_CH @ weight_VH^T (+ bias_V)       the GEMM of nn.Linear, in the input dtype
    loss_C, grad_CV = d loss_C / d logits_CV              kernels/cross_entropy.py (CUDA): fp32 inside, written
                                                          over logits_CV; elsewhere torch, a new chunk
    grad_hidden_NH[chunk] = grad_CV @ weight_VH
    grad_weight_VH += grad_CV^T @ hidden_CH               only when weight requires grad (fp32 sum); bias alike
The loss is the fp32 sum of the row losses, divided by the count of a mean; backward multiplies the gradients
saved in forward by the incoming gradient and 1/count, so no logits are kept or recomputed. A count of 0 (every
row ignored) gives a NaN loss and zero gradients, as F.cross_entropy does: the ignored rows' zero gradients are
never multiplied by 1/0.

Peak memory over the weights: one logits chunk (CHUNK_BYTES; the torch path adds its fp32 softmax) + grad_hidden
[N, H] (+ grad_weight). transformers'
path holds logits [N, V] in the model dtype, an fp32 copy, the fp32 log-softmax, and in backward an fp32 and a
model-dtype gradient of the same size.

Numerics follow transformers' ForCausalLMLoss (`logits.float()` then F.cross_entropy): logits rounded to the
model dtype, softmax and loss in fp32, the logits gradient rounded to the model dtype before the GEMMs. One
difference: the 1/count scale is applied to grad_hidden instead of to the logits gradient, which only avoids
an underflow in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_BYTES", "LinearCrossEntropyFunction", "causal_lm_loss", "chunk_rows", "linear_cross_entropy"]

# One chunk of logits in the compute dtype: 256 MiB is 883 rows of a 151936-token vocabulary in bf16, a chunk
# GEMM of [883, H] x [H, 151936], large enough to keep a GPU busy (Liger-Kernel sizes its chunks the same way,
# to about the size of the hidden states). Not swept on a GPU yet.
CHUNK_BYTES = 256 * 2**20
REDUCTIONS = ("mean", "sum")


def chunk_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk of logits [rows, vocab_size] takes at most CHUNK_BYTES (at least 1 row)."""
    return max(1, CHUNK_BYTES // (vocab_size * dtype.itemsize))


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """The Triton kernel on CUDA where it can run; the torch path elsewhere. As for the experts backends, Triton's
    CPU interpreter is never chosen (with it the demo run of `moetune train` went from ~9 s to minutes on 2 CPU
    cores); tests force it to check the kernel."""
    if device.type != "cuda":
        return False
    from .experts.backends.triton import probe

    return probe(device.type, device.index, dtype) is None


def _cross_entropy_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool):
    """The kernel's math in torch (CPU, or CUDA without a usable Triton): (per-row fp32 loss [N], with
    compute_grad softmax - onehot [N, V] in the logits' dtype, zero rows where ignored; else None)."""
    # log_softmax is one fused pass on CPU; logsumexp is several (amax, sub, exp, sum) and took 2x longer.
    log_probs = torch.log_softmax(logits.float(), dim=1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss = torch.where(valid, -log_probs.gather(1, safe[:, None]).squeeze(1), 0.0)
    if not compute_grad:
        return loss, None
    grad = log_probs.exp_()
    grad.scatter_add_(1, safe[:, None], -valid[:, None].to(grad.dtype))
    grad.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # ignored rows only (a host sync on CUDA)
    return loss, grad.to(logits.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum_rows cross_entropy(hidden_NH @ weight_VH^T + bias_V, targets_N) / divisor (None: the sum), its gradients
    computed in forward.

    Saved for backward: grad_hidden [N, H] in the compute dtype, grad_weight [V, H] and grad_bias [V] in fp32
    (only those whose input requires grad). Not saved: the logits, the hidden states. Nothing is recomputed.
    Backward scales the saved gradients in place, so it runs once (retain_graph is refused).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, ignore_index: int, rows_per_chunk: int,
                divisor: torch.Tensor | int | float | None = None):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_grad = need_hidden or need_weight or need_bias
        num_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        use_triton = _use_triton(hidden_NH.device, hidden_NH.dtype)
        if use_triton:
            from .kernels.cross_entropy import cross_entropy_

        loss_N = torch.empty(num_rows, device=hidden_NH.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden_NH) if need_hidden else None
        grad_weight = torch.zeros(weight_VH.shape, device=weight_VH.device, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(vocab, device=weight_VH.device, dtype=torch.float32) if need_bias else None
        logits_buf = hidden_NH.new_empty(min(rows_per_chunk, num_rows), vocab)
        for start in range(0, num_rows, rows_per_chunk):
            end = min(start + rows_per_chunk, num_rows)
            hidden_CH, targets_C = hidden_NH[start:end], targets_N[start:end]
            logits_CV = logits_buf[: end - start]
            if bias_V is None:
                torch.mm(hidden_CH, weight_VH.t(), out=logits_CV)
            else:
                torch.addmm(bias_V, hidden_CH, weight_VH.t(), out=logits_CV)
            if use_triton:  # the gradient overwrites the logits
                loss_N[start:end] = cross_entropy_(logits_CV, targets_C, ignore_index, 1.0, compute_grad, 0)
                grad_CV = logits_CV
            else:
                loss_N[start:end], grad_CV = _cross_entropy_torch(logits_CV, targets_C, ignore_index, compute_grad)
            if need_hidden:
                torch.mm(grad_CV, weight_VH, out=grad_hidden[start:end])
            if need_weight:
                if weight_VH.dtype == torch.float32:
                    grad_weight.addmm_(grad_CV.t(), hidden_CH)
                elif weight_VH.dtype == torch.float16:  # one chunk's sum over rows can pass fp16's 65504: in fp32
                    grad_weight.addmm_(grad_CV.t().float(), hidden_CH.float())
                else:  # summed in fp32 over chunks: tens of chunks summed in bf16 would lose ~1% of precision
                    grad_weight += torch.mm(grad_CV.t(), hidden_CH)
            if need_bias:
                grad_bias += grad_CV.sum(0, dtype=torch.float32)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight_VH.dtype, None if bias_V is None else bias_V.dtype)
        ctx.divisor = divisor
        loss = loss_N.sum()
        return loss if divisor is None else loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward can run only once (its saved gradients are scaled in place)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        grad_loss = _divided(grad_loss, ctx.divisor)
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _divided(grad_loss: torch.Tensor, divisor: torch.Tensor | int | float | None) -> torch.Tensor:
    """grad_loss / divisor, 0 where the divisor is 0 (no row counted: every saved gradient is 0, and 0 * inf would
    be NaN). On the device for a tensor divisor: no host sync."""
    if divisor is None:
        return grad_loss
    if torch.is_tensor(divisor):
        return torch.where(divisor != 0, grad_loss / divisor, 0.0)
    return grad_loss / divisor if divisor != 0 else torch.zeros_like(grad_loss)


def _check(hidden, weight, targets, bias, reduction, num_items_in_batch, chunk_size) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(f"hidden: expected a floating-point tensor [..., H], got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[-1]}] (hidden is {list(hidden.shape)}), "
                         f"got {list(getattr(weight, 'shape', []))}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias: expected [{weight.shape[0]}], got {list(bias.shape)}")
    num_rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.numel() != num_rows:
        raise ValueError(f"targets: expected {num_rows} integer class ids (one per row of hidden {list(hidden.shape)}), "
                         f"got {getattr(targets, 'dtype', type(targets).__name__)} {list(getattr(targets, 'shape', []))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if reduction == "sum" and num_items_in_batch is not None:
        raise ValueError("num_items_in_batch: divides a 'mean'; it makes no sense with reduction='sum'")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an integer >= 1 (rows per chunk) or None, got {chunk_size!r}")


def _check_class_ids(targets_N: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= num_classes))
    if bad.any():
        raise ValueError(f"targets: expected class ids in [0, {num_classes}) or ignore_index {ignore_index}, "
                         f"got {int(targets_N[bad][0])} ({int(bad.sum())} of {targets_N.numel()} out of range)")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias).float(), targets) without the [N, V] logits. fp32 scalar.

    hidden [..., H]; weight [V, H]; bias [V]; targets: one class id per row of hidden (ignore_index skips a row).
    A class id outside [0, V) is refused on CPU; on a GPU its row's loss is NaN (a check there would sync).
    reduction: "mean" over the non-ignored rows (NaN when there are none, as F.cross_entropy), or the sum
      divided by num_items_in_batch when given (transformers' convention for gradient accumulation); "sum".
    chunk_size: rows per chunk of logits; default: as many as fit in CHUNK_BYTES.
    Under autocast the GEMMs run in the autocast dtype, as nn.Linear's would.
    """
    _check(hidden, weight, targets, bias, reduction, num_items_in_batch, chunk_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}"
                         + ("" if bias is None else f" (bias {bias.dtype})"))
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    targets_N = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
    if targets_N.device.type == "cpu":  # free to check here; on a GPU a check would sync, and the kernel gives NaN
        _check_class_ids(targets_N, weight.shape[0], ignore_index)
    rows = chunk_size or chunk_rows(weight.shape[0], hidden.dtype)
    if reduction == "sum":
        divisor = None
    elif num_items_in_batch is None:
        divisor = (targets_N != ignore_index).sum()
    elif torch.is_tensor(num_items_in_batch):
        divisor = num_items_in_batch.to(hidden.device)
    else:
        divisor = num_items_in_batch
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden_NH, weight, bias, targets_N, int(ignore_index), rows, divisor)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss on logits = hidden @ weight.T (+ bias), without the logits.

    hidden [B, S, H] predicts labels [B, S] shifted by one (position s is scored against labels[:, s + 1], the
    last position against nothing); shift_labels [B, S], when given, are used as they are instead.
    Mean over the non-ignored labels, or their sum / num_items_in_batch when given.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels: expected a tensor of class ids (or shift_labels), got None")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(
        hidden, weight, shift_labels, bias=bias, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )
