"""Host time of a moetune training step, measured on a CPU: the work a GPU waits for when a step is host-bound.

A whole Qwen3-30B-A3B step at 8K tokens waits on its host on the H200s lent so far (NOTES runs 51-52): Python,
torch's dispatcher and autograd, checkpoint hooks and kernel launches, which hardly depend on the tensors' sizes. Here
the model runs at toy width on one CPU thread, through the code paths a GPU takes:

- Triton's interpreter with every kernel body skipped: moetune's wrappers around each launch run, the kernel's
  arithmetic does not, so outputs are garbage and losses meaningless. Not measured, as they differ under the
  interpreter: the launch itself (launch.py's direct path and Triton's argument binding; on an H200's host about a
  third of a block's host time, run 49a), autotune's cache lookups (the interpreter takes the first config) and the
  TMA and Gluon branches. A percentage saved here therefore overstates the same saving on a GPU's host;
- the CUDA path's choices: fused norms, rotary and router top-k (--fused-router off: transformers' router), and
  the routing plan by the counting sort. The sort's and the router's kernels are skipped too,
  so after their host code a valid plan and valid experts are written into their outputs by torch, untimed;
- the optimizer stepped in backward (AdamWBf16 in chunks), every layer checkpointed, as `moetune train` runs;
- the GPU's dtypes: a bf16 model with fp32 LoRA factors, cast for each call (--dtype float32: no casts), and the
  LoRA weight gradients' one GEMM with an fp32 result (CUDA's torch.mm out_dtype; here a Python kernel for CPU
  stands in, counted as the one op, its own inner ops unseen).

A step's wall time is then host time, with the CPU's own small GEMMs and attention in it. Absolute figures are not a
GPU host's; use it to compare two versions of the code, in one process where possible (two processes of the same
code on the 2-core development machine measured 4.35 and 4.73 ms a layer, session 19).

    python benchmarks/host_cost.py                 # ms a step and a layer, launches a layer
    python benchmarks/host_cost.py --profile 40    # and cProfile's top 40 functions by own time
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import os
import pstats
import statistics
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["MOETUNE_MOE_BACKEND"] = "triton"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

launches: collections.Counter = collections.Counter()
untimed = [0.0]  # seconds spent making valid routing plans and router outputs, subtracted from the steps


def skip_kernel_bodies() -> None:
    """Every interpreted launch only counts itself."""
    from triton.runtime import interpreter

    def run(self, *args, grid, warmup, **kwargs):
        launches[self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = run


def take_the_cuda_path() -> None:
    """Fused rotary, the counting sort and the router's top-k, as on a GPU (the fused norms already run under the
    interpreter)."""
    from moetune.experts import routing
    from moetune.kernels import expert_sort

    torch.cuda.is_available = lambda: True  # FastMoEModel installs the fused rotary on CUDA only
    torch._assert_async = lambda *args, **kwargs: None  # the plan's id check reads the skipped sort's output
    from moetune.kernels.grouped_gemm import TILE_BLOCKS, remember_tile_schedule

    counting = expert_sort.sort_into

    def sort(ids, num_experts, out):
        counting(ids, num_experts, out)  # its host work, kernels skipped
        start = time.perf_counter()
        plan = routing.torch_sorted_plan(ids, num_experts)
        values = (plan.perm_S, plan.inv_perm_S, plan.token_S, plan.expert_S, plan.counts_E, plan.offsets_E)
        for tensor, value in zip(out, values):  # into the plan's buffer
            tensor.copy_(value)
        counts, tile_ends = out[4], out[6]  # and the tile schedules the skipped scatter kernel writes
        for row, block_m in zip(tile_ends, TILE_BLOCKS):
            row[:num_experts].copy_(torch.cumsum((counts + block_m - 1) // block_m, 0))
        remember_tile_schedule(counts, tile_ends[:, :num_experts])  # as sort_into (the copies above renewed counts)
        untimed[0] += time.perf_counter() - start
        return out[:6]

    routing._checking_sort = lambda ids, num_experts: (sort, len(TILE_BLOCKS)) if ids.numel() else None

    # The interpreter refuses bf16 for its unreliable arithmetic, which is skipped here: bf16 takes fp32's answer.
    from moetune.experts.backends import triton as triton_backend

    interpreted = triton_backend.probe
    triton_backend.probe = functools.lru_cache(maxsize=None)(
        lambda device_type, index, dtype: interpreted(device_type, index, torch.float32 if dtype == torch.bfloat16
                                                      else dtype))
    from moetune.kernels import sum_over_k

    sum_over_k.CPU_DTYPES = (*sum_over_k.CPU_DTYPES, torch.bfloat16)  # the sum kernel's own refusal, likewise

    # lora_linear's LoRA weight gradients: on CUDA one GEMM with an fp32 result (aten::mm.dtype), which has no CPU
    # kernel; one here, so that the CPU's casts of its operands are not counted as the GPU path's.
    global _mm_dtype_library
    _mm_dtype_library = torch.library.Library("aten", "IMPL")
    _mm_dtype_library.impl("mm.dtype", lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)), "CPU")
    from moetune import lora_groups, lora_linear
    from moetune.experts import routing
    from moetune.models import fast_routers

    def mm_fp32(a, b):  # fp32_matmul.mm_fp32's CUDA branch, taken by every module that imported it
        return a @ b if a.dtype == b.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)

    for module in (lora_linear, lora_groups, routing, fast_routers):
        module.mm_fp32 = mm_fp32

    from moetune.kernels import router_topk

    fused_router = router_topk._forward

    def router(logits, top_k, normalize, out_dtype):
        weights, ids = fused_router(logits, top_k, normalize, out_dtype)  # its host work, kernel skipped
        start = time.perf_counter()
        values, chosen = torch.topk(logits.detach().float(), top_k, dim=-1)  # valid experts for the plan
        ids.copy_(chosen)
        weights.copy_(torch.softmax(values, dim=-1))
        untimed[0] += time.perf_counter() - start
        return weights, ids

    router_topk._forward = router

    from moetune.kernels import sigmoid_router_topk

    fused_sigmoid = sigmoid_router_topk._forward

    def sigmoid_router(logits, bias, top_k, num_groups, topk_groups, normalize, scale):
        weights, ids = fused_sigmoid(logits, bias, top_k, num_groups, topk_groups, normalize, scale)  # kernel skipped
        start = time.perf_counter()
        scores = logits.detach().float().sigmoid()
        ids.copy_(torch.topk(scores + bias, top_k, dim=-1).indices)  # valid experts for the plan (groups aside)
        weights.copy_(scores.gather(1, ids) * scale)
        untimed[0] += time.perf_counter() - start
        return weights, ids

    sigmoid_router_topk._forward = sigmoid_router


_mm_dtype_library = None  # take_the_cuda_path's CPU kernel for aten::mm.dtype, registered while this lives


def build(layers: int, seq: int, source: str, fused_router: bool = True, model_name: str = "qwen3-30b-a3b",
          dtype: torch.dtype = torch.bfloat16):
    import train_step

    train_step.DTYPE["cpu"] = dtype  # the model's dtype (train_step's CPU default is float32)

    from moetune.training.bf16_adamw import AdamWBf16
    from moetune.training.step_in_backward import StepInBackward

    config = train_step.make_config(model_name, layers, tiny=True)
    device = torch.device("cpu")
    train_step.save_checkpoint(config, source, device)  # the real loading path, as train_step.py
    model = train_step.build_moetune(source, model_name, 16, 32, device, offload=False, fused_router=fused_router)
    model.train()
    optimizer = StepInBackward([p for p in model.parameters() if p.requires_grad], AdamWBf16, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    return model, optimizer, ids, train_step.training_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a train_step.py model name, at toy width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps a round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="then profile 5 steps")
    parser.add_argument("--fused-router", default="on", choices=["on", "off"], help="the router's fused top-k")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the model's dtype (bfloat16, as on a GPU: the LoRA factors stay fp32 and are cast)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the skipped kernels leave their outputs uninitialised: no slow denormal math
    torch.manual_seed(0)
    skip_kernel_bodies()
    take_the_cuda_path()
    with tempfile.TemporaryDirectory(prefix="moetune-host-cost-") as source:
        return measure(args, *build(args.layers, args.seq, source, args.fused_router == "on", args.model,
                                    getattr(torch, args.dtype)))


def measure(args, model, optimizer, ids, step) -> int:
    for _ in range(3):  # warm-up: autotune's cache lookups, first-call imports
        step(model, optimizer, ids)
    rounds = []
    launches.clear()
    for _ in range(args.rounds):
        untimed[0] = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            step(model, optimizer, ids)
        rounds.append((time.perf_counter() - start - untimed[0]) / args.steps * 1e3)
    per_layer = {name: count / (args.rounds * args.steps * args.layers) for name, count in launches.items()}
    print(f"{args.layers} layers, {args.seq} tokens: {statistics.median(rounds):.2f} ms a step median "
          f"(min {min(rounds):.2f}), {statistics.median(rounds) / args.layers:.2f} ms a layer")
    print("Triton launches a layer and step:", {name: round(n, 2) for name, n in sorted(per_layer.items())})
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            step(model, optimizer, ids)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
