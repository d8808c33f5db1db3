"""Causal attention of the whole-model steps under each of torch's SDPA backends: which is fastest at our shapes.

GLM-4.7-Flash's step at 8K is GPU-bound on a fast host (run 61: a CUDA-graph replay saves <= 1%) and a third of its
GPU time is attention: transformers' sdpa path lets torch pick cuDNN for [1, 20, 8192, 256], whose backward ran at
~400 TFLOP/s against ~640 for its forward (run 61g's profile). This times forward alone and forward + backward of
one layer's attention (bf16, causal, batch 1) under cuDNN, flash and memory-efficient attention, torch's choice
included, so that a faster backend can be forced where it pays; and under compiled flex attention with a causal block
mask, which is what gpt-oss-20b runs (its sinks rule out sdpa) for its 12 full-attention layers: run 61g's profile
puts flex at ~110 ms of a 490 ms step, so a faster backend there (cuDNN with its log-sum-exp, the sinks applied
after, as moetune's sink kernel does for flex) is worth measuring first. For gpt-oss also the two paths moetune runs
with its sinks, whole: "flex-sinks" (compiled flex attention, then the sink kernel: fast_sinks.py) and "cudnn-sinks"
(kernels/causal_sink_attention.py: cuDNN, then the sink kernel, its backward through cuDNN's).

q, k and v are laid out as transformers' projections give them ([B, T, H, D] memory viewed [B, H, T, D]); runs
before session 31 (run 62b) used contiguous [B, H, T, D].

FLOPs: forward 2 * T^2 * H * (d_qk + d_v) / 2 (causal halves the square), backward 2.5x the forward (dQ, dK, dV and
the recomputed scores).

    python benchmarks/attention_backends.py --seq 8192 16384 --out results/attention-backends-H100.json
    python benchmarks/attention_backends.py --tiny      # CPU: the math backend at toy sizes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

# (query heads, key/value heads, query/key head dim, value head dim), from the models' configs (train_step.MODELS)
SHAPES = {
    "glm-4.7-flash": (20, 20, 256, 256),
    "gpt-oss-20b": (64, 8, 64, 64),
    "qwen3-30b-a3b": (32, 4, 128, 128),
}
BACKENDS = {
    "auto": None,  # torch's own choice
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "flex": "flex",  # torch.compile'd flex_attention with a causal BlockMask (transformers' flex path)
    "flex-sinks": "flex-sinks",  # flex, then moetune's sink kernel (models with sinks)
    "cudnn-sinks": "cudnn-sinks",  # moetune's causal sink attention: cuDNN (CPU: flash for CPU), then the sink kernel
}
SINK_BACKENDS = ("flex-sinks", "cudnn-sinks")
SINK_MODELS = ("gpt-oss-20b",)


def attention_flops(seq: int, heads: int, d_qk: int, d_v: int) -> float:
    """Forward FLOPs of causal attention for one sequence (the two products over the lower triangle)."""
    return 2.0 * seq * seq * heads * (d_qk + d_v) / 2


def _flex_forward(q, k, v, seq: int, device, lse: bool = False):
    """Compiled flex attention over a causal block mask, the key/value heads shared as transformers shares them;
    lse: (out, lse), requested as transformers requests it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    extra = {}
    if lse:
        from transformers.integrations.flex_attention import get_flex_attention_lse_kwargs

        extra = get_flex_attention_lse_kwargs(True)
    return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1], **extra)


def _sinks_forward(backend: str, q, k, v, seq: int, device, dtype):
    """y [B, T, H, D] of causal attention with gpt-oss's sinks, the way moetune runs it under `backend`."""
    from moetune.kernels.attention_sinks import apply_sinks
    from moetune.kernels.causal_sink_attention import causal_sink_attention

    sinks = torch.randn(q.shape[1], device=device, generator=torch.Generator(device=device).manual_seed(1))
    sinks = sinks.to(dtype).requires_grad_()
    if backend == "cudnn-sinks":
        return lambda: causal_sink_attention(q, k, v, sinks, q.shape[-1] ** -0.5, dtype)[0]
    flex = _flex_forward(q, k, v, seq, device, lse=True)

    def forward():
        out, aux = flex()
        return apply_sinks(out, getattr(aux, "lse", aux), sinks, dtype)

    return forward


