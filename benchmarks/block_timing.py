"""Where one experts block's step time goes: host, GPU, and the GPU's waits for the host.

For each case (shape:tokens) and provider, after warm-up, medians of the repeats:
- host: time for the host to issue one step, starting after a sync;
- alone: wall time of one step from a sync to its sync (bench_experts' "ms" measures this with events);
- gpu: GPU time of one step queued whole behind a sleep kernel, so the GPU never waits for the host;
- queued: GPU time per step of steps issued back to back (one sync per round), as a model's layers are;
- with --gaps: one profiled step (torch.profiler): its GPU ops' busy time against their span, and the largest idle
  gaps between them, each with how long after the previous op's end the host issued the next (a positive lag: the
  GPU waited for the host);
- with --queued-gaps N: the same for N steps issued back to back, as queued's are. Where queued exceeds gpu with
  no gaps here, the GPU itself ran slower (clocks under sustained load), not the host (run 57d: Qwen3 16K queued
  7.10 against 6.80 ms of one step behind a sleep).

    python benchmarks/block_timing.py --cases qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 --gaps
    python benchmarks/block_timing.py --cases glm-4.7-flash:16384 --queued-gaps 5
    python benchmarks/block_timing.py --cases glm-4.7-flash:4096 --providers triton baseline --out timing.json

CUDA only (the figures are about a GPU waiting for its host).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_experts  # noqa: E402
import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

# A sleep long enough that the host queues a whole step before the GPU reaches it (cycles: ~10 ms on an H100/H200).
SLEEP_CYCLES = 20_000_000


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def _step(run, provider, x, ids, w, grad_out) -> None:
    """One forward + backward of the block (bench_experts' step)."""
    out, params = run(provider, x, ids, w)
    torch.autograd.grad(out, [x, w, *params], grad_out)


def timings(step, repeat: int) -> dict:
    host, alone, gpu = [], [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        alone.append(time.perf_counter() - start)
    for _ in range(repeat):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        begin.record()
        step()
        end.record()
        end.synchronize()
        gpu.append(begin.elapsed_time(end) / 1e3)
    return {"host_ms": _median_ms(host), "alone_ms": _median_ms(alone), "gpu_ms": _median_ms(gpu),
            "queued_ms": harness.queued_ms(step, repeat)}


def gaps(step, top: int = 8, steps: int = 1) -> dict:
    """`steps` profiled steps issued back to back (after one untimed step where steps > 1, as queued_ms times them):
    busy time of their GPU ops against their span, and the largest gaps between them."""
    torch.cuda.synchronize()
    if steps > 1:
        step()  # the profiled steps then start behind one already queued, as queued_ms's timed ones do
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return idle_gaps(events, top)


def busy_per_step(step, steps: int) -> dict:
    """GPU busy milliseconds and GPU ops per step, from a profile of `steps` steps queued back to back (gaps): the
    GPU's own time where a slow host makes the timed steps host-bound."""
    busy = gaps(step, steps=steps)
    return {"busy_ms": busy["busy_ms"] / steps, "gpu_ops": busy["gpu_ops"] / steps}


def idle_gaps(events: list[dict], top: int = 8) -> dict:
    """From a chrome trace's events: the GPU ops' busy time against their span, and the `top` largest gaps between
    consecutive ops, each with how long after the previous op's end the host issued the next."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                 key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    if not ops:
        return {}
    found = []
    for prev, op in zip(ops, ops[1:]):
        prev_end = prev["ts"] + prev["dur"]
        issued = launches.get(op.get("args", {}).get("correlation"))
        found.append({"gap_us": op["ts"] - prev_end, "launch_lag_us": None if issued is None else issued - prev_end,
                      "after": prev["name"][:80], "before": op["name"][:80]})
    busy = sum(op["dur"] for op in ops)
    span = ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]
    return {"gpu_ops": len(ops), "busy_ms": busy / 1e3, "span_ms": span / 1e3, "idle_ms": (span - busy) / 1e3,
            "largest": sorted(found, key=lambda g: -g["gap_us"])[:top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["qwen3-30b-a3b:4096", "qwen3-30b-a3b:16384"],
                        metavar="SHAPE:TOKENS")
    parser.add_argument("--providers", nargs="+", default=["triton"], help="moetune backends and/or baseline")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--gaps", action="store_true", help="also profile one step's idle gaps")
    parser.add_argument("--queued-gaps", type=int, default=0, metavar="N",
                        help="also profile the idle gaps of N steps issued back to back")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it measures a GPU waiting for its host)")
    cases = harness.parse_cases(parser, args.cases)
    args.dtype = "bfloat16"
    device = torch.device("cuda")
    rows = []
    for name, tokens in cases:
        shape = SHAPES[name]
        run = bench_experts.build(shape, args, device)
        x, ids, w, grad_out = bench_experts.inputs(shape, tokens, device, torch.bfloat16)
        for provider in args.providers:
            step = functools.partial(_step, run, provider, x, ids, w, grad_out)
            for _ in range(args.warmup):
                step()
            row = {"shape": name, "tokens": tokens, "provider": provider, **timings(step, args.repeat)}
            print(f"{name:<16}{tokens:>7} {provider:<9} host {row['host_ms']:6.3f}  alone {row['alone_ms']:6.3f}  "
                  f"gpu {row['gpu_ms']:6.3f}  queued {row['queued_ms']:6.3f} ms", flush=True)
            profiled = ([("gaps", 1, "one profiled step")] if args.gaps else []) + (
                [("queued_gaps", args.queued_gaps, f"{args.queued_gaps} profiled steps back to back")]
                if args.queued_gaps > 0 else [])
            for key, steps, what in profiled:
                found = row[key] = gaps(step, steps=steps)
                print(f"    {what}: {found['gpu_ops']} GPU ops, busy {found['busy_ms']:.3f} of "
                      f"{found['span_ms']:.3f} ms, idle {found['idle_ms']:.3f}")
                for gap in found["largest"]:
                    print(f"    gap {gap['gap_us']:7.1f} us (launched {gap['launch_lag_us']} us after the GPU went "
                          f"idle)  {gap['after'][:50]} -> {gap['before'][:50]}")
            rows.append(row)
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
