"""The whole-model benchmark runs end to end at toy widths for each benchmarked model, from a checkpoint
on disk, and both providers train the same model (same first loss); its plot script draws the result;
the per-launch kernel benchmark runs under the interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b", "glm-4.7-flash"])
def test_tiny_whole_model_step_from_a_checkpoint(model, tmp_path):
    out = tmp_path / "step.json"
    _run(str(BENCH / "train_step.py"), "--tiny", "--model", model, "--layers", "2", "--seq", "32",
         "--warmup", "1", "--steps", "1", "--checkpoint", str(tmp_path / "ckpt"), "--profile", "moetune",
         "--out", str(out))
    assert (tmp_path / "ckpt" / "config.json").is_file()
    rows = {row["provider"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"moetune", "baseline"}
    moetune, baseline = rows["moetune"], rows["baseline"]
    assert moetune["trainable_params"] == baseline["trainable_params"] > 0
    assert abs(moetune["losses"][0] - baseline["losses"][0]) < 1e-4, (moetune["losses"], baseline["losses"])
    assert moetune["tokens_per_s"] > 0 and "groups_ms" in moetune["profile"]

    png = tmp_path / "step.png"
    _run(str(BENCH / "plot_train_step.py"), str(png), str(out))
    assert png.stat().st_size > 10_000


def test_kernel_benchmark_runs_in_the_interpreter():
    proc = _run(str(BENCH / "bench_kernels.py"), "--tiny", "--shapes", "qwen3-30b-a3b", "--sweep", "fwd  down")
    assert proc.stdout.count("ms") > 8 and "SPLIT" not in proc.stdout  # the plain launch's candidates only
