"""Host time of single calls the training step makes thousands of times, on a GPU's host: what one call costs the
thread that issues it (Python, torch's dispatcher, cuBLAS's heuristics, the launch), not the GPU.

A whole Qwen3-30B-A3B step at 8K waits on its host on most machines lent (NOTES runs 59-60): ~14,500 launches a step.
py-spy (run 60c) put torch.mm with an fp32 out_dtype (the LoRA weight gradients, lora_linear._mm_fp32) at the top of
the backward thread's own time, and a pinned host table copied per optimizer chunk next. This times each such call
against plainer ones of the same shapes (Qwen3's q_proj at 8K tokens, rank 16): calls issued back to back behind a
sleep kernel long enough that the GPU never drains the queue (a launch then never waits), alternating rounds,
median per call.

    python benchmarks/host_calls.py --out results/host-calls.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

CALLS = 40  # a round: few enough that the launch queue (~1,000 entries) never fills
SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU sleep at ~2 GHz: longer than any round's host time


def cases(device) -> dict:
    """name -> a call of no arguments. Shapes: Qwen3-30B-A3B's q_proj (2048 -> 4096) at 8192 tokens, rank 16."""
    from moetune.training.bf16_adamw import _to_device

    bf16 = dict(device=device, dtype=torch.bfloat16)
    N, H, Q, R = 8192, 2048, 4096, 16
    x, dy, w = torch.randn(N, H, **bf16), torch.randn(N, Q, **bf16), torch.randn(Q, H, **bf16)
    g, u, dx = torch.randn(N, R, **bf16), torch.randn(N, R, **bf16), torch.randn(N, H, **bf16)
    a = torch.randn(R, H, **bf16)
    addresses = list(range(13))
    return {
        "mm bf16 dy@W [8192,4096]x[4096,2048]": lambda: dy @ w,
        "addmm_ bf16 rank 16 into [8192,2048]": lambda: dx.addmm_(g, a, alpha=2.0),
        "mm fp32 out_dtype g^T x [16,8192]x[8192,2048] (dA)": lambda: torch.mm(g.t(), x, torch.float32),
        "mm bf16 g^T x [16,8192]x[8192,2048]": lambda: torch.mm(g.t(), x),
        "mm fp32 out_dtype dy^T u [4096,8192]x[8192,16] (dB)": lambda: torch.mm(dy.t(), u, torch.float32),
        "mm bf16 dy^T u [4096,8192]x[8192,16]": lambda: torch.mm(dy.t(), u),
        "aten.mm.dtype g^T x (dA, no Python overload)": lambda: torch.ops.aten.mm.dtype(g.t(), x, torch.float32),
        "mul_ + to(fp32) of [16,2048]": lambda: torch.empty(R, H, device=device).mul_(2.0).to(torch.float32),
        "pinned table of 13 int64 to the GPU": lambda: _to_device(addresses, torch.int64, device),
        "empty [8192,2048] bf16": lambda: torch.empty(N, H, **bf16),
    }


def host_us(call, rounds: int) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile over rounds of the host time of one call (us)."""
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        for _ in range(CALLS):
            call()
        samples.append((time.perf_counter() - t0) / CALLS * 1e6)
        torch.cuda.synchronize()
    quantiles = statistics.quantiles(samples, n=5)
    return statistics.median(samples), quantiles[0], quantiles[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    calls = cases(device)
    for call in calls.values():  # warm-up: cuBLAS handles, heuristics caches, the pinned allocator
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    rows = {name: [] for name in calls}
    for _ in range(3):  # alternating passes, so drift of the host's clocks falls on every call alike
        for name, call in calls.items():
            rows[name].append(host_us(call, max(2, args.rounds // 3)))
    results = []
    for name, passes in rows.items():
        median = statistics.median(p[0] for p in passes)
        results.append(dict(call=name, host_us=median, p20_us=min(p[1] for p in passes),
                            p80_us=max(p[2] for p in passes)))
        print(f"{median:8.1f} us  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=harness.environment(), rows=results), f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
