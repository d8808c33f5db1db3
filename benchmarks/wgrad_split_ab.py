"""The four LoRA weight-gradient launches of one experts backward, split into chunks of rows or not, under routings
even and uneven.

grouped_wgrad (kernels/grouped_wgrad.py) splits each expert's rows into chunks of 2-4x the mean rows per
expert. Without the split one program walks all of an expert's rows, so the launch waits on the busiest expert: run
86d measured a random-initialised Qwen3-30B-A3B cut routing 16K of its 131K rows at 16K tokens to one expert, and
the four launches of a layer at 1.41-1.50 ms against 0.53 ms under even routing. For each case (bf16 on the GPU):
each routing, each launch (dB2 with the gather and the routing weight, dA2 with the activation recomputed on load,
dB1, dA1 with the gather) timed split and unsplit (grouped_wgrad.SPLIT_ROWS off: every expert one chunk, one
program walking all its rows as before the split; its schedule launch and binary search remain), do_bench medians
with the L2 flushed (means up to run 87c); each way's error against float64; and the exit code: every split launch
gives the same bits twice and is no less accurate than the unsplit one.

Routings: even (harness.make_routing: softmax top-k of random logits), zipf (each token draws its k experts without
replacement with probability ~ 1 / sqrt(rank): the busiest expert gets ~5x the mean rows at Qwen3's 128 experts,
~3x at gpt-oss's 32), busy (every token's first slot to expert 0: run 86d's random-initialised cut, roughly).

    python benchmarks/wgrad_split_ab.py --out benchmarks/results/wgrad-split-ab.json
    python benchmarks/wgrad_split_ab.py --tiny      # toy sizes on CPU through the Triton interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

CASES = ["qwen3-30b-a3b:16384", "qwen3-30b-a3b:4096", "gpt-oss-20b:16384", "glm-4.7-flash:16384"]
ROUTINGS = ["even", "zipf", "busy"]
RANK = 16


def routing_ids(kind: str, E: int, k: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[tokens, k] distinct expert ids per token."""
    if kind == "even":
        logits = torch.randn(tokens, E, generator=gen)
        return logits.softmax(-1).topk(k, dim=-1).indices
    if kind == "zipf":
        weights = torch.arange(1, E + 1, dtype=torch.float64) ** -0.5
        return torch.multinomial(weights.expand(tokens, E), k, replacement=False, generator=gen)
    if kind == "busy":
        rest = torch.rand(tokens, E - 1, generator=gen).argsort(dim=1)[:, : k - 1] + 1
        return torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], dim=1)
    raise ValueError(f"routing: expected one of {ROUTINGS}, got {kind!r}")


def launches(shape, tokens: int, plan, device, dtype, gen) -> dict:
    """name -> (call(**kw), reference()) of the four wgrad launches with operands of the shape (random, rank RANK):
    the launch, and its float64 [E, M, N] sums expert by expert."""
    from moetune.experts import get_activation
    from moetune.kernels import act_code, grouped_wgrad

    H, I, S = shape.H, shape.I, plan.num_rows

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(device=device, dtype=dtype)

    x, d_out, d_gu, gu, su, sv = rand(tokens, H), rand(tokens, H), rand(S, 2 * I), rand(S, 2 * I), rand(S, RANK), \
        rand(S, RANK)
    w_S = torch.rand(S, generator=gen).to(device=device, dtype=dtype)
    activation = get_activation(shape.activation)
    act = act_code(activation)
    wg = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    token = plan.token_S

    def operand(rows):  # the kernel scales its b tile by the routing weight in fp32 and rounds it to the a's dtype
        return (rows.float() * w_S.float()[:, None]).to(dtype).double()

    # So the references below differ from the launches by the accumulation order alone (dA2's also by the last bit
    # of torch's fp32 activation against the kernel's, the same for split and unsplit).
    return {
        "dB2": (lambda **kw: grouped_wgrad(d_out, su, a_index=token, scale=w_S, **wg, **kw),
                lambda: expert_sums(plan, d_out.double()[token], operand(su))),
        "dA2": (lambda **kw: grouped_wgrad(sv, gu, b_act=act, interleaved=shape.interleaved, scale=w_S, **wg, **kw),
                lambda: expert_sums(plan, sv.double(), operand(activation.forward(gu.float(), shape.interleaved)))),
        "dB1": (lambda **kw: grouped_wgrad(d_gu, su, **wg, **kw),
                lambda: expert_sums(plan, d_gu.double(), su.double())),
        "dA1": (lambda **kw: grouped_wgrad(sv, x, b_index=token, **wg, **kw),
                lambda: expert_sums(plan, sv.double(), x.double()[token])),
    }


