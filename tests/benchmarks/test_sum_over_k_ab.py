"""benchmarks/sum_over_k_ab.py: each case's kernel against a sequential fp32 sum and torch's, in the interpreter (timings
need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sum_over_k_ab.py"


def test_runs_every_case_in_the_interpreter(tmp_path):
    out = tmp_path / "sum.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--cases", "qwen3-30b-a3b:5", "gpt-oss-20b:5",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["cases"]
    assert [(row["shape"], row["K"]) for row in rows] == [("qwen3-30b-a3b", 8), ("gpt-oss-20b", 4)]
    assert all(row["bitwise_equal_sequential"] for row in rows)  # the kernel's own arithmetic, the exit code
    assert all(row["tile"]["block_h"] == 128 for row in rows)  # H = 96: the default 2048 capped at its power of 2


def test_needs_a_gpu_without_tiny():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU (or --tiny)" in proc.stderr
