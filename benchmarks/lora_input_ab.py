"""The triton experts block with its LoRA inputs each way, alternating in one process.

The LoRA inputs su1, su2, sv2, sv1 (moetune/experts/backends/triton.py) go either by launches of their own or in the
main loop of the GEMM that reads them; grouped_gemm measures both per launch and shape (`measured`, the default).
This times the whole block forward + backward that way and with every input forced one way (`own launch`,
`in loop`), in rounds, since the lent GPUs drift by more than the effect between calls (NOTES run 48). Every
way must give the same outputs and gradients: checked first, on 1024 tokens.

    python benchmarks/lora_input_ab.py --cases qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 --rounds 3 --out x.json
    python benchmarks/lora_input_ab.py --tiny      # toy sizes on CPU through the Triton interpreter: checks the script
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_experts  # noqa: E402
import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

grouped_gemm_module = importlib.import_module("moetune.kernels.grouped_gemm")  # the module, not the function
MEASURED = grouped_gemm_module._LORA_INPUT_WAYS
MODES = {"measured": MEASURED, "own launch": ({"in_loop": False},), "in loop": ({"in_loop": True},)}


def set_mode(ways) -> None:
    grouped_gemm_module._LORA_INPUT_WAYS = ways  # untimed with one way: pick takes it
    grouped_gemm_module.forget_decisions()  # the ways decided for the previous mode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["qwen3-30b-a3b:16384", "qwen3-30b-a3b:4096"],
                        metavar="SHAPE:TOKENS")
    parser.add_argument("--rounds", type=int, default=3)
    args = harness.parse_gpu_args(parser, argv)
    cases = harness.parse_cases(parser, args.cases)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    bench_args = argparse.Namespace(rank=16, alpha=32.0, dtype=str(dtype).split(".")[1], warmup=3, repeat=20)
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        cases, args.rounds, bench_args.warmup, bench_args.repeat = [(name, 64) for name, _ in cases[:1]], 1, 0, 1
    rows = []
    try:
        for name, tokens in cases:
            shape = bench_experts.tiny(SHAPES[name]) if args.tiny else SHAPES[name]
            run = bench_experts.build(shape, bench_args, device)
            x, ids, w, grad_out = bench_experts.inputs(shape, 48 if args.tiny else 1024, device, dtype, seed=2)
            reference = None
            for mode, ways in MODES.items():
                set_mode(ways)
                out, params = run("triton", x, ids, w)
                got = [out, *torch.autograd.grad(out, [x, w, *params], grad_out)]
                if reference is None:
                    reference = got
                    continue
                errors = [harness.relative_error(g, r) for g, r in zip(got, reference)]
                print(f"{name} {mode} against measured, rel err of out, dx, dw, LoRA grads: "
                      + " ".join(f"{e:.1e}" for e in errors), flush=True)
            times = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):
                for mode, ways in MODES.items():
                    set_mode(ways)
                    result = bench_experts.bench(run, shape, tokens, "triton", bench_args, device)
                    times[mode].append(result["ms"])
                    rows.append({"shape": name, "tokens": tokens, "mode": mode, "round": round_, **result})
                    print(f"{name:16s} {tokens:6d} round {round_} {mode:10s} {result['ms']:7.3f} ms  "
                          f"host {result.get('host_ms', float('nan')):6.2f}  "
                          f"peak {result.get('peak_gib', float('nan')):.2f} GiB", flush=True)
            for mode, ms in times.items():
                print(f"  {name} {tokens} {mode:10s} median {statistics.median(ms):7.3f} ms, fastest {min(ms):7.3f}")
            del run
            torch.cuda.empty_cache()
    finally:
        set_mode(MEASURED)
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
