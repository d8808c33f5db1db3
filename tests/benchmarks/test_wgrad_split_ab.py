"""benchmarks/wgrad_split_ab.py: split and unsplit LoRA weight gradients agree under each routing, in the interpreter
(timings need a GPU)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wgrad_split_ab.py"
sys.path.insert(0, str(SCRIPT.parent))

import wgrad_split_ab  # noqa: E402

from moetune.experts import plan_routing  # noqa: E402


def test_runs_every_routing_in_the_interpreter(tmp_path):
    out = tmp_path / "wgrad.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--cases", "qwen3-30b-a3b:300", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["cases"]
    assert [row["routing"] for row in rows] == ["even", "zipf", "busy"]
    busy = rows[2]
    assert busy["chunk_rows"] == 256 and busy["busiest_over_mean"] == 16.0  # 300 of 2400 rows: 2 chunks
    assert all(row["ok"] for row in rows)
    assert set(busy["launches"]) == {"dB2", "dA2", "dB1", "dA1"}
    for entry in busy["launches"].values():
        assert entry["bitwise_repeat"] and entry["rel_err_vs_unsplit"] < 1e-5
        assert 0 <= entry["rel_err_split"] < 1e-5 and 0 <= entry["rel_err_unsplit"] < 1e-5  # fp32 against float64


def busy_case():
    shape = dataclasses.replace(wgrad_split_ab.SHAPES["qwen3-30b-a3b"], H=48, I=40)
    gen = torch.Generator().manual_seed(0)
    plan = plan_routing(wgrad_split_ab.routing_ids("busy", shape.E, shape.k, 300, gen), shape.E)
    return shape, plan, gen


def test_expert_sums_is_the_sum_of_outer_products_over_each_experts_rows():
    _, plan, gen = busy_case()
    a, b = torch.randn(plan.num_rows, 3, generator=gen, dtype=torch.float64), \
        torch.randn(plan.num_rows, 5, generator=gen, dtype=torch.float64)
    want = torch.zeros(plan.offsets_E.shape[0], 3, 5, dtype=torch.float64)
    want.index_add_(0, plan.expert_S, torch.einsum("sm,sn->smn", a, b))
    torch.testing.assert_close(wgrad_split_ab.expert_sums(plan, a, b), want)


def test_a_split_launch_less_accurate_than_the_unsplit_one_fails(monkeypatch):
    """The exit code judges both ways against float64: a split result off by more than fp32 rounding is not ok."""
    shape, plan, gen = busy_case()
    module = importlib.import_module("moetune.kernels.grouped_wgrad")
    real = wgrad_split_ab.launches

    def skewed(*args):
        def off_when_split(call):
            return lambda **kw: call(**kw) * (1 + 1e-4) if module.SPLIT_ROWS else call(**kw)

        return {name: (off_when_split(call), reference) for name, (call, reference) in real(*args).items()}

    assert wgrad_split_ab.compare(shape, 300, plan, torch.device("cpu"), torch.float32, gen)["ok"]
    monkeypatch.setattr(wgrad_split_ab, "launches", skewed)
    result = wgrad_split_ab.compare(shape, 300, plan, torch.device("cpu"), torch.float32, gen)
    assert not result["ok"]
    assert all(e["rel_err_split"] > 5e-5 > e["rel_err_unsplit"] for e in result["launches"].values())


def test_needs_a_gpu_without_tiny():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU (or --tiny)" in proc.stderr
