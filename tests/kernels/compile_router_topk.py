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
# The sigmoid routers (experts, top_k, groups, topk_groups): GLM-4.7-Flash, GLM-4.5, DeepSeek-V3, MAX_E in groups
SIGMOID_CASES = [(64, 4, 1, 1), (160, 8, 1, 1), (256, 8, 8, 4), (1024, 8, 64, 8)]
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


def _recorded(module, names: tuple[str, str], run) -> list[tuple[str, dict]]:
    """(kernel name, ptxas report) of the forward and backward launches `run()` makes with module's two kernels."""
    from compile_for_arch import Recorder

    kernels = {name: getattr(module, name) for name in names}
    recorders = {name: Recorder() for name in names}
    for name in names:
        setattr(module, name, recorders[name])
    try:
        run()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    reports = []
    for label, name in zip(("forward", "backward"), names):
        (args, kwargs), = recorders[name].calls
        reports.append((label, ptxas_report(kernels[name], args, kwargs)))
    return reports


def sigmoid_main() -> None:
    from moetune.kernels import sigmoid_router_topk as sr

    for experts, top_k, groups, topk_groups in SIGMOID_CASES:
        logits = torch.zeros(TOKENS, experts, dtype=torch.float32)  # transformers' fp32 router logits
        bias = torch.zeros(experts, dtype=torch.float32)

        def run(logits=logits, bias=bias, routing=(top_k, groups, topk_groups)):
            weights, ids = sr._forward(logits, bias, *routing, True, 2.5)
            sr._backward(weights, logits, ids, True, 2.5)

        for label, report in _recorded(sr, ("sigmoid_topk_forward_kernel", "sigmoid_topk_backward_kernel"), run):
            print(json.dumps(dict(experts=experts, top_k=top_k, groups=groups, kernel=f"sigmoid {label}", **report)),
                  flush=True)


def main() -> int:
    from moetune.kernels import router_topk as rt

    for experts, top_k in CASES:
        logits = torch.zeros(TOKENS, experts, dtype=torch.bfloat16)

        def run(logits=logits, top_k=top_k):
            weights, ids = rt._forward(logits, top_k, True, torch.bfloat16)
            rt._backward(weights, logits, ids, False)

        for label, report in _recorded(rt, ("router_topk_forward_kernel", "router_topk_backward_kernel"), run):
            print(json.dumps(dict(experts=experts, top_k=top_k, kernel=label, **report)), flush=True)
    sigmoid_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
