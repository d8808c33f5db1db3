"""Compile the experts' Triton launches for an NVIDIA architecture on any machine, GPU or not, and print the
shared memory each needs: one JSON line per launch.

    python tests/kernels/compile_for_arch.py 86 bfloat16     # compute capability, dtype
    MOETUNE_TRITON_TMA=1 python tests/kernels/compile_for_arch.py 90 bfloat16 all   # every candidate, TMA ones too
    python tests/kernels/compile_for_arch.py 86 bfloat16 rank=128     # LoRA rank (default 16)

Each launch is the config it runs with untuned (the first candidate, or with `all` every candidate autotuning may
pick: every launch below MIN_TUNE_ROWS rows, and the
one autotuning tries first), at the widths of Qwen3-30B-A3B (concat gate/up) and gpt-oss-20b (interleaved, bias).
The host functions run on CPU tensors with the kernels swapped for a recorder, so the arguments are exactly what a
GPU launch passes; the compiler gets them with the specialisations Triton's launcher would make (pointers and
multiples of 16 marked divisible by 16, integers equal to 1 as constants), which decide its software pipelining and
so its shared memory. A script, not a test: the suite runs Triton's interpreter on CPU (TRITON_INTERPRET=1), under
which kernels are interpreted, not compiled.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_call(kernel, args, kwargs, capability: int):
    """triton.compile of one recorded call for sm<capability>; returns its metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip([p.name for p in kernel.params], args), **kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif type(value).__name__ == "TensorDescriptor":
            signature[param.name] = f"tensordesc<{TYPES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>"
        else:
            raise TypeError(f"{param.name}: no signature type for {type(value).__name__}")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options).metadata


MODELS = (  # name, E, H, I, top-k, tokens, interleaved gate/up, biases
    ("qwen3", 128, 2048, 768, 8, 4096, False, False),
    ("gpt-oss", 32, 2880, 2880, 4, 4096, True, True),
)


def launches(dtype, rank: int = 16):
    """(name, thunk) for every grouped_gemm / grouped_wgrad launch of one experts forward + backward, each LoRA input
    both ways (by a launch of its own, and in the main loop of the GEMM that reads it)."""
    for model in MODELS:
        yield from _model_launches(dtype, rank, *model)


