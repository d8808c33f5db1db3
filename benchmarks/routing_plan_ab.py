"""The routing plan two ways on a GPU: torch's stable sort (~10 ops) and moetune's counting sort (three Triton
launches, kernels/expert_sort.py), alternating in rounds (medians and 20/80 percentiles over rounds). Both must
give the same plan (checked first). Per way: the host time to issue one plan (calls issued back to back, no sync)
and the GPU time of one plan (CUDA events, with the calls queued behind a sleep kernel so the GPU never waits for
the host; run 51f's figures predate that and timed the host twice).

    python benchmarks/routing_plan_ab.py --cases 8192:8:128 16384:4:32 32768:8:128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

from moetune.experts import routing  # noqa: E402

WAYS = ("torch", "counting")
SLEEP_CYCLES_PER_CALL = 1_000_000  # ~0.5 ms at ~2 GHz: more than either way's host time for one plan
FIELDS = ("perm_S", "inv_perm_S", "token_S", "expert_S", "counts_E", "offsets_E")


@contextlib.contextmanager
def way_of_planning(way: str):
    """plan_routing as it runs by default ("counting" on a GPU) or with the counting sort turned off ("torch")."""
    if way == "counting":
        yield
        return
    with mock.patch.object(routing, "_counting_sort", lambda *args: None):
        yield


def time_way(ids, num_experts, way, calls: int) -> tuple[float, float]:
    """(host ms to issue one plan, GPU ms of one plan). The GPU first sleeps long enough for the host to queue every
    call, so the events time the kernels alone, not the host feeding them."""
    with way_of_planning(way):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES_PER_CALL * calls)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            routing.plan_routing(ids, num_experts)
        host = (time.perf_counter() - t0) / calls * 1e3
        end.record()
        torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+",
                        default=["8192:8:128", "4096:8:128", "16384:4:32", "16384:4:64", "8192:8:256", "8192:8:160"],
                        help="tokens:top_k:experts")
    parser.add_argument("--rounds", type=int, default=7)
    # 50 calls of torch's ~12 launches stay inside CUDA's queue of pending launches: a fuller queue would stall
    # the host and time the GPU twice again.
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("routing_plan_ab.py: needs a CUDA GPU")
    rows = []
    for case in args.cases:
        num_tokens, top_k, num_experts = (int(v) for v in case.split(":"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.rand(num_tokens, num_experts, device="cuda", generator=gen).topk(top_k, dim=1).indices
        plans = []
        for way in WAYS:
            with way_of_planning(way):
                plans.append(routing.plan_routing(ids, num_experts))
        same = all(torch.equal(getattr(plans[0], f), getattr(plans[1], f)) for f in FIELDS)
        if not same:
            raise SystemExit(f"{case}: the two ways gave different plans")
        for way in WAYS:
            time_way(ids, num_experts, way, 20)  # warm-up: compile, allocator
        timings = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                timings[way].append(time_way(ids, num_experts, way, args.calls))
        row = {"tokens": num_tokens, "top_k": top_k, "experts": num_experts, "same_plan": same}
        for way in WAYS:
            for index, what in ((0, "host"), (1, "gpu")):
                values = sorted(timing[index] for timing in timings[way])
                row[f"{way}_{what}_ms"] = statistics.median(values)
                row[f"{way}_{what}_ms_p20"] = values[int(0.2 * (len(values) - 1))]
                row[f"{way}_{what}_ms_p80"] = values[int(0.8 * (len(values) - 1))]
        rows.append(row)
        print(f"T={num_tokens} k={top_k} E={num_experts}: " + ", ".join(
            f"{way} host {row[f'{way}_host_ms'] * 1e3:.0f} us / GPU {row[f'{way}_gpu_ms'] * 1e3:.0f} us"
            for way in WAYS), flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "routing-plan-ab.json")
    harness.write_json(out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
