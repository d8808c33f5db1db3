"""The Gluon warp-specialised sorted-rows GEMM (moetune/kernels/hopper_gemm.py) against grouped_gemm (Triton), same
launch, same process: the down projection forward and gate_up's dgrad of the triton backend, each config, checked
against grouped_gemm's output and a float64 reference of three experts; torch._grouped_mm (CUTLASS, no LoRA, no
scatter) timed beside them for the plain product's speed.

    python benchmarks/hopper_gemm_ab.py --cases qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 glm-4.7-flash:16384
    python benchmarks/hopper_gemm_ab.py --in-loop ...   # the LoRA input accumulated in the main loop (both kernels)

--in-loop: each launch also computes its LoRA input U = 2 * A @ UA[e] in its main loop (grouped_gemm's lora_u_weight,
as the triton backend's tuned ways mostly run them) and writes it out; U is checked against float64 too.
grouped_gemm is the Triton side here: MOETUNE_TRITON_GLUON is cleared, so its tuning cannot pick the Gluon kernel.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

from moetune.kernels import grouped_gemm  # noqa: E402
from moetune.kernels.hopper_gemm import CONFIGS, sorted_gemm, sorted_gemm_supported  # noqa: E402


def launches(shape, tokens: int, rank: int, device):
    """{name: (a, b, lora_u, lora_b, out_index, row_scale, flops)} for the two plain GEMMs over sorted rows."""
    rand, plan, w_S = harness.routed_operands(shape, tokens, device, torch.bfloat16)
    E, H, I, R = shape.E, shape.H, shape.I, rank
    S = plan.num_rows
    h, d_gu = rand(S, I, scale=1.0), rand(S, 2 * I, scale=1.0)
    down, gate_up = rand(E, H, I), rand(E, 2 * I, H)
    su2, sv1 = rand(S, R, scale=1.0), rand(S, R, scale=1.0)
    B2, A1 = rand(E, H, R), rand(E, R, H)
    A2, B1 = rand(E, R, I), rand(E, 2 * I, R)  # the factors that make su2 and sv1 (in-loop: UA, as the backend's views)
    mm = lambda m, n, k: 2.0 * m * n * k  # noqa: E731
    return plan, {
        "fwd  down (lora, scale, scatter)": (h, down.transpose(1, 2), su2, B2.transpose(1, 2), plan.perm_S, w_S,
                                             mm(S, H, I + R), A2.transpose(1, 2), mm(S, R, I)),
        "bwd  gate_up^T (lora, scatter)": (d_gu, gate_up, sv1, A1, plan.perm_S, None, mm(S, H, 2 * I + R), B1,
                                           mm(S, R, 2 * I)),
    }


def reference(a, b, lora_u, lora_b, out_index, row_scale, plan, experts=(0, 1, 2)):
    """float64 rows of the first experts, at their output rows: {out row: value}."""
    ends = plan.offsets_E.tolist()
    rows, values = [], []
    for e in experts:
        lo, hi = (ends[e - 1] if e else 0), ends[e]
        if hi == lo:
            continue
        v = a[lo:hi].double() @ b[e].double() + lora_u[lo:hi].double() @ lora_b[e].double()
        if row_scale is not None:
            v = v * row_scale[lo:hi].double()[:, None]
        rows.append(out_index[lo:hi] if out_index is not None else torch.arange(lo, hi, device=a.device))
        values.append(v)
    return torch.cat(rows), torch.cat(values)


def u_reference(a, ua, plan, alpha: float, experts: int = 3) -> tuple[int, torch.Tensor]:
    """(end row, float64 U = alpha * a @ ua[e] of the sorted rows before it): the first experts' rows."""
    ends = [0] + plan.offsets_E.tolist()
    end = ends[min(experts, len(ends) - 1)]
    values = [alpha * (a[ends[e]:ends[e + 1]].double() @ ua[e].double()) for e in range(min(experts, len(ends) - 1))]
    return end, torch.cat(values)


