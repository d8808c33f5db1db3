"""Whole training steps replayed from one CUDA graph against the same steps run eagerly: what the host costs a step.

A prototype for issue #6's host-bound steps (NOTES, session 29: the capture-readiness audit). Whole-model steps wait
on their host on most machines lent so far (~600-1,100 ms of Python, autograd, checkpoint hooks and ~7,500 launches
a whole Qwen3-30B-A3B step at 8K); a step captured once and replayed costs the host one call. This script measures
that gap on one model, before any of moetune's own code is changed for capture:

- the model as train_step.py builds it for moetune (every layer checkpointed, or --checkpoint-layers N), without
  offloaded checkpoints (its side-stream copies keep their blocks for the capture's whole length, NOTES session 29);
- torch's fused AdamW with `capturable=True` and its learning rate in a GPU tensor, stepped after backward, instead of
  moetune's AdamWBf16 in backward (whose step counts, bias corrections and learning rate are host numbers that a
  replay would repeat); or, `--optim none`, forward and backward alone: a whole model then fits as the step in
  backward fits it (its gradients, 2.4 GiB for Qwen3-30B-A3B, in place of bf16 AdamW's states), and the optimizer's
  kernels are a few ms of a step either way;
- while capturing, transformers' mask functions are told the batch is not packed (what they decide eagerly for it)
  and not to treat the capture as tracing: otherwise they build an explicit [T, T] mask, which turns off the causal
  flash path, and the captured step is not the eager one. The checkpoints do not preserve RNG state (no layer of
  these models draws random numbers).

It runs --warmup eager steps, times --steps eager steps, checks the graph against an eager step with the learning rate
at 0 (the parameters stay put, so the two losses must agree; without an optimizer they stay put anyway), then times
--steps replays (learning rate back on).
Peak memory of each phase from torch.cuda.max_memory_allocated (the graph's private pool included).

    python benchmarks/cuda_graph_step.py --model qwen3-30b-a3b --layers 8 --seq 8192
    python benchmarks/cuda_graph_step.py --model qwen3-30b-a3b --layers 48 --optim none      # the whole model
    python benchmarks/cuda_graph_step.py --tiny --layers 2 --seq 64         # a quick check of the capture
    python benchmarks/cuda_graph_step.py --dry-run --layers 2 --seq 32      # CPU: the eager path and the patches
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
import torch  # noqa: E402
import train_step  # noqa: E402

from moetune.training.cuda_graph import capture_step, eager_masks, without_rng_state  # noqa: E402

LR = 1e-4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(train_step.MODELS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--checkpoint-layers", type=int, default=None, help="default: every layer checkpointed")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "none"],
                        help="adamw: torch's fused capturable AdamW after backward; none: forward and backward only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the same architecture at toy width (train_step.py's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU at toy width: the eager steps, the patched step in place of the capture")
    parser.add_argument("--out", default=None, help="JSON path (default: results/cuda-graph-step-<model>-...json)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("cuda_graph_step.py: needs a CUDA GPU (or --dry-run on a CPU)", file=sys.stderr)
        return 2
    for name in ("layers", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    config = train_step.make_config(args.model, args.layers, tiny=args.tiny or args.dry_run)
    # random weights built where they live, from the config, as train_step.py does without --checkpoint
    model = train_step.build_moetune(config, args.model, args.rank, args.alpha, device, offload=False,
                                     checkpoint_layers=args.checkpoint_layers)
    model.train()
    without_rng_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = torch.tensor(LR, device=device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=cuda, capturable=cuda, foreach=False) \
        if args.optim == "adamw" else NoOptimizer(params)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen).to(device)  # the graph's static input

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    def eager_step() -> torch.Tensor:
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        eager_step()
    reset_peak(device)
    eager_times, eager_host, eager_losses = timed(eager_step, args.steps, device)
    eager_peak = peak_gib(device)

    lr.fill_(0.0)  # the check: parameters stay put, so an eager step and a replay see the same model
    check_eager = eager_step()
    reset_peak(device)
    replay = capture(step, optimizer, device)
    check_graph = replay()
    lr.fill_(LR)
    graph_times, graph_host, graph_losses = timed(replay, args.steps, device)
    graph_peak = peak_gib(device)

    tokens = args.seq
    result = {
        "model": args.model, "layers": args.layers, "seq": args.seq, "rank": args.rank,
        "checkpoint_layers": args.checkpoint_layers, "optim": args.optim, "tiny": args.tiny or args.dry_run,
        "dry_run": args.dry_run,
        "trainable_params": sum(p.numel() for p in params),
        "eager": phase(eager_times, eager_host, eager_losses, eager_peak, tokens),
        "graph": phase(graph_times, graph_host, graph_losses, graph_peak, tokens),
        "check_loss_eager": float(check_eager), "check_loss_graph": float(check_graph),
        "check_equal": bool(torch.equal(check_eager, check_graph)),
        "environment": harness.environment(),
    }
    result["speedup"] = result["eager"]["step_s"] / result["graph"]["step_s"]
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"cuda-graph-step-{args.model}-{args.layers}layers-{args.seq}{'-tiny' if args.tiny else ''}"
        f"{'-dry' if args.dry_run else ''}.json")
    harness.write_json(out, result)
    print(f"eager {result['eager']['step_s'] * 1e3:.1f} ms a step ({result['eager']['tokens_per_s']:,.0f} tok/s, host "
          f"{result['eager']['host_s'] * 1e3:.1f} ms, peak {eager_peak} GiB); graph "
          f"{result['graph']['step_s'] * 1e3:.1f} ms ({result['graph']['tokens_per_s']:,.0f} tok/s, peak {graph_peak} "
          f"GiB): {result['speedup']:.2f}x; check losses {result['check_loss_eager']:.6f} / "
          f"{result['check_loss_graph']:.6f} ({'equal' if result['check_equal'] else 'DIFFER'}); {out}")
    return 0


class NoOptimizer:
    """--optim none: a step is forward and backward; the gradients are dropped after each eager step."""

    def __init__(self, params):
        self.params = params

    def step(self):
        pass

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


def capture(step, optimizer, device):
    """replay() -> the loss: the step recorded by moetune.training.cuda_graph.capture_step, each run ending with the
    gradients dropped. On a CPU (--dry-run) the patched step runs eagerly in place of a replay."""
    def run() -> torch.Tensor:
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type != "cuda":
        def patched() -> torch.Tensor:
            with eager_masks():
                return run()

        return patched
    return capture_step(run)


def timed(run, steps: int, device) -> tuple[list[float], list[float], list[float]]:
    """Seconds a step (CUDA events around it, each step synchronised), seconds to queue it, and its losses."""
    times, host, losses = [], [], []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            loss = run()
            host.append(time.perf_counter() - t0)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = run()
            host.append(time.perf_counter() - t0)
            times.append(host[-1])
        losses.append(float(loss))
    return times, host, losses


def phase(times, host, losses, peak, tokens) -> dict:
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times_s": times, "host_s": statistics.median(host), "tokens_per_s": tokens / step_s,
            "losses": losses, "peak_gib": peak}


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


if __name__ == "__main__":
    sys.exit(main())
