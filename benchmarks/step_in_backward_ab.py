"""The optimizer step inside the backward pass against the usual step, alternating on one model in one process.

Whole-model step times drift by 10-40% within one call on the lent GPUs (NOTES runs 42-44), more than the effect
measured here, so the two settings take turns on the same model: rounds x (usual, in backward), each a fresh
optimizer with a warm-up, then timed steps with their peak memory. The model is train_step.py's (random init on
the device, LoRA r=16 on q/k/v/o + experts, every layer checkpointed).

    python benchmarks/step_in_backward_ab.py --layers 8 --seq 8192 --rounds 3 --out results/x.json
    python benchmarks/step_in_backward_ab.py --tiny      # toy widths on CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import train_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=list(train_step.MODELS))
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw_8bit"])
    parser.add_argument("--tiny", action="store_true", help="toy widths (runs on CPU, fp32): checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("needs a CUDA GPU (or --tiny)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = train_step.make_config(args.model, args.layers, args.tiny)
    seq = 64 if args.tiny else args.seq
    torch.manual_seed(0)
    model = train_step.build_moetune(config, args.model, 16, 32, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    env = harness.environment()
    print(f"# {env['device']}  torch {env['torch']}  {args.model} x{config.num_hidden_layers} seq {seq}", flush=True)
    rows = []
    for round_ in range(args.rounds):
        for in_backward in (False, True):
            optimizer = train_step.make_optimizer(params, args.optim, in_backward)
            times, losses, _, _ = train_step.time_steps(model, optimizer, ids, args.warmup, args.steps, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            if in_backward:
                optimizer.remove_hooks()
            del optimizer
            gc.collect()
            rows.append({"round": round_, "step_in_backward": in_backward, "step_times_s": times,
                         "step_s": statistics.median(times), "tokens_per_s": seq / statistics.median(times),
                         "peak_gib": peak, "losses": losses})
            print(f"round {round_} step_in_backward={in_backward}: {rows[-1]['tokens_per_s']:.0f} tok/s, "
                  f"steps {[round(t * 1e3) for t in times]} ms, peak {peak or 0:.2f} GiB", flush=True)
    for in_backward in (False, True):
        mine = [r for r in rows if r["step_in_backward"] == in_backward]
        fastest = min(t for r in mine for t in r["step_times_s"])
        print(f"step_in_backward={in_backward}: fastest step {fastest * 1e3:.0f} ms, median of the rounds' medians "
              f"{statistics.median(r['step_s'] for r in mine) * 1e3:.0f} ms", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"step-in-backward-ab-{'tiny-' if args.tiny else ''}{args.model}.json")
    harness.write_json(out, {"environment": env, "args": vars(args), "trainable_params": sum(p.numel() for p in params),
                             "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
