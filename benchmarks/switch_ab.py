"""The triton experts block with one of moetune's launch-time switches off and on, alternating.

Switches (environment variables read at each launch):
- direct: MOETUNE_DIRECT_LAUNCH. moetune/kernels/launch.py hands a repeated launch straight to the compiled kernel
  instead of Triton binding and specialising every argument again (ways "triton" and "direct").
- persistent: MOETUNE_TRITON_PERSISTENT. Autotuning's second step tries its pick as a persistent kernel
  (grouped_gemm.persistent_variants) and keeps it where it measures faster (ways "one_tile" and "persistent").
- gluon: MOETUNE_TRITON_GLUON. On Hopper, autotuning's third step tries hopper_gemm's Gluon kernel for the plain
  GEMMs over sorted rows and keeps it where it measures faster, host time counted (ways "triton" and "gluon").
- sum: the triton backend's SUM_KERNEL (a module flag, not a variable). The sums over k by torch's reduction or by
  kernels/sum_over_k.py (ways "torch" and "kernel"); both sum in fp32 and round once, perhaps in another order, so
  an output may differ in its last bit: required equal within NOT_BITWISE_TOLERANCE (relative, each output and
  gradient), not bitwise. It changes no GEMM launch, so --launches is refused with it.
- wgrad_split: kernels/grouped_wgrad.py's SPLIT_ROWS (a module flag). The LoRA weight gradients with every expert's
  rows in one program, or split into chunks of 2-4x the mean (ways "one_program" and "split"). The cases
  route evenly (harness.make_routing), where the split leaves every expert one chunk: this measures what the split
  costs there (its schedule, counts and binary search); wgrad_split_ab.py measures uneven routings. Compared within
  NOT_BITWISE_TOLERANCE, as an expert past its chunk would sum its partials in another order.
- wgrad_stream: the triton backend's WGRAD_SIDE_STREAM (a module flag; MOETUNE_WGRAD_SIDE_STREAM=1 sets it at
  import). The four LoRA weight-gradient launches of a backward on the block's own stream, or on a second stream
  beside the dx GEMM (ways "one_stream" and "side_stream"); the same kernels in the same order on their stream, so
  bitwise the same.

This times the whole block forward + backward each way in rounds (the lent GPUs drift between calls), with the host
time to issue a step, and with --launches each of the block's kernel launches alone (issued 50 times without a
sync: host time, and time per call with the GPU). Both ways must give bitwise the same outputs and gradients:
checked first, on the cases' own inputs.

    python benchmarks/switch_ab.py --cases qwen3-30b-a3b:4096 gpt-oss-20b:4096 --launches qwen3-30b-a3b:4096
    python benchmarks/switch_ab.py --switch persistent --cases qwen3-30b-a3b:16384 --launches qwen3-30b-a3b:16384
    python benchmarks/switch_ab.py --switch gluon --cases qwen3-30b-a3b:4096 qwen3-30b-a3b:16384
    python benchmarks/switch_ab.py --switch wgrad_stream --cases qwen3-30b-a3b:16384 glm-4.7-flash:16384
    python benchmarks/switch_ab.py --tiny      # toy sizes on CPU through the Triton interpreter (no direct path)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import sys
import time
from unittest import mock

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_experts  # noqa: E402
import bench_kernels  # noqa: E402
import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

SWITCHES = {  # name: (environment variable or module flag, (the way with it "0" / False, the way with it "1" / True))
    "direct": ("MOETUNE_DIRECT_LAUNCH", ("triton", "direct")),
    "persistent": ("MOETUNE_TRITON_PERSISTENT", ("one_tile", "persistent")),
    "gluon": ("MOETUNE_TRITON_GLUON", ("triton", "gluon")),
    "sum": ("moetune.experts.backends.triton.SUM_KERNEL", ("torch", "kernel")),
    "wgrad_split": ("moetune.kernels.grouped_wgrad.SPLIT_ROWS", ("one_program", "split")),
    "wgrad_stream": ("moetune.experts.backends.triton.WGRAD_SIDE_STREAM", ("one_stream", "side_stream")),
}
NOT_BITWISE = {"sum", "wgrad_split"}  # switches whose two ways may round differently
# switches that change no GEMM launch (--launches would time the same launches twice)
SAME_LAUNCHES = NOT_BITWISE | {"wgrad_stream"}
NOT_BITWISE_TOLERANCE = 1e-3  # a last-bit difference in some bf16 elements moves a norm by far less


def ways(args) -> tuple[str, str]:
    return SWITCHES[args.switch][1]


def module_flag(args) -> tuple[object, str] | None:
    """(module, attribute) of a switch that is a module flag; None for an environment variable."""
    variable = SWITCHES[args.switch][0]
    if variable.startswith("MOETUNE_"):
        return None
    module, _, flag = variable.rpartition(".")
    return importlib.import_module(module), flag


def set_way(args, way: str) -> None:
    variable, names = SWITCHES[args.switch]
    flag = module_flag(args)
    if flag is None:
        os.environ[variable] = str(names.index(way))
    else:
        setattr(*flag, bool(names.index(way)))


def block(name: str, tokens: int, args, device, dtype) -> dict:
    shape = bench_experts.tiny(SHAPES[name]) if args.tiny else SHAPES[name]
    run = bench_experts.build(shape, args, device)
    x, ids, w, grad_out = bench_experts.inputs(shape, tokens, device, dtype)

    def step():
        out, params = run("triton", x, ids, w)
        return [out, *torch.autograd.grad(out, [x, w, *params], grad_out)]

    results = {}
    for way in ways(args):
        set_way(args, way)
        step()  # the first call of each launch goes through Triton either way
        results[way] = step()
    equal = all(torch.equal(a, b) for a, b in zip(*results.values()))
    worst = max(harness.relative_error(a, b) for a, b in zip(*results.values()))
    print(f"# {name} {tokens}: outputs and gradients bitwise equal both ways: {equal} (largest relative "
          f"difference {worst:.2e})", flush=True)
    rounds = {way: [] for way in ways(args)}
    for _ in range(args.rounds):
        for way in ways(args):
            set_way(args, way)
            rounds[way].append(harness.measure(step, device, warmup=3, repeat=args.repeat))
    row = {"shape": name, "tokens": tokens, "bitwise_equal": equal, "largest_relative_difference": worst}
    for way in ways(args):
        row[way] = {key: [r[key] for r in rounds[way]] for key in rounds[way][0]}
        if device.type == "cuda":
            print(f"{name:<16}{tokens:>7}  {way:<7} ms {[round(r['ms'], 3) for r in rounds[way]]}"
                  f"  host ms {[round(r['host_ms'], 3) for r in rounds[way]]}", flush=True)
    if device.type == "cuda":
        row["median_ms"] = {way: statistics.median(row[way]["ms"]) for way in ways(args)}
        row["median_host_ms"] = {way: statistics.median(row[way]["host_ms"]) for way in ways(args)}
    return row


def launch_host_times(name: str, tokens: int, args, device, dtype, calls: int = 50) -> list[dict]:
    """Per launch of the block (bench_kernels.launches, each LoRA input both ways): host time to issue one call
    and time per call with the GPU (issued `calls` times, then a sync), each way; and the second way with the
    launch's first candidate config (`first`: the heuristic one, never through TMA) instead of the tuned one, which
    tells what a tuned TMA config costs the host (its descriptors are encoded at every launch)."""
    shape = SHAPES[name]
    grouped_gemm = bench_kernels.load_kernels(None)
    rows = []
    for label, tuned, _, _, candidates, _ in bench_kernels.launches(shape, tokens, args.rank, device, dtype,
                                                                    grouped_gemm):
        row = {"launch": label}
        off, on = ways(args)
        for way in (off, on, "first"):
            set_way(args, on if way == "first" else way)
            fn = functools.partial(tuned, config=candidates()[0]) if way == "first" else tuned
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            issued = time.perf_counter()
            torch.cuda.synchronize()
            done = time.perf_counter()
            row[way] = {"host_us": (issued - start) / calls * 1e6, "with_gpu_us": (done - start) / calls * 1e6}
        print(f"{label:<42} host us: {off} {row[off]['host_us']:6.1f}  {on} {row[on]['host_us']:6.1f}"
              f"   with the GPU: {row[off]['with_gpu_us']:6.1f} / {row[on]['with_gpu_us']:6.1f}"
              f"   untuned first config, {on}: host {row['first']['host_us']:6.1f}, with the GPU {row['first']['with_gpu_us']:6.1f}",
              flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=list(SWITCHES), default="direct")
    parser.add_argument("--cases", nargs="+", default=["qwen3-30b-a3b:4096"], metavar="SHAPE:TOKENS")
    parser.add_argument("--launches", nargs="*", default=[], metavar="SHAPE:TOKENS",
                        help="also the host time of each launch of these cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    args = harness.parse_gpu_args(parser, argv)
    cases = harness.parse_cases(parser, args.cases)
    launch_cases = harness.parse_cases(parser, args.launches, "--launches")
    if launch_cases and args.switch in SAME_LAUNCHES:
        parser.error(f"--launches: the {args.switch!r} switch changes no GEMM launch; time its blocks (--cases)")
    if args.tiny:
        cases, launch_cases, args.rounds, args.repeat = [(name, 37) for name, _ in cases], [], 1, 1
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    args.dtype = str(dtype).removeprefix("torch.")
    flag = module_flag(args)
    before = None if flag is None else getattr(*flag)
    try:
        with mock.patch.dict(os.environ):  # set_way's setting ends with the run
            blocks = [block(name, tokens, args, device, dtype) for name, tokens in cases]
            launches = {f"{name}:{tokens}": launch_host_times(name, tokens, args, device, dtype)
                        for name, tokens in launch_cases}
    finally:  # a module flag too, even if a case raised
        if flag is not None:
            setattr(*flag, before)
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "switch": SWITCHES[args.switch][0], "rounds": args.rounds,
                                      "repeat": args.repeat, "blocks": blocks, "launches": launches})
    if args.switch in NOT_BITWISE:
        return 0 if all(row["largest_relative_difference"] <= NOT_BITWISE_TOLERANCE for row in blocks) else 1
    return 0 if all(row["bitwise_equal"] for row in blocks) else 1


if __name__ == "__main__":
    sys.exit(main())
