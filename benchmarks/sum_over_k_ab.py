"""The experts' sum over k: torch's `y.sum(dim=1)` against moetune's kernel (kernels/sum_over_k.py), alone.

For each case [T, K, H] (bf16 on the GPU): the kernel's output against a sequential fp32 sum (bitwise, its own
arithmetic: the exit code) and torch's sum; GPU time a call (do_bench's median, the L2 flushed; its mean up to run
87), the bandwidth it reaches (K+1 tensors of [T, H] read and written) and, with --sweep, every tile config of the
kernel, to choose its default.
The block-level A/B is `switch_ab.py --switch sum`.

    python benchmarks/sum_over_k_ab.py --sweep --out benchmarks/results/sum-over-k-ab.json
    python benchmarks/sum_over_k_ab.py --tiny      # toy sizes on CPU through the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

CASES = ["qwen3-30b-a3b:16384", "qwen3-30b-a3b:4096", "gpt-oss-20b:16384", "glm-4.7-flash:16384",
         "glm-4.7-flash:8192"]
SWEEP = [dict(block_t=t, block_h=h, num_warps=w) for t, h, w in
         [(8, 256, 4), (4, 256, 4), (16, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 4), (8, 512, 8), (2, 1024, 4),
          (4, 1024, 8), (1, 2048, 8), (32, 128, 4)]]


def gpu_us(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def case(name: str, tokens: int, args, device, dtype) -> dict:
    from moetune.kernels.sum_over_k import default_tile, sum_over_k

    shape = SHAPES[name]
    T, K, H = (tokens, shape.k, shape.H) if not args.tiny else (37, shape.k, 96)
    y = torch.randn(T, K, H, device=device, dtype=dtype)
    out = sum_over_k(y)
    sequential = y[:, 0].float()
    for k in range(1, K):
        sequential = sequential + y[:, k].float()
    row = {"shape": name, "tokens": T, "K": K, "H": H,
           "tile": default_tile(H),
           "bitwise_equal_sequential": torch.equal(out, sequential.to(dtype)),  # the kernel's own arithmetic
           "bitwise_equal_torch": torch.equal(out, y.sum(dim=1))}  # torch may sum in another order
    bitwise = row["bitwise_equal_torch"]
    if device.type != "cuda":
        print(f"{name} [{T}, {K}, {H}]: kernel bitwise a sequential fp32 sum: {row['bitwise_equal_sequential']}, "
              f"torch's sum: {bitwise}")
        return row
    gbytes = (K + 1) * T * H * y.element_size() / 1e9
    row["torch_us"] = gpu_us(lambda: y.sum(dim=1))
    row["kernel_us"] = gpu_us(lambda: sum_over_k(y))  # the default tile (row["tile"])
    line = (f"{name:<15}{T:>7} [{T}, {K}, {H}]  torch {row['torch_us']:7.1f} us "
            f"({gbytes / row['torch_us'] * 1e3:.2f} TB/s)  kernel {row['kernel_us']:7.1f} us "
            f"({gbytes / row['kernel_us'] * 1e3:.2f} TB/s)  bitwise {bitwise}")
    print(line, flush=True)
    if args.sweep:
        row["sweep"] = []
        for config in SWEEP:
            us = gpu_us(lambda config=config: sum_over_k(y, **config))
            row["sweep"].append({**config, "us": us, "tb_s": gbytes / us * 1e3})
            print(f"    {config}  {us:7.1f} us  {gbytes / us * 1e3:.2f} TB/s", flush=True)
    row["gbytes"] = gbytes
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, metavar="SHAPE:TOKENS")
    parser.add_argument("--sweep", action="store_true", help="also every tile config of SWEEP")
    args = harness.parse_gpu_args(parser, argv)
    cases = harness.parse_cases(parser, args.cases)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = [case(name, tokens, args, device, dtype) for name, tokens in cases]
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "cases": rows})
    return 0 if all(row["bitwise_equal_sequential"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
