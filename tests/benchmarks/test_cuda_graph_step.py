"""benchmarks/cuda_graph_step.py: whole steps replayed from a CUDA graph against eager ones (the capture on a GPU;
on a CPU the eager path and the mask patches a capture needs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "cuda_graph_step.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_without_a_gpu_it_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run("--steps", "1")
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("optim", ["adamw", "none"])
def test_dry_run_writes_both_phases_and_the_check(tmp_path, optim):
    out = tmp_path / "graph.json"
    proc = _run("--dry-run", "--layers", "2", "--seq", "32", "--warmup", "1", "--steps", "2", "--optim", optim,
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["tiny"] and result["check_equal"] and result["optim"] == optim
    for name in ("eager", "graph"):
        assert len(result[name]["losses"]) == 2 and result[name]["step_s"] > 0
    assert result["environment"]["torch"] == torch.__version__


@pytest.mark.gpu
@pytest.mark.parametrize("optim", ["adamw", "none"])
def test_a_tiny_step_captured_and_replayed_matches_eager(tmp_path, optim):
    out = tmp_path / "graph.json"
    proc = _run("--tiny", "--layers", "2", "--seq", "256", "--steps", "3", "--optim", optim, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check_equal"], (result["check_loss_eager"], result["check_loss_graph"])
    assert result["graph"]["host_s"] < result["eager"]["host_s"]
