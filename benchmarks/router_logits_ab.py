"""The sigmoid routers' fp32 Linear: transformers' fp32 GEMM against moetune's bf16 tensor-core path, one process.

One router call forward and backward (the input gradient; the router frozen) at a model's router shape, each way
timed with harness.measure and its GPU busy time from a profile of 20 steps queued back to back (a slow host
makes the timed step host-bound: run 68), then the two ways' logits and input gradients against float64. GLM-4.7-Flash and
DeepSeek-V3-style routers (models/fast_routers.py, _Bf16RouterLogits) compute these logits in fp32 from bf16 inputs.

    python benchmarks/router_logits_ab.py --tokens 8192 16384 --out results/router-logits-ab.json
    python benchmarks/router_logits_ab.py --tiny      # toy sizes on CPU: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import block_timing  # noqa: E402
import harness  # noqa: E402

from moetune.models import fast_routers  # noqa: E402

# (hidden size, routed experts) of the published configs
PROFILED = 20  # steps in the profile that gives the GPU busy time
SHAPES = {"glm-4.7-flash": (2048, 64), "deepseek-v3": (7168, 256), "glm-4.5-air": (4096, 128)}


def errors(x, weight, g, on: bool) -> dict:
    """Relative errors (Frobenius) of one way's logits and input gradient against float64."""
    fast_routers.TENSOR_CORE_LOGITS = on
    xi = x.detach().requires_grad_()
    logits = fast_routers._router_logits(xi, weight)
    logits.backward(g)
    exact = x.double() @ weight.double().t()
    return {"logits_error": harness.relative_error(logits, exact),
            "grad_error": harness.relative_error(xi.grad, g.double() @ weight.double())}


def _router_step(x, weight, g):
    """One router Linear forward and input-gradient backward, the way fast_routers.TENSOR_CORE_LOGITS says."""

    def step():
        fast_routers._router_logits(x, weight).backward(g)
        x.grad = None

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="glm-4.7-flash", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU: checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("needs a CUDA GPU (or --tiny)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, experts = (64, 8) if args.tiny else SHAPES[args.shape]
    tokens_list = [17] if args.tiny else args.tokens
    env = harness.environment()
    print(f"# {env['device']}  torch {env['torch']}  {args.shape} router {hidden} -> {experts}", flush=True)
    rows = []
    for tokens in tokens_list:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
        weight = (torch.randn(experts, hidden, generator=gen) * 0.02).to(device, torch.bfloat16)
        g = torch.randn(tokens, experts, generator=gen).to(device)
        step = _router_step(x.clone().requires_grad_(), weight, g)
        for on in (False, True, False, True):  # alternating: the second pair checks the first
            fast_routers.TENSOR_CORE_LOGITS = on
            result = harness.measure(step, device, args.warmup, args.repeat)
            if device.type == "cuda":
                busy = block_timing.busy_per_step(step, PROFILED)
                result.update(gpu_busy_us=busy["busy_ms"] * 1e3, gpu_ops=busy["gpu_ops"])
            row = {"tokens": tokens, "way": "bf16 tensor cores" if on else "fp32 (transformers)", **result,
                   **errors(x, weight, g, on)}
            rows.append(row)
            print(f"{tokens:6d} {row['way']:20s} {row['ms'] * 1e3:8.1f} us (queued {row.get('queued_ms', 0) * 1e3:7.1f},"
                  f" GPU busy {row.get('gpu_busy_us', 0):6.1f} in {row.get('gpu_ops', 0):.0f} ops)"
                  f"  logits err {row['logits_error']:.1e}  grad err {row['grad_error']:.1e}", flush=True)
    fast_routers.TENSOR_CORE_LOGITS = True
    if args.out:
        harness.write_json(args.out, {"environment": env, "machine": harness.machine(), "args": vars(args),
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
