"""The LoRA term first or last (moetune/lora_linear.py's LORA_TERM_FIRST) in the bf16 LoRA Linear path, one process.

An attention module's LoRA projections at real widths, as FastMoEModel installs them (q/k/v, or MLA's q_a and kv_a,
as one group; o_proj alone): forward and backward, the two orders alternating in rounds. First: the small LoRA
product written, each base GEMM adding into it (beta=1); last: the base GEMM, then the LoRA product added in a pass
over the whole output. Reports each order's GPU busy time a step (a profile of steps queued back to back: a slow host
makes the timed steps host-bound, run 68) and harness.measure's times, and the largest relative difference between
the two orders' outputs and gradients.

    python benchmarks/lora_order_ab.py --cases qwen3-30b-a3b:8192 glm-4.7-flash:8192 --out results/x.json
    python benchmarks/lora_order_ab.py --cases qwen3-30b-a3b:9 --rank 4     # CPU (fp32): checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import block_timing  # noqa: E402
import harness  # noqa: E402
import lora_groups_ab  # noqa: E402

from moetune import lora_groups, lora_linear  # noqa: E402

# model -> (o_proj's input width, bias): the attention output projection, which reads its own input
O_PROJ = {"qwen3-30b-a3b": (4096, False), "gpt-oss-20b": (4096, True), "glm-4.7-flash": (5120, False)}
PROFILED = 10  # steps in the profile that gives the GPU busy time


def build(model: str, part: str, rank: int, dtype, device):
    """(module, input width, output widths) of the q/k/v-like group or o_proj, LoRA installed as FastMoEModel does."""
    if part == "qkv":
        module, width = lora_groups_ab.build(model, rank, dtype, device)
        assert lora_groups.form_groups(module) == 1
        return module, width, [out for _, out, _ in lora_groups_ab.PROJECTIONS[model][1]]
    width, bias = O_PROJ[model]
    hidden = lora_groups_ab.PROJECTIONS[model][0]
    module = lora_groups_ab.build_projections(width, (("o_proj", hidden, bias),), rank, dtype, device)
    return module, width, [hidden]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[f"{m}:8192" for m in O_PROJ], metavar="MODEL:TOKENS")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON results path")
    args = parser.parse_args(argv)
    cases = []
    for text in args.cases:
        model, _, tokens = text.partition(":")
        if model not in O_PROJ or not tokens.isdigit() or int(tokens) < 1:
            parser.error(f"--cases: expected MODEL:TOKENS with MODEL one of {', '.join(O_PROJ)}, got {text!r}")
        cases.append((model, int(tokens)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = harness.environment()
    print(f"# {env['device']}  torch {env['torch']}", flush=True)
    rows = []
    for model, tokens in cases:
        for part in ("qkv", "o_proj"):
            module, width, outs = build(model, part, args.rank, dtype, device)
            x = torch.randn(1, tokens, width, dtype=dtype, device=device, requires_grad=True)
            dys = [torch.randn(1, tokens, out, dtype=dtype, device=device) for out in outs]
            params = [x] + [p for p in module.parameters() if p.requires_grad]

            def step(module=module, x=x, dys=dys):
                torch.autograd.backward(module(x), dys)

            results, timings = {}, {True: [], False: []}
            for first in (True, False):
                lora_linear.LORA_TERM_FIRST = first
                outputs = module(x)
                results[first] = [t.detach() for t in outputs] + list(torch.autograd.grad(outputs, params, dys))
            difference = max(harness.relative_error(a, b) for a, b in zip(results[True], results[False]))
            for index in range(args.rounds):
                for first in ((True, False) if index % 2 == 0 else (False, True)):
                    lora_linear.LORA_TERM_FIRST = first
                    result = harness.measure(step, device, args.warmup, args.repeat)
                    if device.type == "cuda":
                        busy = block_timing.busy_per_step(step, PROFILED)
                        result.update(gpu_busy_ms=busy["busy_ms"], gpu_ops=busy["gpu_ops"])
                    timings[first].append(result)
                    for p in params:
                        p.grad = None
            lora_linear.LORA_TERM_FIRST = True
            row = {"model": model, "part": part, "tokens": tokens, "rank": args.rank,
                   "max_relative_difference": difference}
            for first, label in ((True, "first"), (False, "last")):
                for key in timings[first][0]:
                    row[f"{label}_{key}"] = statistics.median(t[key] for t in timings[first])
            rows.append(row)
            key = "gpu_busy_ms" if device.type == "cuda" else "ms"
            print(f"{model} {part} {tokens}: {key} first {row[f'first_{key}']:.4f} / last {row[f'last_{key}']:.4f}; "
                  f"difference {difference:.1e}", flush=True)
    if args.out:
        harness.write_json(args.out, {"environment": env, "machine": harness.machine(), "args": vars(args),
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