def plot(rows: list[dict], path: str) -> None:
    """Bars per case and launch: grouped_gemm (Triton), torch._grouped_mm (CUTLASS, no LoRA, no scatter) and the
    fastest sorted_gemm config, in TFLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["case"], r["launch"].split("(")[0].strip()) for r in rows))
    series = {"grouped_gemm (triton)": [], "torch._grouped_mm (no lora/scatter)": [], "sorted_gemm (gluon), best": []}
    for case, launch in groups:
        mine = [r for r in rows if r["case"] == case and r["launch"].split("(")[0].strip() == launch]
        for name in list(series)[:2]:
            series[name].append(max([r["tflops"] for r in mine if r["impl"] == name], default=0.0))
        series["sorted_gemm (gluon), best"].append(
            max([r["tflops"] for r in mine if r["impl"].startswith("sorted_gemm")], default=0.0))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + (i - 1) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), [f"{c}\n{launch}" for c, launch in groups], fontsize=7)
    ax.set_ylabel("TFLOP/s (bf16)")
    ax.set_title("Plain GEMMs over expert-sorted rows, LoRA r=16 (H200)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["qwen3-30b-a3b:16384", "qwen3-30b-a3b:4096"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--configs", default=None, help="comma-separated indices into hopper_gemm.CONFIGS")
    parser.add_argument("--in-loop", action="store_true", help="the LoRA input computed in the main loop (lora_u_weight)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.pop("MOETUNE_TRITON_GLUON", None)  # grouped_gemm stays Triton's (its tuning could pick the Gluon kernel)
    cases = harness.parse_cases(parser, args.cases)
    device = torch.device("cuda")
    picks = range(len(CONFIGS)) if args.configs is None else [int(i) for i in args.configs.split(",")]
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    rows = []
    for name, tokens in cases:
        shape = harness.SHAPES[name]
        plan, todo = launches(shape, tokens, args.rank, device)
        common = dict(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
        for launch, (a, b, u, lb, out_index, row_scale, flops, ua, u_flops) in todo.items():
            loop = dict(lora_u_weight=ua, lora_u_alpha=2.0) if args.in_loop else {}
            plain_flops = flops  # torch._grouped_mm computes neither U nor the LoRA term
            if args.in_loop:  # u is now the buffer both kernels write U into
                flops += u_flops
                launch += ", U in loop"
                u = torch.full_like(u, float("nan"))
            why = sorted_gemm_supported(a, b, u, lb, lora_u_weight=ua if args.in_loop else None)
            triton_fn = functools.partial(grouped_gemm, a, b, lora_b=lb, out_index=out_index, row_scale=row_scale,
                                          **(dict(loop, lora_u_out=u, lora_u_in_loop=True) if args.in_loop
                                             else dict(lora_u=u)), **common)
            base = triton_fn()
            u_base = u.clone()
            ref_rows, ref = reference(a, b, u_base, lb, out_index, row_scale, plan)  # C from the U written
            ms = bench(triton_fn)
            line = dict(case=f"{name}:{tokens}", launch=launch, impl="grouped_gemm (triton)", ms=ms,
                        tflops=flops / ms / 1e9, err_ref=rel(base[ref_rows], ref))
            if args.in_loop:
                end, u_ref = u_reference(a, ua, plan, 2.0)
                line["err_u_ref"] = rel(u_base[:end], u_ref)
            rows.append(line)
            print(f"{line['case']:<22} {launch:<34} {line['impl']:<40} {ms:7.3f} ms {line['tflops']:5.0f} TFLOP/s "
                  f"err {line['err_ref']:.1e}" + (f" U err {line['err_u_ref']:.1e}" if args.in_loop else ""),
                  flush=True)
            offs = plan.offsets_E.to(torch.int32)
            try:
                gm = functools.partial(torch._grouped_mm, a, b, offs=offs)
                ms = bench(gm)
                print(f"{'':<22} {launch:<34} {'torch._grouped_mm (no lora/scatter)':<40} {ms:7.3f} ms "
                      f"{plain_flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
                rows.append(dict(case=f"{name}:{tokens}", launch=launch, impl="torch._grouped_mm (no lora/scatter)",
                                 ms=ms, tflops=plain_flops / ms / 1e9))
            except Exception as error:  # noqa: BLE001
                print(f"    torch._grouped_mm: {type(error).__name__}: {str(error)[:200]}", flush=True)
            if why:
                print(f"    sorted_gemm: not supported: {why}", flush=True)
                continue
            for i in picks:
                config = CONFIGS[i]
                out = torch.full_like(base, float("nan"))
                if args.in_loop:
                    u.fill_(float("nan"))
                fn = functools.partial(sorted_gemm, a, b, lora_u=u, lora_b=lb, out=out, out_index=out_index,
                                       row_scale=row_scale, config=config, **loop, **common)
                try:
                    fn()
                    torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001
                    print(f"    config {i} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                written = bool(torch.isfinite(out).all()) and bool(torch.isfinite(u).all())
                err_triton = rel(out, base.double())
                err_u = None
                if args.in_loop:
                    err_triton = max(err_triton, rel(u, u_base.double()))
                    err_u = rel(u[:end], u_ref)
                err_ref = rel(out[ref_rows], ref)
                ms = bench(fn)
                line = dict(case=f"{name}:{tokens}", launch=launch, impl=f"sorted_gemm config {i}", config=config,
                            ms=ms, tflops=flops / ms / 1e9, err_ref=err_ref, err_vs_triton=err_triton,
                            all_written=written, **({"err_u_ref": err_u} if args.in_loop else {}))
                rows.append(line)
                print(f"{'':<22} {launch:<34} {line['impl']:<40} {ms:7.3f} ms {line['tflops']:5.0f} TFLOP/s "
                      f"err {err_ref:.1e} vs triton {err_triton:.1e} written {written}"
                      + (f" U err {err_u:.1e}" if args.in_loop else ""), flush=True)
    if args.out:
        harness.write_json(args.out, dict(environment=harness.environment(), rows=rows))
        plot(rows, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
