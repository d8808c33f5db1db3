"""Compile the router top-k kernels for sm90 on any machine, GPU or not, and print each case's registers and spills as
ptxas reports them while Triton compiles: one JSON line per (experts, top_k, kernel).

    python tests/kernels/compile_router_topk.py

The cases are the routers moetune's models have (8 to 256 experts, and MAX_E), at top-k 1 to 8 and 4096 tokens. The
launches are router_topk's own, recorded on CPU tensors and compiled as compile_for_arch.py compiles the experts'
(with the specialisations Triton's launcher makes); the registers are those of Triton's own ptxas run (its bundled
ptxas-blackwell and options), read from its log.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CASES = [(8, 2), (32, 4), (60, 4), (60, 8), (64, 8), (128, 8), (256, 8), (1024, 8)]  # mixtral ... MAX_E
TOKENS = 4096


def ptxas_available() -> bool:
    """Whether this Triton has the NVIDIA backend and the ptxas it compiles sm90 with."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return False
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return os.path.exists(get_ptxas(90).path)
    except RuntimeError:  # no ptxas found
        return False


def ptxas_report(kernel, args, kwargs) -> dict:
    """Registers and spilled bytes of one recorded launch compiled for sm90, from Triton's ptxas log."""
    import triton
    from compile_for_arch import compile_call

    nvidia, compilation = triton.knobs.nvidia, triton.knobs.compilation
    settings = nvidia.dump_ptxas_log, compilation.always_compile
    log = io.StringIO()
    try:
        nvidia.dump_ptxas_log, compilation.always_compile = True, True  # a cached kernel would run no ptxas
        with contextlib.redirect_stdout(log):
            compile_call(kernel, args, kwargs, 90)
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = settings
    report = log.getvalue()
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spilled": int(re.search(r"(\d+) bytes spill stores", report).group(1))}


def main() -> int:
    from compile_for_arch import Recorder

    from moetune.kernels import router_topk as rt

    kernels = {"forward": rt.router_topk_forward_kernel, "backward": rt.router_topk_backward_kernel}
    recorders = {name: Recorder() for name in kernels}
    rt.router_topk_forward_kernel, rt.router_topk_backward_kernel = recorders["forward"], recorders["backward"]
    try:
        for experts, top_k in CASES:
            logits = torch.zeros(TOKENS, experts, dtype=torch.bfloat16)
            weights, ids = rt._forward(logits, top_k, True, torch.bfloat16)
            rt._backward(weights, logits, ids, False)
            for name, kernel in kernels.items():
                (args, kwargs), = recorders[name].calls
                recorders[name].calls.clear()
                print(json.dumps(dict(experts=experts, top_k=top_k, kernel=name, **ptxas_report(kernel, args, kwargs))),
                      flush=True)
    finally:
        rt.router_topk_forward_kernel, rt.router_topk_backward_kernel = kernels["forward"], kernels["backward"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
