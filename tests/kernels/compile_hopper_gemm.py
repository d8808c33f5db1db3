"""Compile hopper_gemm's Gluon kernel for sm90 on any machine, GPU or not, as sorted_gemm would launch it, and print
each variant's shared memory: one JSON line per case.

    python tests/kernels/compile_hopper_gemm.py            # the cases test_hopper_gemm.py checks
    python tests/kernels/compile_hopper_gemm.py all        # every config too

sorted_gemm runs on CPU tensors with its launch swapped for a recorder, so the kernel gets exactly the arguments and
constexprs (R_PAD, the layouts, U_IN_LOOP) a GPU launch passes; the compiler gets pointers as 16-byte aligned and
integers that are multiples of 16 marked so, as Triton's launcher specialises them. A script, not a test: the suite
runs Triton's interpreter on CPU, and Gluon kernels are never interpreted.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}
SM90_SHARED = 232448  # bytes per block (opt-in maximum), compute capability 9.0


def record_launch(**operands) -> tuple:
    """(kernel, args, kwargs) of the one launch sorted_gemm(**operands) makes."""
    from moetune.kernels import hopper_gemm

    calls = []
    launch = hopper_gemm.launch_kernel
    hopper_gemm.launch_kernel = lambda kernel, grid, *args, **kwargs: calls.append((kernel, args, kwargs))
    try:
        hopper_gemm.sorted_gemm(**operands)
    finally:
        hopper_gemm.launch_kernel = launch
    (call,) = calls
    return call


def compile_launch(kernel, args, kwargs):
    """triton.compile of the recorded launch for sm90a; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps"), "maxnreg": kwargs.pop("maxnreg")}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def operands(rank: int, b_mode: int, ua_mode: int | None, E=8, K=256, N=512, S=1024):
    """sorted_gemm's arguments on CPU: b in weight layout b_mode, LB in b's, UA in ua_mode (None: U given)."""
    bf16 = dict(dtype=torch.bfloat16)
    counts = torch.full((E,), S // E, dtype=torch.int32)

    def weight(rows, cols, mode):  # an [E, rows, cols] operand in layout `mode` (1: transposed, 2: contiguous)
        return torch.empty(E, cols, rows, **bf16).transpose(1, 2) if mode == 1 else torch.empty(E, rows, cols, **bf16)

    return dict(a=torch.empty(S, K, **bf16), b=weight(K, N, b_mode), offsets_E=counts.cumsum(0).to(torch.int32),
                counts_E=counts, num_rows=S, lora_u=torch.empty(S, rank, **bf16), lora_b=weight(rank, N, b_mode),
                lora_u_weight=None if ua_mode is None else weight(K, rank, ua_mode), lora_u_alpha=2.0,
                out_index=torch.arange(S, dtype=torch.int32), row_scale=torch.empty(S, **bf16))


def cases(every_config: bool):
    from moetune.kernels.hopper_gemm import CONFIGS

    for config in range(len(CONFIGS)) if every_config else (0,):
        for rank in (8, 16, 32, 48, 64):
            for b_mode, ua_mode in ((1, None), (2, None), (1, 1), (2, 2), (1, 2), (2, 1)):
                yield dict(config=config, rank=rank, b_mode=b_mode, ua_mode=ua_mode)


def main(argv: list[str]) -> int:
    from moetune.kernels.hopper_gemm import CONFIGS, gluon

    if gluon is None:
        print("triton without Gluon", file=sys.stderr)
        return 1
    for case in cases("all" in argv):
        kernel, args, kwargs = record_launch(**operands(case["rank"], case["b_mode"], case["ua_mode"]),
                                             config=CONFIGS[case["config"]])
        compiled = compile_launch(kernel, args, kwargs)
        print(json.dumps(dict(case, R_PAD=kwargs["R_PAD"], shared=compiled.metadata.shared,
                              fits=compiled.metadata.shared <= SM90_SHARED)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
