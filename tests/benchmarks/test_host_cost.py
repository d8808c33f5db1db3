"""benchmarks/host_cost.py on the CPU it is made for: a step of the GPU's code path with the kernels' bodies skipped.
It patches torch and Triton process-wide, so it runs in a child process."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_cost.py"


@pytest.mark.parametrize("router", [["--fused-router", "off"], []], ids=["transformers-router", "fused-router"])
def test_one_layer_step_counts_the_gpu_paths_launches(router):
    pytest.importorskip("triton")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--steps", "1", "--rounds", "2", *router],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = re.search(r"1 layers, 32 tokens: ([\d.]+) ms a step median .min ([\d.]+)\), ([\d.]+) ms a layer",
                       proc.stdout)
    assert timing and 0 < float(timing.group(2)) <= float(timing.group(1)), proc.stdout
    launches = ast.literal_eval(proc.stdout.split("Triton launches a layer and step: ", 1)[1].splitlines()[0])
    # The CUDA path's kernels: the counting sort (forward and recompute), fused rotary and norms, the experts'.
    for name in ("block_counts_kernel", "scatter_kernel", "rotary_kernel", "rms_norm_forward_kernel",
                 "grouped_gemm_kernel", "grouped_wgrad_kernel", "adamw_kernel"):
        assert launches.get(name, 0) > 0, (name, launches)
    assert launches["block_counts_kernel"] == 2.0  # one plan in forward, one in the recompute
    # The fused router (the default): forward and recompute, and backward (the tiny model's one MoE layer)
    expected = {} if router else {"router_topk_forward_kernel": 2.0, "router_topk_backward_kernel": 1.0}
    assert {k: v for k, v in launches.items() if k.startswith("router_topk")} == expected
