"""One layer's attention over packed rows: transformers' block-diagonal mask against moetune's varlen path.

`moetune train --packing` puts several examples in a row. transformers' sdpa path builds a [1, 1, T, T] bool mask
from the restarting positions and runs sdpa with it (no causal fast path: the memory-efficient kernel or the math
one, the key/value heads repeated); moetune's packed_attention.py runs torch's varlen flash attention over each
example with no mask. This times forward + backward of both (bf16, one row of T tokens, examples of seeded random
lengths), their peak memory above the inputs (the mask counted for the mask path: transformers builds it once per
forward), and the outputs' relative difference. TFLOP/s count the useful work only: causal attention within each
example, forward 2 * sum(n_i^2) * H * (d_qk + d_v) / 2, backward 2.5x that.

    python benchmarks/packed_attention_ab.py --seq 8192 32768 --out results/packed-attention-ab-H100.json
    python benchmarks/packed_attention_ab.py --tiny   # CPU: toy widths, a per-example sdpa for the varlen kernel
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from attention_backends import SHAPES  # noqa: E402

from moetune.models import packed_attention  # noqa: E402


def example_lengths(seq: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Lengths of seeded random examples filling a row of `seq` tokens (the last one cut to fit)."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < seq:
        lengths.append(min(rng.randint(shortest, longest), seq - sum(lengths)))
    return lengths


def block_diagonal_mask(lengths: list[int], device) -> torch.Tensor:
    """transformers' packed causal mask: True where query i may attend key j (same example, j <= i)."""
    example = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    index = torch.arange(len(example), device=device)
    return ((example[:, None] == example[None, :]) & (index[:, None] >= index[None, :]))[None, None]


class _Module:  # what transformers' sdpa function reads from the attention module
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def time_path(path: str, lengths: list[int], shape: tuple, device, dtype, warmup: int, repeat: int) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads, d_qk, d_v = shape
    seq = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(0)

    def rows(n, d):  # transformers' layout: [B, T, H, D] memory viewed [B, H, T, D]
        return torch.randn(1, seq, n, d, device=device, dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()

    q, k, v = rows(heads, d_qk), rows(kv_heads, d_qk), rows(kv_heads, d_v)
    grad = torch.randn(1, seq, heads, d_v, device=device, dtype=dtype, generator=gen)
    module, scale = _Module(heads // kv_heads), d_qk**-0.5
    bounds = {key: value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in packed_attention.boundaries([lengths], seq).items()}

    def forward():
        if path == "mask":  # built in every forward, as transformers' create_causal_mask does
            return sdpa_attention_forward(module, q, k, v, block_diagonal_mask(lengths, device), scaling=scale)[0]
        return packed_attention.packed_attention_forward(module, q, k, v, None, scaling=scale, **bounds)[0]

    def forward_backward():
        torch.autograd.backward(forward(), grad)
        q.grad = k.grad = v.grad = None

    try:
        with torch.no_grad():
            out = forward().float()
        forward_backward()
    except (RuntimeError, NotImplementedError) as error:  # e.g. out of memory for the mask at long rows
        return {"path": path, "seq": seq, "unsupported": str(error).splitlines()[0][:200]}, None
    flops = sum(2.0 * n * n * heads * (d_qk + d_v) / 2 for n in lengths)
    with torch.no_grad():
        fwd = harness.measure(forward, device, warmup, repeat)
    both = harness.measure(forward_backward, device, warmup, repeat)
    row = {"path": path, "seq": seq, "examples": len(lengths), "forward_ms": fwd["ms"],
           "forward_backward_ms": both["ms"], "backward_ms": both["ms"] - fwd["ms"]}
    row["useful_forward_tflops"] = flops / fwd["ms"] / 1e9
    row["useful_forward_backward_tflops"] = 3.5 * flops / both["ms"] / 1e9
    if "peak_gib" in both:
        row["peak_gib"] = both["peak_gib"]
    return row, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "glm-4.7-flash"], choices=sorted(SHAPES))
    parser.add_argument("--seq", nargs="+", type=int, default=[8192])
    parser.add_argument("--examples", nargs=2, type=int, default=[256, 4096], metavar=("SHORTEST", "LONGEST"),
                        help="example lengths drawn uniformly in this range (seeded)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = harness.parse_gpu_args(parser, argv)
    if any(s < 1 for s in args.seq) or not 1 <= args.examples[0] <= args.examples[1]:
        parser.error("--seq and --examples: expected positive lengths, SHORTEST <= LONGEST")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        packed_attention.kernel = packed_attention.reference_kernel  # (torch has no CPU varlen kernel)
    rows = []
    for model in args.models:
        shape = SHAPES[model]
        if args.tiny:
            shape = (max(shape[0] // 4, 1), max(shape[1] // 4, 1), 16, 16)
        for seq in ([96] if args.tiny else args.seq):
            shortest, longest = (8, 40) if args.tiny else args.examples
            lengths = example_lengths(seq, shortest, longest)
            outputs = {}
            for path in ("mask", "varlen"):
                row, outputs[path] = time_path(path, lengths, shape, device, dtype, args.warmup, args.repeat)
                rows.append({"model": model, **row})
                if "unsupported" in row:
                    print(f"{model} T={seq} {path:>6}: unsupported ({row['unsupported']})")
                    continue
                print(f"{model} T={seq} ({len(lengths)} examples) {path:>6}: forward {row['forward_ms']:.3f} ms, "
                      f"forward+backward {row['forward_backward_ms']:.3f} ms "
                      f"({row['useful_forward_backward_tflops']:.0f} useful TFLOP/s)"
                      + (f", peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else ""))
            if all(o is not None for o in outputs.values()):
                error = harness.relative_error(outputs["varlen"], outputs["mask"])
                rows[-1]["relative_error_to_mask"] = error
                print(f"{model} T={seq}: varlen against the mask, relative error {error:.2e}")
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
