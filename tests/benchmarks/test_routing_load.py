"""benchmarks/routing_load.py: each MoE layer's load from a forward of a tiny model (timings need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "routing_load.py"


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "glm-4.7-flash"])
def test_records_every_moe_layer_of_a_forward(tmp_path, model):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--model", model, "--layers", "2", "--seq", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    layers = result["layers"]
    assert [row["moe_layer"] for row in layers] == list(range(len(layers))) and layers
    for row in layers:
        assert row["rows"] % 64 == 0 and row["busiest"] <= 64  # a token routes at most once to an expert
        assert row["busiest_over_mean"] == pytest.approx(row["busiest"] / (row["rows"] / row["experts"]))
        assert 0 <= row["empty_experts"] < row["experts"]
    assert result["wgrad"] == {}  # timings only on a GPU


def test_bad_sizes_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--seq", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--seq, --layers: expected positive counts, got 0, 8" in proc.stderr
