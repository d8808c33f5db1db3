"""benchmarks/wgrad_split_ab.py: split and unsplit LoRA weight gradients agree under each routing, in the interpreter
(timings need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wgrad_split_ab.py"


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
    assert all(e["bitwise_repeat"] and e["rel_err_vs_unsplit"] < 1e-5 for e in busy["launches"].values())


def test_needs_a_gpu_without_tiny():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU (or --tiny)" in proc.stderr
