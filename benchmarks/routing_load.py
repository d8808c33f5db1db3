"""How evenly a model routes, layer by layer, and the LoRA weight-gradient launches under its routing.

Builds a model as train_step.py does for moetune (random-initialised, no download; --layers cuts it), runs one
forward over --seq random tokens, and records each MoE layer's rows per expert from its routing plan: the busiest
expert against the mean, the empty experts. Then, for the layers given in --time-layers, times the four LoRA
weight-gradient launches of that layer's backward (wgrad_split_ab.compare: random operands of the shape, the
layer's own routing plan) with the rows split into chunks and not (grouped_wgrad.SPLIT_ROWS), and under even routing
of the same size for comparison, each way against float64 (the exit code: a split launch repeats to the bit and is
no less accurate). Run 86d's one-off form of this found the random-initialised Qwen3-30B-A3B cut sending up to 16x
the mean rows to one expert.

    python benchmarks/routing_load.py --model qwen3-30b-a3b --layers 8 --seq 16384 --out routing.json
    python benchmarks/routing_load.py --tiny --layers 2 --seq 64      # toy widths on CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
import train_step  # noqa: E402
import wgrad_split_ab  # noqa: E402


def record_plans(model, ids) -> list:
    """The routing plan of every MoE layer call of one forward, in call order."""
    import moetune.experts.api as api

    plans, plan_routing = [], api.plan_routing

    def recording(topk_ids, num_experts):
        plan = plan_routing(topk_ids, num_experts)
        plans.append(plan)
        return plan

    api.plan_routing = recording
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        api.plan_routing = plan_routing
    return plans


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(set(train_step.MODELS) & set(harness.SHAPES)))
    parser.add_argument("--layers", type=int, default=8, help="cut the model to this many layers")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--time-layers", nargs="*", type=int, default=[0, 3, 7], metavar="I",
                        help="MoE layers whose routing the wgrad launches are timed under (GPU only)")
    args = harness.parse_gpu_args(parser, argv)
    if args.seq < 1 or args.layers < 1:
        parser.error(f"--seq, --layers: expected positive counts, got {args.seq}, {args.layers}")
    device = torch.device("cpu" if args.tiny else "cuda")
    config = train_step.make_config(args.model, args.layers, args.tiny)
    model = train_step.build_moetune(config, args.model, 16, 32, device)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device=device)
    plans = record_plans(model, ids)
    rows = []
    for i, plan in enumerate(plans):
        row = {"moe_layer": i, **wgrad_split_ab.plan_load(plan)}
        print(f"MoE layer {i}: busiest expert {row['busiest']} of {row['rows']} rows "
              f"({row['busiest_over_mean']:.1f}x the mean), {row['empty_experts']} of {row['experts']} empty",
              flush=True)
        rows.append(row)
    timed = {}
    if device.type == "cuda":  # wgrad_split_ab's comparison, under even routing and under these layers' own
        from moetune.experts import plan_routing

        shape, gen = harness.SHAPES[args.model], torch.Generator().manual_seed(0)
        ids = wgrad_split_ab.routing_ids("even", shape.E, shape.k, args.seq, gen)
        named = {"even": plan_routing(ids.to(device), shape.E)}
        named.update((f"moe_layer_{i}", plans[i]) for i in args.time_layers if i < len(plans))
        for name, plan in named.items():
            timed[name] = wgrad_split_ab.compare(shape, args.seq, plan, device, torch.bfloat16, gen)
            errors = [(e["rel_err_unsplit"], e["rel_err_split"]) for e in timed[name]["launches"].values()]
            print(f"{name}: the four wgrad launches {timed[name]['unsplit_ms']:.3f} ms one program an expert, "
                  f"{timed[name]['split_ms']:.3f} ms split; against float64 at most "
                  f"{max(u for u, _ in errors):.1e} / {max(v for _, v in errors):.1e}", flush=True)
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "layers": rows,
                                      "wgrad": timed})
    return 0 if all(t["ok"] for t in timed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
