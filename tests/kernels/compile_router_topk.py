"""Compile the router top-k kernels for sm90 on any machine, GPU or not, and print each case's registers and spills as
ptxas reports them: one JSON line per (experts, top_k, kernel).

    python tests/kernels/compile_router_topk.py

The cases are the routers moetune's models have (8 to 256 experts, and MAX_E), at top-k 1 to 8, launched as
router_topk launches them (E and the blocks constexpr; pointers marked 16-byte aligned as Triton's launcher does).
Needs Triton's NVIDIA backend and its bundled ptxas (ptxas-blackwell: the PTX of Triton 3.9 is too new for the
older ptxas beside it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CASES = [(8, 2), (32, 4), (60, 4), (60, 8), (64, 8), (128, 8), (256, 8), (1024, 8)]  # mixtral ... MAX_E


def ptxas() -> str | None:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def compile_sm90(kernel, pointers: dict, constants: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
        else:
            signature[name] = pointers.get(name, "i32")
            if name in pointers:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spilled": int(re.search(r"(\d+) bytes spill stores", report).group(1))}


def main() -> int:
    from moetune.kernels import router_topk as rt
    from moetune.kernels.sizes import next_power_of_2

    for experts, top_k in CASES:
        block_t, block_e = rt._blocks(experts)
        blocks = dict(E=experts, TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e)
        forward = compile_sm90(rt.router_topk_forward_kernel,
                               dict(logits_ptr="*bf16", weights_ptr="*bf16", ids_ptr="*i64"),
                               dict(blocks, K_PAD=next_power_of_2(top_k), NORMALIZE=True))
        backward = compile_sm90(rt.router_topk_backward_kernel,
                                dict(logits_ptr="*bf16", ids_ptr="*i64", grad_ptr="*bf16", grad_logits_ptr="*bf16"),
                                dict(blocks, NORMALIZE=False))
        for kernel, result in (("forward", forward), ("backward", backward)):
            print(json.dumps(dict(experts=experts, top_k=top_k, kernel=kernel, **result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
