"""benchmarks/compare_unsloth.sh: which processes it starts for VARIANTS (python3 replaced by a recorder)."""

import os
import pathlib
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compare_unsloth.sh"

# Stands in for python3: records its arguments, one line a call, and succeeds.
RECORDER = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
"""


def run_script(tmp_path, variants=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(RECORDER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(tmp_path / "out")}
    env.pop("VARIANTS", None)
    if variants is not None:
        env["VARIANTS"] = variants
    result = subprocess.run(["bash", str(SCRIPT), "8192"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, lines


def scripts_run(lines):
    return [line.split()[0] for line in lines if line.startswith("benchmarks/")]


@pytest.mark.parametrize("variants, expected", [
    ("baseline", ["benchmarks/train_step.py"]),
    ("moetune-auto baseline", ["benchmarks/train_step.py", "benchmarks/train_step.py"]),
    ("unsloth", ["benchmarks/unsloth_step.py"]),
    ("unsloth unsloth-nockpt", ["benchmarks/unsloth_step.py", "benchmarks/unsloth_step.py"]),
])
def test_variants_start_only_their_processes(tmp_path, variants, expected):
    result, lines = run_script(tmp_path, variants)
    assert result.returncode == 0, result.stderr
    assert scripts_run(lines) == expected
    installs = [line for line in lines if line.startswith("-m pip install")]
    assert len(installs) == (1 if "unsloth" in variants else 0)  # Unsloth's wheels only where it runs


def test_the_chosen_variants_get_their_own_arguments(tmp_path):
    _, lines = run_script(tmp_path, "moetune-auto unsloth-nockpt")
    moetune, unsloth = [line for line in lines if line.startswith("benchmarks/")]
    assert "--checkpoint-layers auto" in moetune and "moetune-auto.json" in moetune
    assert "--gradient-checkpointing off" in unsloth and "unsloth-nockpt.json" in unsloth


def test_default_runs_all_six(tmp_path):
    result, lines = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    outs = [line.split("--out ")[1].split()[0] for line in lines if line.startswith("benchmarks/")]
    assert [pathlib.Path(out).stem for out in outs] == ["moetune", "moetune-auto", "moetune-graph", "baseline",
                                                         "unsloth", "unsloth-nockpt"]
    graph = next(line for line in lines if "moetune-graph.json" in line)
    assert "--checkpoint-layers auto" in graph and "--cuda-graph on" in graph