def time_backend(backend: str, seq: int, shape: tuple, device, dtype, warmup: int, repeat: int) -> dict:
    heads, kv_heads, d_qk, d_v = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rows(n, d):  # transformers' layout: [B, T, H, D] memory viewed [B, H, T, D]
        return torch.randn(1, seq, n, d, device=device, dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()

    q, k, v = rows(heads, d_qk), rows(kv_heads, d_qk), rows(kv_heads, d_v)
    grad = torch.randn(1, heads, seq, d_v, device=device, dtype=dtype, generator=gen)
    chosen = BACKENDS[backend]

    def context():  # a fresh one each call: sdpa_kernel's context manager is single-use
        return sdpa_kernel([chosen]) if chosen is not None else contextlib.nullcontext()  # None: torch picks

    def forward():
        with context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)

    if chosen == "flex":
        forward = _flex_forward(q, k, v, seq, device)
    if chosen in SINK_BACKENDS:  # y is [B, T, H, D]
        forward, grad = _sinks_forward(chosen, q, k, v, seq, device, dtype), grad.transpose(1, 2)

    def forward_backward():
        out = forward()
        torch.autograd.backward(out, grad)
        q.grad = k.grad = v.grad = None

    try:
        forward_backward()
    except (RuntimeError, NotImplementedError) as error:  # the backend refuses this shape, dtype or GPU
        return {"backend": backend, "seq": seq, "unsupported": str(error).splitlines()[0][:200]}
    flops = attention_flops(seq, heads, d_qk, d_v)
    with torch.no_grad():
        fwd = harness.measure(forward, device, warmup, repeat)
    both = harness.measure(forward_backward, device, warmup, repeat)
    row = {"backend": backend, "seq": seq, "forward_ms": fwd["ms"], "forward_backward_ms": both["ms"]}
    row["backward_ms"] = both["ms"] - fwd["ms"]
    row["forward_tflops"] = flops / fwd["ms"] / 1e9
    row["backward_tflops"] = 2.5 * flops / max(row["backward_ms"], 1e-9) / 1e9
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--seq", nargs="+", type=int, default=[8192])
    parser.add_argument("--backends", nargs="+", default=None, choices=sorted(BACKENDS),
                        help="default: auto, cudnn, flash, efficient, flex, and for models with sinks flex-sinks and "
                             "cudnn-sinks (math alone with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    args = harness.parse_gpu_args(parser, argv)
    for seq in args.seq:
        if seq < 1:
            parser.error(f"--seq: expected positive lengths, got {seq}")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    backends = args.backends or (["math"] if args.tiny else ["auto", "cudnn", "flash", "efficient", "flex",
                                                             *SINK_BACKENDS])
    rows = []
    for model in args.models:
        shape = SHAPES[model]
        if args.tiny:  # toy width, the same head-count ratio
            shape = (max(shape[0] // 4, 1), max(shape[1] // 4, 1), 16, 16)
        for seq in ([64] if args.tiny else args.seq):
            for backend in backends:
                if backend in SINK_BACKENDS and model not in SINK_MODELS:
                    continue
                row = {"model": model, **time_backend(backend, seq, shape, device, dtype, args.warmup, args.repeat)}
                rows.append(row)
                if "unsupported" in row:
                    print(f"{model} T={seq} {backend:>9}: unsupported ({row['unsupported']})")
                else:
                    print(f"{model} T={seq} {backend:>9}: forward {row['forward_ms']:.3f} ms "
                          f"({row['forward_tflops']:.0f} TFLOP/s), backward {row['backward_ms']:.3f} ms "
                          f"({row['backward_tflops']:.0f} TFLOP/s)")
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
