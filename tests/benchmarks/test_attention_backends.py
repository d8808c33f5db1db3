"""benchmarks/attention_backends.py: one layer's causal attention timed under each SDPA backend (on CPU: the math
backend at toy sizes, and a backend that refuses the inputs recorded as such rather than crashing the run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "attention_backends.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def _tiny_rows(tmp_path, *backends: str) -> list[dict]:
    """The rows of a --tiny run of these backends (CPU)."""
    out = tmp_path / "attention.json"
    proc = _run("--tiny", "--warmup", "1", "--repeat", "2", "--backends", *backends, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_tiny_run_times_every_model_and_records_a_refusing_backend(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU cuDNN may accept the toy inputs")
    rows = _tiny_rows(tmp_path, "math", "cudnn")
    assert {row["model"] for row in rows} == {"glm-4.7-flash", "gpt-oss-20b", "qwen3-30b-a3b"}
    timed = [row for row in rows if row["backend"] == "math"]
    assert len(timed) == 3
    for row in timed:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0  # no order: a loaded CPU times noise
        assert row["forward_tflops"] > 0 and row["backward_tflops"] > 0
    refused = [row for row in rows if row["backend"] == "cudnn"]
    assert len(refused) == 3 and all(row["unsupported"] for row in refused)


def test_flops_count_the_causal_triangle():
    sys.path.insert(0, str(BENCH))
    import attention_backends

    # QK^T (d_qk) and PV (d_v) over half of the T x T scores, 2 FLOPs a multiply-add, per head
    assert attention_backends.attention_flops(seq=4, heads=2, d_qk=8, d_v=16) == 2 * 4 * 4 / 2 * 2 * (8 + 16)


def test_bad_sequence_length_is_a_one_line_error():
    proc = _run("--tiny", "--seq", "0")
    assert proc.returncode == 2 and "--seq" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_tiny_run_times_the_cudnn_sink_path_for_gpt_oss_alone(tmp_path):
    """cudnn-sinks (moetune's causal sink attention; on CPU torch's flash attention for CPU and the sink kernel in
    Triton's interpreter) forward and backward; models without sinks skip the sink backends."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the tiny fp32 run is not cuDNN's dtype")
    rows = _tiny_rows(tmp_path, "math", "cudnn-sinks")
    sink_rows = [row for row in rows if row["backend"] == "cudnn-sinks"]
    assert [row["model"] for row in sink_rows] == ["gpt-oss-20b"]
    assert sink_rows[0]["forward_ms"] > 0 and sink_rows[0]["backward_tflops"] > 0
    assert len([row for row in rows if row["backend"] == "math"]) == 3
