"""benchmarks/host_calls.py: host time per call of the training step's frequent torch calls (GPU only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_calls.py"


def test_without_a_gpu_it_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_every_call_is_timed_and_written(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "3", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and all(0 < row["p20_us"] <= row["host_us"] <= row["p80_us"] for row in rows)