def _model_launches(dtype, R, model, E, H, I, k, T, interleaved, bias):
    from moetune.experts import GptOssGLU, SwiGLU, plan_routing
    from moetune.kernels import act_code, grouped_gemm, grouped_wgrad

    gen = torch.Generator().manual_seed(0)
    plan = plan_routing(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]), E)
    S = plan.num_rows

    def z(*shape):
        return torch.zeros(*shape, dtype=dtype)

    x, d_out, w, u = z(T, H), z(T, H), z(S), z(S, R)
    gate_up, down = z(E, 2 * I, H), z(E, H, I)
    b1, b2 = (z(E, 2 * I), z(E, H)) if bias else (None, None)
    A1, B1, A2, B2 = z(E, R, H), z(E, 2 * I, R), z(E, R, I), z(E, H, R)
    h, gu, d_gu = z(S, I), z(S, 2 * I), z(S, 2 * I)
    act = act_code(GptOssGLU() if interleaved else SwiGLU())
    c = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    wg = dict(num_rows=S, offsets_E=plan.offsets_E)
    return [
        (f"{model} x@A1", lambda: grouped_gemm(x, A1.transpose(1, 2), a_index=plan.token_S, **c)),
        (f"{model} gate_up fwd", lambda: grouped_gemm(x, gate_up.transpose(1, 2), a_index=plan.token_S, lora_u=u,
                                                      lora_b=B1.transpose(1, 2), bias=b1, epilogue=1, act=act,
                                                      interleaved=interleaved, **c)),
        (f"{model} gate_up fwd, su1 in loop", lambda: grouped_gemm(
            x, gate_up.transpose(1, 2), a_index=plan.token_S, lora_u_weight=A1.transpose(1, 2), lora_u_out=u,
            lora_u_in_loop=True, lora_b=B1.transpose(1, 2), bias=b1, epilogue=1, act=act, interleaved=interleaved,
            **c)),
        (f"{model} h@A2", lambda: grouped_gemm(h, A2.transpose(1, 2), **c)),
        (f"{model} down fwd", lambda: grouped_gemm(h, down.transpose(1, 2), lora_u=u, lora_b=B2.transpose(1, 2),
                                                   bias=b2, out_index=plan.perm_S, row_scale=w, **c)),
        (f"{model} down fwd, su2 in loop", lambda: grouped_gemm(
            h, down.transpose(1, 2), lora_u_weight=A2.transpose(1, 2), lora_u_out=u, lora_u_in_loop=True,
            lora_b=B2.transpose(1, 2), bias=b2, out_index=plan.perm_S, row_scale=w, **c)),
        (f"{model} d_out@B2", lambda: grouped_gemm(d_out, B2, a_index=plan.token_S, **c)),
        (f"{model} down bwd act'", lambda: grouped_gemm(d_out, down, a_index=plan.token_S, lora_u=u, lora_b=A2,
                                                        gu=gu, row_scale=w, epilogue=2, act=act,
                                                        interleaved=interleaved, **c)),
        (f"{model} down bwd act', sv2 in loop", lambda: grouped_gemm(
            d_out, down, a_index=plan.token_S, lora_u_weight=B2, lora_u_out=u, lora_u_in_loop=True, lora_b=A2, gu=gu,
            row_scale=w, epilogue=2, act=act, interleaved=interleaved, **c)),
        (f"{model} d_gu@B1", lambda: grouped_gemm(d_gu, B1, **c)),
        (f"{model} gate_up dgrad", lambda: grouped_gemm(d_gu, gate_up, lora_u=u, lora_b=A1, out_index=plan.perm_S,
                                                        **c)),
        (f"{model} gate_up dgrad, sv1 in loop", lambda: grouped_gemm(
            d_gu, gate_up, lora_u_weight=B1, lora_u_out=u, lora_u_in_loop=True, lora_b=A1, out_index=plan.perm_S,
            **c)),
        (f"{model} dB2", lambda: grouped_wgrad(d_out, u, a_index=plan.token_S, scale=w, **wg)),
        (f"{model} dA2", lambda: grouped_wgrad(u, gu, b_act=act, interleaved=interleaved, scale=w, **wg)),
        (f"{model} dB1", lambda: grouped_wgrad(d_gu, u, **wg)),
        (f"{model} dA1", lambda: grouped_wgrad(u, x, b_index=plan.token_S, **wg)),
    ]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    capability, dtype, every = int(argv[0]), getattr(torch, argv[1]), "all" in argv[2:]
    rank = int(next((arg.split("=", 1)[1] for arg in argv[2:] if arg.startswith("rank=")), 16))
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels are not compiled")
    modules = [importlib.import_module(f"moetune.kernels.{name}") for name in ("grouped_gemm", "grouped_wgrad")]
    kernels = {module: getattr(module, f"{module.__name__.rsplit('.', 1)[1]}_kernel") for module in modules}
    recorders = {module: Recorder() for module in modules}
    for module, recorder in recorders.items():
        setattr(module, f"{module.__name__.rsplit('.', 1)[1]}_kernel", recorder)
    pointwise = modules[0].gated_backward_kernel  # the split activation gradient's second launch: not compiled here
    modules[0].gated_backward_kernel = Recorder()
    schedule = modules[1].chunk_schedule_kernel  # the wgrad's chunk schedule (one program over E counts): not either
    modules[1].chunk_schedule_kernel = Recorder()
    autotune = importlib.import_module("moetune.kernels.autotune")
    pick, choice, offered = autotune.pick, [0], [1]

    def pick_one(name, key, candidates, launch, device, num_rows, **_):  # the candidate asked for, not a timed one
        offered[0] = len(candidates)
        return candidates[min(choice[0], len(candidates) - 1)]

    autotune.pick = pick_one
    try:
        for name, launch in launches(dtype, rank):
            choice[0] = 0
            while choice[0] < (offered[0] if every else 1):
                modules[0].forget_decisions()  # grouped_gemm would otherwise keep the first candidate it was given
                launch()
                ((module, recorder),) = [(m, r) for m, r in recorders.items() if r.calls]
                (args, kwargs), = recorder.calls[-1:]
                recorder.calls.clear()
                meta = compile_call(kernels[module], args, kwargs, capability)
                config = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "num_", "A_TMA", "B_TMA"))}
                print(json.dumps({"launch": name, "shared": meta.shared, "config": config}), flush=True)
                choice[0] += 1
    finally:
        autotune.pick = pick
        modules[0].gated_backward_kernel = pointwise
        modules[1].chunk_schedule_kernel = schedule
        for module, kernel in kernels.items():
            setattr(module, f"{module.__name__.rsplit('.', 1)[1]}_kernel", kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
