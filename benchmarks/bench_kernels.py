"""Each launch of the triton backend's MoE block timed alone: ms, TFLOP/s, GB/s against the ceilings.

    python benchmarks/bench_kernels.py                                # GPU: Qwen3 and gpt-oss, 16K tokens
    python benchmarks/bench_kernels.py --shapes glm-4.7-flash --tokens 4096 16384
    python benchmarks/bench_kernels.py --kernels path/to/grouped_gemm.py   # another grouped_gemm (wgrad: moetune's)
    python benchmarks/bench_kernels.py --tiny                         # CPU smoke run (TRITON_INTERPRET=1)

The launches are the ones TritonExpertsFunction makes (same arguments; the eight grouped GEMMs in the block's
order, then its four LoRA weight-gradient launches), so the sum is close to the block's kernel time. FLOPs count
the multiply-adds of the launch (base and LoRA products); bytes count each operand read once and each output
written once, the minimum traffic.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import sys

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SHAPES  # noqa: E402

from moetune.experts.activations import GptOssGLU, SwiGLU  # noqa: E402
from moetune.kernels import act_code, grouped_wgrad  # noqa: E402
from moetune.kernels.autotune import _choose  # noqa: E402
from moetune.kernels.grouped_gemm import (  # noqa: E402
    LAUNCH_HOST_MS,
    candidates_for,
    persistent_variants,
    tma_candidates,
)
from moetune.kernels.grouped_wgrad import wgrad_candidates  # noqa: E402

PEAK_TFLOPS = 800.0  # dense bf16 an H100/H200 reaches
PEAK_GBS = 3350.0  # H100 SXM HBM3


def load_kernels(path: str | None):
    if path is None:
        from moetune.kernels import grouped_gemm

        return grouped_gemm
    spec = importlib.util.spec_from_file_location("alt_grouped_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.grouped_gemm


def launches(shape, tokens: int, rank: int, device, dtype, grouped_gemm):
    """[(name, thunk(**kernel_kwargs), flops, bytes, candidates(), way)] for one forward + backward: the block's
    grouped_gemm launches, each LoRA input both ways (way = (input, "own launch" | "in loop"): a launch of its own
    then the GEMM that reads it, or that GEMM with it in its main loop), then the four LoRA weight-gradient
    (grouped_wgrad) launches (way None)."""
    rand, plan, w_S = harness.routed_operands(shape, tokens, device, dtype)
    E, H, I, R = shape.E, shape.H, shape.I, rank
    S = plan.num_rows
    x, d_out = rand(tokens, H, scale=1.0), rand(tokens, H, scale=1.0)
    # moetune's internal layout: gate_up [E, 2I, H], down [E, H, I] (transposed views for gpt-oss cost nothing)
    if shape.transposed:
        gate_up, down = rand(E, H, 2 * I).transpose(1, 2), rand(E, I, H).transpose(1, 2)
    else:
        gate_up, down = rand(E, 2 * I, H), rand(E, H, I)
    b1 = rand(E, 2 * I) if shape.bias else None
    b2 = rand(E, H) if shape.bias else None
    A1, B1, A2, B2 = rand(E, R, H), rand(E, 2 * I, R), rand(E, R, I), rand(E, H, R)
    act = act_code(GptOssGLU() if shape.activation == "gpt_oss" else SwiGLU())
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    su1 = grouped_gemm(x, A1.transpose(1, 2), a_index=plan.token_S, alpha=2.0, **common)
    h, gu = grouped_gemm(x, gate_up.transpose(1, 2), a_index=plan.token_S, lora_u=su1, lora_b=B1.transpose(1, 2),
                         bias=b1, epilogue=1, act=act, interleaved=shape.interleaved, **common)
    su2 = grouped_gemm(h, A2.transpose(1, 2), alpha=2.0, **common)
    sv2 = grouped_gemm(d_out, B2, a_index=plan.token_S, alpha=2.0, **common)
    d_gu, _ = grouped_gemm(d_out, down, a_index=plan.token_S, lora_u=sv2, lora_b=A2, gu=gu, row_scale=w_S,
                           epilogue=2, act=act, interleaved=shape.interleaved, **common)
    sv1 = grouped_gemm(d_gu, B1, alpha=2.0, **common)
    # written by the launches with the LoRA input in their main loop
    su1_out, su2_out, sv2_out, sv1_out = (torch.empty_like(u) for u in (su1, su2, sv2, sv1))
    b = dtype.itemsize if hasattr(dtype, "itemsize") else 2
    mm = lambda m, n, kk: 2.0 * m * n * kk  # noqa: E731
    tma = tma_candidates(device, dtype)

    def gemm(epilogue, n, k, gathered):  # grouped_gemm's candidates for one launch
        return lambda: candidates_for(epilogue, S, E, n, k, tma, gathered)

    def wgrad(m, n):
        return lambda: wgrad_candidates(m, n, S, E)

    wg = dict(num_rows=S, offsets_E=plan.offsets_E)
    # The forward's LoRA inputs su1 and su2 and the backward's sv2 and sv1: by launches of their own then read by the
    # next GEMM, or accumulated in that GEMM's main loop (grouped_gemm's lora_u_weight).
    su1_separate = [
        ("fwd  x@A1 (lora, gather)", lambda **kw: grouped_gemm(x, A1.transpose(1, 2), a_index=plan.token_S, alpha=2.0, **common, **kw),
         mm(S, R, H), b * (S * H + S * R), gemm(0, R, H, True)),
        ("fwd  gate_up + act (gather, lora)", lambda **kw: grouped_gemm(
            x, gate_up.transpose(1, 2), a_index=plan.token_S, lora_u=su1, lora_b=B1.transpose(1, 2), bias=b1,
            epilogue=1, act=act, interleaved=shape.interleaved, **common, **kw),
         mm(S, 2 * I, H + R), b * (S * H + E * 2 * I * H + S * 3 * I), gemm(1, I, H, True)),
    ]
    su1_in_loop = [
        ("fwd  gate_up + act (su1 in loop)", lambda **kw: grouped_gemm(
            x, gate_up.transpose(1, 2), a_index=plan.token_S, lora_u_weight=A1.transpose(1, 2), lora_u_alpha=2.0,
            lora_u_in_loop=True, lora_u_out=su1_out, lora_b=B1.transpose(1, 2), bias=b1, epilogue=1, act=act,
            interleaved=shape.interleaved, **common, **kw),
         mm(S, 2 * I + R, H) + mm(S, 2 * I, R), b * (S * H + E * 2 * I * H + S * 3 * I), gemm(1, I, H, True)),
    ]
    su2_separate = [
        ("fwd  h@A2 (lora)", lambda **kw: grouped_gemm(h, A2.transpose(1, 2), alpha=2.0, **common, **kw),
         mm(S, R, I), b * (S * I + S * R), gemm(0, R, I, False)),
        ("fwd  down (lora, scale, scatter)", lambda **kw: grouped_gemm(
            h, down.transpose(1, 2), lora_u=su2, lora_b=B2.transpose(1, 2), bias=b2, out_index=plan.perm_S,
            row_scale=w_S, **common, **kw),
         mm(S, H, I + R), b * (S * I + E * H * I + S * H), gemm(0, H, I, False)),
    ]
    su2_in_loop = [
        ("fwd  down (su2 in loop, scale, scatter)", lambda **kw: grouped_gemm(
            h, down.transpose(1, 2), lora_u_weight=A2.transpose(1, 2), lora_u_alpha=2.0, lora_u_in_loop=True, lora_u_out=su2_out,
            lora_b=B2.transpose(1, 2), bias=b2, out_index=plan.perm_S, row_scale=w_S, **common, **kw),
         mm(S, H + R, I) + mm(S, H, R), b * (S * I + E * H * I + S * H), gemm(0, H, I, False)),
    ]
    sv2_separate = [
        ("bwd  d_out@B2 (lora, gather)", lambda **kw: grouped_gemm(d_out, B2, a_index=plan.token_S, alpha=2.0, **common, **kw),
         mm(S, R, H), b * (S * H + S * R), gemm(0, R, H, True)),
        ("bwd  down^T + act' (gather, lora, dot)", lambda **kw: grouped_gemm(
            d_out, down, a_index=plan.token_S, lora_u=sv2, lora_b=A2, gu=gu, row_scale=w_S, epilogue=2, act=act,
            interleaved=shape.interleaved, **common, **kw),
         mm(S, I, H + R), b * (S * H + E * H * I + S * 4 * I), gemm(2, I, H, True)),
    ]
    sv2_in_loop = [
        ("bwd  down^T + act' (sv2 in loop, dot)", lambda **kw: grouped_gemm(
            d_out, down, a_index=plan.token_S, lora_u_weight=B2, lora_u_alpha=2.0, lora_u_in_loop=True, lora_u_out=sv2_out, lora_b=A2,
            gu=gu, row_scale=w_S, epilogue=2, act=act, interleaved=shape.interleaved, **common, **kw),
         mm(S, I + R, H) + mm(S, I, R), b * (S * H + E * H * I + S * 4 * I), gemm(2, I, H, True)),
    ]
    sv1_separate = [
        ("bwd  d_gu@B1 (lora)", lambda **kw: grouped_gemm(d_gu, B1, alpha=2.0, **common, **kw),
         mm(S, R, 2 * I), b * (S * 2 * I + S * R), gemm(0, R, 2 * I, False)),
        ("bwd  gate_up^T (lora, scatter)", lambda **kw: grouped_gemm(
            d_gu, gate_up, lora_u=sv1, lora_b=A1, out_index=plan.perm_S, **common, **kw),
         mm(S, H, 2 * I + R), b * (S * 2 * I + E * 2 * I * H + S * H), gemm(0, H, 2 * I, False)),
    ]
    sv1_in_loop = [
        ("bwd  gate_up^T (sv1 in loop, scatter)", lambda **kw: grouped_gemm(
            d_gu, gate_up, lora_u_weight=B1, lora_u_alpha=2.0, lora_u_in_loop=True, lora_u_out=sv1_out, lora_b=A1, out_index=plan.perm_S,
            **common, **kw),
         mm(S, H + R, 2 * I) + mm(S, H, R), b * (S * 2 * I + E * 2 * I * H + S * H), gemm(0, H, 2 * I, False)),
    ]
    # Each LoRA input both ways, tagged (input, way): grouped_gemm runs the faster one (both are timed once when it
    # tunes), so the block's sum counts the faster.
    block = []
    for name, own_launch, in_loop in (("su1", su1_separate, su1_in_loop), ("su2", su2_separate, su2_in_loop),
                                      ("sv2", sv2_separate, sv2_in_loop), ("sv1", sv1_separate, sv1_in_loop)):
        block += [(*row, (name, "own launch")) for row in own_launch] + [(*row, (name, "in loop")) for row in in_loop]
    # The LoRA factor gradients (fp32 [E, ., .] outputs), as the backward calls them.
    return block + [(*row, None) for row in [
        ("bwd  dB2 (wgrad, gather, scale)", lambda **kw: grouped_wgrad(d_out, su2, a_index=plan.token_S, scale=w_S, **wg, **kw),
         mm(S, H, R), b * (S * H + S * R + S) + 4 * E * H * R, wgrad(H, R)),
        ("bwd  dA2 (wgrad, act on load)", lambda **kw: grouped_wgrad(
            sv2, gu, b_act=act, interleaved=shape.interleaved, scale=w_S, **wg, **kw),
         mm(S, R, I), b * (S * R + S * 2 * I + S) + 4 * E * R * I, wgrad(R, I)),
        ("bwd  dB1 (wgrad)", lambda **kw: grouped_wgrad(d_gu, su1, **wg, **kw),
         mm(S, 2 * I, R), b * (S * 2 * I + S * R) + 4 * E * 2 * I * R, wgrad(2 * I, R)),
        ("bwd  dA1 (wgrad, gather)", lambda **kw: grouped_wgrad(sv1, x, b_index=plan.token_S, **wg, **kw),
         mm(S, R, H), b * (S * R + S * H) + 4 * E * R * H, wgrad(R, H)),
    ]]


def time_ms(fn, device, warmup: int = 3, repeat: int = 20) -> float:
    """harness.measure's median on CUDA; on CPU (the interpreter, a smoke run) one call and no timing."""
    if device.type != "cuda":
        fn()
        return float("nan")
    return harness.measure(fn, device, warmup, repeat)["ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "gpt-oss-20b"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kernels", default=None, help="a grouped_gemm.py to time instead of moetune's")
    parser.add_argument("--label", default="current")
    parser.add_argument("--sweep", default=None, metavar="REGEX",
                        help="also time every candidate config of the launches whose name matches")
    parser.add_argument("--persistent", action="store_true",
                        help="with --sweep: also time each grouped_gemm candidate as a persistent kernel (1 and 2 "
                             "programs per SM; moetune's own kernels only)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU through the Triton interpreter")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny)")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    grouped_gemm = load_kernels(args.kernels)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        if args.tiny:
            import dataclasses

            shape = dataclasses.replace(shape, E=4, k=2, H=48, I=40)
        for tokens in (args.tokens if not args.tiny else [37]):
            total, ways = 0.0, {}
            print(f"# {name} {tokens} tokens, rank {args.rank}, {args.label}")
            for label, fn, flops, nbytes, candidates, way in launches(shape, tokens, args.rank, device, dtype,
                                                                      grouped_gemm):
                ms = time_ms(fn, device)
                if args.sweep and re.search(args.sweep, label):
                    configs = candidates()
                    if args.persistent and way is not None:  # a grouped_gemm launch (way None: grouped_wgrad)
                        configs = [v for config in configs for v in persistent_variants(config)]
                    for config in configs:
                        try:
                            cms = time_ms(functools.partial(fn, config=config), device)
                        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                            print(f"    {config}: {type(err).__name__}")
                            continue
                        print(f"    {cms:7.3f} ms  {flops / cms / 1e9:6.0f} TFLOP/s  {config}", flush=True)
                if way is None:
                    total += ms
                else:
                    ways.setdefault(way[0], {}).setdefault(way[1], 0.0)
                    ways[way[0]][way[1]] += ms
                tflops, gbs = flops / ms / 1e9, nbytes / ms / 1e6
                print(f"  {label:40s} {ms:7.3f} ms  {tflops:6.0f} TFLOP/s ({100 * tflops / PEAK_TFLOPS:3.0f}%)  "
                      f"{gbs:6.0f} GB/s ({100 * gbs / PEAK_GBS:3.0f}%)", flush=True)
                rows.append({"shape": name, "tokens": tokens, "launch": label, "ms": ms, "tflops": tflops,
                             "gbs": gbs, "label": args.label, "lora_input": way and "/".join(way)})
            for lora_input, timed in ways.items():  # the way grouped_gemm's rule keeps (in the loop, unless ...)
                kept = _choose([(timed["in loop"], "in loop"), (timed["own launch"], "own launch")], LAUNCH_HOST_MS)
                total += timed[kept]
                print(f"  {lora_input}: " + ", ".join(f"{w} {ms:.3f} ms" for w, ms in timed.items()) + f" -> {kept}")
            print(f"  {'sum (each LoRA input the way kept)':40s} {total:7.3f} ms")
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
