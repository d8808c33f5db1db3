"""benchmarks/device_env.sh, sourced at the start of each device call: PYTHONPATH and the autotune cache, run here
with a stand-in nvidia-smi."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_h100_gets_the_h100_picks_and_the_checkout_on_its_path(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "device_env.sh", tmp_path / "benchmarks")
    (tmp_path / "benchmarks" / "results" / "autotune-H100.json").write_text('{"NVIDIA H100 80GB HBM3|k": 1}')
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.1, 1980, 1980, 700.00 W'\n")
    (stand_in / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{stand_in}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", "source benchmarks/device_env.sh && echo \"$PYTHONPATH|$MOETUNE_CACHE_DIR\""],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, cache = out.stdout.strip().splitlines()[-1].split("|")
    assert path.split(":")[0] == str(tmp_path) and cache == str(tmp_path / ".autotune")
    assert (tmp_path / ".autotune" / "autotune.json").read_text() == '{"NVIDIA H100 80GB HBM3|k": 1}'