def expert_sums(plan, a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """[E, M, N] float64: per expert, the sum over its (expert-sorted) rows of a_row^T b_row."""
    counts = plan.counts_E.tolist()
    return torch.stack([a.T @ b for a, b in zip(a_rows.split(counts), b_rows.split(counts))])


def plan_load(plan) -> dict:
    """How evenly `plan` routes: its rows, experts, the busiest expert's rows and against the mean, the empty ones."""
    counts = plan.counts_E.double()
    return {"rows": plan.num_rows, "experts": counts.numel(), "busiest": int(counts.max()),
            "busiest_over_mean": (counts.max() / counts.mean()).item(), "empty_experts": int((counts == 0).sum())}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def compare(shape, tokens: int, plan, device, dtype, gen) -> dict:
    """The four launches under `plan`, split and unsplit: per launch each way's error against float64, two split
    launches bitwise equal and, on a GPU, the ms of each way; "ok" (every split launch repeats to the bit and is no
    less accurate than the unsplit one, within a factor of 2) and, on a GPU, the four launches' sums.

    Split and unsplit add the same fp32 products in different orders, so they differ by fp32 rounding, which grows
    with an expert's rows (1.5e-5 relative between them under a random-initialised Qwen3-30B-A3B's layer routing 16K
    rows to one expert, run 87c): float64 is what both are judged against."""
    module = importlib.import_module("moetune.kernels.grouped_wgrad")
    result, ok = {"launches": {}}, True
    for launch_name, (call, reference) in launches(shape, tokens, plan, device, dtype, gen).items():
        split, again = call(), call()
        module.SPLIT_ROWS = False  # every expert one chunk: one program walks all its rows
        try:
            whole = call()
            whole_ms = gpu_ms(call) if device.type == "cuda" else None
        finally:
            module.SPLIT_ROWS = True
        ref = reference()
        entry = {"bitwise_repeat": torch.equal(split, again), "rel_err_split": rel_err(split, ref),
                 "rel_err_unsplit": rel_err(whole, ref), "rel_err_vs_unsplit": rel_err(split, whole.double())}
        del ref
        ok &= entry["bitwise_repeat"] and entry["rel_err_split"] <= 2 * entry["rel_err_unsplit"] + 1e-7
        if device.type == "cuda":
            entry.update(split_ms=gpu_ms(call), unsplit_ms=whole_ms)
        result["launches"][launch_name] = entry
    if device.type == "cuda":
        result["split_ms"] = sum(e["split_ms"] for e in result["launches"].values())
        result["unsplit_ms"] = sum(e["unsplit_ms"] for e in result["launches"].values())
    result["ok"] = ok
    return result


def case(name: str, tokens: int, kind: str, args, device, dtype) -> dict:
    from moetune.experts import plan_routing

    module = importlib.import_module("moetune.kernels.grouped_wgrad")
    shape = SHAPES[name]
    if args.tiny:
        shape = dataclasses.replace(shape, H=48, I=40)
    gen = torch.Generator().manual_seed(0)
    plan = plan_routing(routing_ids(kind, shape.E, shape.k, tokens, gen).to(device), shape.E)
    row = {"shape": name, "tokens": tokens, "routing": kind, **plan_load(plan),
           "chunk_rows": module.chunk_rows(plan.num_rows, shape.E), **compare(shape, tokens, plan, device, dtype, gen)}
    if device.type == "cuda":
        print(f"{name:<15}{tokens:>7} {kind:<5} busiest/mean {row['busiest_over_mean']:5.1f}  "
              f"unsplit {row['unsplit_ms']:.3f} ms  split {row['split_ms']:.3f} ms  "
              f"({row['unsplit_ms'] / row['split_ms']:.2f}x)  "
              + "  ".join(f"{n} {e['unsplit_ms']:.3f}->{e['split_ms']:.3f}" for n, e in row["launches"].items()),
              flush=True)
    else:
        print(f"{name} {tokens} {kind}: split as accurate as unsplit against float64 and repeats to the bit: "
              f"{row['ok']}")
    return row


def gpu_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, metavar="SHAPE:TOKENS")
    parser.add_argument("--routings", nargs="+", default=ROUTINGS, choices=ROUTINGS)
    args = harness.parse_gpu_args(parser, argv)
    cases = harness.parse_cases(parser, args.cases)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = [case(name, tokens, kind, args, device, dtype) for name, tokens in cases for kind in args.routings]
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "rank": RANK, "cases": rows})
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
