"""One MoE experts block, forward + backward, LoRA on the experts: moetune backends vs transformers+PEFT.

    python benchmarks/bench_experts.py                       # GPU: all shapes, 4096 and 16384 tokens
    python benchmarks/bench_experts.py --tiny                # CPU smoke run at toy sizes (seconds)

Every provider computes the same function on the same inputs: moetune reads the very LoRA
factors PEFT created (converted from PEFT's layout), and a correctness check against the
baseline runs first for each shape. Gradients are taken for x, the routing weights and every
LoRA factor; the base weights are frozen. Timing: CUDA events after warm-up, median of
repeats. Peak memory: torch.cuda.max_memory_allocated above what was allocated before the
step (weights and inputs excluded), i.e. what the step itself needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SHAPES, MoEShape  # noqa: E402

from moetune.experts import available_backends, moe_experts  # noqa: E402


def tiny(shape: MoEShape) -> MoEShape:
    """The same architecture at toy size (for CPU smoke runs)."""
    kwargs = dict(shape.config_kwargs)
    for key, value in (("hidden_size", 64), ("moe_intermediate_size", 32), ("intermediate_size", 32)):
        if key in kwargs:
            kwargs[key] = value
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in kwargs:
            kwargs[key] = 8
    kwargs["num_experts_per_tok"] = 2
    return dataclasses.replace(shape, name="tiny-" + shape.name, config_kwargs=kwargs, E=8, k=2, H=64, I=32)


def build(shape: MoEShape, args, device):
    dtype = getattr(torch, args.dtype)
    experts = harness.make_experts_module(shape, dtype, device)
    peft_experts, peft_params = harness.add_peft_lora(experts, args.rank, args.alpha)
    lora = harness.peft_lora_to_expert_lora(peft_experts, shape)
    gate_up, down, b1, b2 = harness.base_weights(peft_experts, shape)
    common = dict(gate_up_bias=b1, down_bias=b2, lora=lora, activation=shape.activation, interleaved=shape.interleaved)

    def run(provider, x, ids, w):
        if provider == "baseline":
            return peft_experts(x, ids, w), peft_params
        return moe_experts(x, ids, w, gate_up, down, **common, backend=provider), [f for f in lora.factors()]

    return run


def inputs(shape, tokens, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, shape.H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    ids, w = harness.make_routing(shape, tokens, device, dtype, seed)
    grad_out = torch.randn(tokens, shape.H, generator=gen).to(device=device, dtype=dtype)
    return x, ids, w.requires_grad_(), grad_out


def check(run, shape, providers, device, dtype) -> dict:
    """Relative error of each moetune backend against the baseline (output and d x), 256 tokens."""
    x, ids, w, grad_out = inputs(shape, 256, device, dtype, seed=1)
    ref, _ = run("baseline", x, ids, w)
    (ref_dx,) = torch.autograd.grad(ref, [x], grad_out)
    errors = {}
    for provider in providers:
        if provider == "baseline":
            continue
        out, _ = run(provider, x, ids, w)
        (dx,) = torch.autograd.grad(out, [x], grad_out)
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        errors[provider] = {"out": rel(out, ref), "dx": rel(dx, ref_dx)}
    return errors


def bench(run, shape, tokens, provider, args, device) -> dict:
    dtype = getattr(torch, args.dtype)
    x, ids, w, grad_out = inputs(shape, tokens, device, dtype)

    def step():
        out, params = run(provider, x, ids, w)
        torch.autograd.grad(out, [x, w, *params], grad_out)

    repeat = args.repeat if provider != "native" else max(3, args.repeat // 4)  # the loop is slow at 128 experts
    try:
        result = harness.measure(step, device, warmup=args.warmup, repeat=repeat)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    result["tflops"] = harness.base_gemm_flops(shape, tokens) / (result["ms"] * 1e-3) / 1e12
    return result


def profile(args, device) -> int:
    """Print the kernels of one (shape, tokens, provider) forward+backward, most GPU time first."""
    name, tokens, provider = args.profile[0], int(args.profile[1]), args.profile[2]
    shape = tiny(SHAPES[name]) if args.tiny else SHAPES[name]
    run = build(shape, args, device)
    x, ids, w, grad_out = inputs(shape, tokens, device, getattr(torch, args.dtype))

    def step():
        out, params = run(provider, x, ids, w)
        torch.autograd.grad(out, [x, w, *params], grad_out)

    for _ in range(args.warmup):
        step()
    if args.host:
        return host_profile(step, f"{shape.name} {tokens} tokens, {provider}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"# {shape.name} {tokens} tokens, {provider}: 5 steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    return 0


def host_profile(step, title: str, steps: int = 20) -> int:
    """Where the host time of a step goes (cProfile, by own time): for steps the GPU finishes before the host."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    print(f"# {title}: host time of {steps} steps by function (cProfile)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--providers", nargs="+", default=None, help="baseline and moetune backends (default: all usable)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="toy sizes of each architecture, for a CPU smoke run")
    parser.add_argument("--profile", nargs=3, metavar=("SHAPE", "TOKENS", "PROVIDER"), default=None,
                        help="instead of the table: the kernels of one case, by GPU time (torch.profiler)")
    parser.add_argument("--host", action="store_true", help="with --profile: the host time by Python function instead")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/experts-<device>.json)")
    args = parser.parse_args(argv)
    if args.host and not args.profile:
        parser.error("--host: goes with --profile SHAPE TOKENS PROVIDER")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.tokens, args.repeat, args.warmup = [t for t in args.tokens if t <= 512] or [64, 256], 3, 1
    providers = args.providers or ["baseline", *available_backends(device, dtype)]
    if args.profile:
        return profile(args, device)
    env = harness.environment()
    rows, checks = [], {}
    print(f"# {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}")
    print(f"{'shape':<22}{'tokens':>7}  {'provider':<11}{'ms':>9}{'TFLOP/s':>9}{'peak GiB':>10}{'x base':>8}{'host ms':>9}"
          f"{'queued ms':>11}{'x base':>8}")
    for name in args.shapes:
        shape = tiny(SHAPES[name]) if args.tiny else SHAPES[name]
        run = build(shape, args, device)
        checks[shape.name] = check(run, shape, providers, device, dtype)
        for tokens in args.tokens:
            baseline = None
            for provider in providers:
                result = bench(run, shape, tokens, provider, args, device)
                if provider == "baseline":
                    baseline = result
                if baseline and not result.get("oom") and not baseline.get("oom"):
                    result["speedup"] = baseline["ms"] / result["ms"]
                    if "queued_ms" in result:
                        result["speedup_queued"] = baseline["queued_ms"] / result["queued_ms"]
                    if "peak_gib" in result:
                        result["memory_ratio"] = result["peak_gib"] / baseline["peak_gib"]
                rows.append({"shape": shape.name, "tokens": tokens, "provider": provider, "rank": args.rank, **result})
                if result.get("oom"):
                    print(f"{shape.name:<22}{tokens:>7}  {provider:<11}{'out of memory':>27}")
                    continue
                peak = f"{result['peak_gib']:.2f}" if "peak_gib" in result else "-"
                print(
                    f"{shape.name:<22}{tokens:>7}  {provider:<11}{result['ms']:>9.2f}{result['tflops']:>9.1f}"
                    f"{peak:>10}{result.get('speedup', 1.0):>8.2f}{result.get('host_ms', float('nan')):>9.2f}"
                    f"{result.get('queued_ms', float('nan')):>11.2f}{result.get('speedup_queued', 1.0):>8.2f}"
                )
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print("correctness vs baseline (relative error):", checks)

    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"experts-{'tiny-' if args.tiny else ''}{env['device'].replace(' ', '_')}.json",
    )
    shapes = {s.name: harness.shape_dict(s) for s in (tiny(SHAPES[n]) if args.tiny else SHAPES[n] for n in args.shapes)}
    harness.write_json(out, {"environment": env, "args": vars(args), "shapes": shapes, "checks": checks, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
