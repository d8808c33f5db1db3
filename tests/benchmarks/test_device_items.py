"""benchmarks/device_items.sh: which commands each item runs, what it names its files, and how it fails (python3 and
nvidia-smi replaced by stand-ins, in a scratch checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Stands in for python3: answers the device-name query, records every other call (one line each) and fails those
# that contain $FAIL_ON.
PYTHON = """#!/usr/bin/env bash
if [[ "$*" == *get_device_name* ]]; then echo "NVIDIA H100 80GB HBM3"; exit 0; fi
[[ "$1" == -c ]] && exit 0
echo "$*" >> "$CALLS"
[[ -n "${FAIL_ON:-}" && "$*" == *"$FAIL_ON"* ]] && exit 1
exit 0
"""
KERNEL_TESTS = ["launch", "rotary", "hopper_gemm", "rms_norm", "grouped_gemm", "cross_entropy"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    for name in ("device_items.sh", "device_env.sh"):
        shutil.copy(REPO / "benchmarks" / name, root / "benchmarks")
    (root / "benchmarks" / "results" / "autotune-H100.json").write_text("{}")
    for path in [f"tests/kernels/test_{name}.py" for name in KERNEL_TESTS] + [
            "tests/test_cli.py", "tests/test_adapters.py", "tests/experts/test_gpu.py", "tests/models/test_x.py"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    (stand_ins / "python3").write_text(PYTHON)
    (stand_ins / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.1, 1980, 1980, 700.00 W'\n")
    (stand_ins / "timeout").write_text('#!/usr/bin/env bash\necho "timeout $1" >> "$CALLS"; shift; exec "$@"\n')
    for stand_in in stand_ins.iterdir():
        stand_in.chmod(0o755)
    return root, stand_ins


def run_items(checkout, *items, fail_on=None):
    root, stand_ins = checkout
    calls = root.parent / "calls.txt"
    env = dict(os.environ, PATH=f"{stand_ins}:{os.environ['PATH']}", CALLS=str(calls), OUT=str(root.parent / "out"))
    env.pop("FAIL_ON", None)
    if fail_on:
        env["FAIL_ON"] = fail_on
    result = subprocess.run(["bash", "benchmarks/device_items.sh", *items], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_each_item_runs_its_script_and_names_its_files_by_run_and_gpu(checkout):
    result, calls = run_items(checkout, "90a", "experts", "wgrad", "routing:qwen3-30b-a3b:8:16384", "cut:on",
                              "glm-4.7-flash:64:on:both", "gpt-oss-20b:46:off")
    assert result.returncode == 0, result.stderr
    out = checkout[0].parent / "out"
    experts, wgrad, routing, cut, glm, gpt = calls
    assert experts == f"benchmarks/bench_experts.py --out {out}/experts-run90a-H100.json"
    assert wgrad == f"benchmarks/wgrad_split_ab.py --out {out}/wgrad-split-run90a-H100.json"
    assert routing.startswith("benchmarks/routing_load.py --model qwen3-30b-a3b --layers 8 --seq 16384 --out")
    assert "--layers 8 --seq 16384 32768 --providers moetune" in cut and "--cuda-graph on" in cut
    assert "--optim adamw " in cut and cut.endswith("train-step-cut-graphon-run90a-H100.json")
    assert "--model glm-4.7-flash --seq 8192 --providers baseline moetune" in glm and "--max-memory 64 " in glm
    assert glm.endswith("train-step-glm-whole-8k-graphon-run90a-H100.json")
    assert "--providers moetune --optim adamw_bf16 --step-in-backward" in gpt and "--cuda-graph off" in gpt
    assert gpt.endswith("train-step-gpt-whole-8k-graphoff-run90a-H100.json")
    log = (out / "experts-run90a-H100.log").read_text().splitlines()
    assert log[0].startswith("# run90a, NVIDIA H100 80GB HBM3, 20")


def test_a_switch_runs_both_ways_on_the_issues_blocks(checkout):
    result, calls = run_items(checkout, "91a", "switch:wgrad_stream")
    assert result.returncode == 0, result.stderr
    out = checkout[0].parent / "out"
    assert calls == [f"benchmarks/switch_ab.py --switch wgrad_stream --cases qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 "
                     f"gpt-oss-20b:16384 glm-4.7-flash:16384 --out {out}/switch-wgrad_stream-run91a-H100.json"]


def test_its_switch_names_are_switch_abs(monkeypatch):
    """The script checks a switch item before anything runs, from its own list: the list must be switch_ab.py's."""
    import re

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import switch_ab

    listed = re.search(r'^SWITCHES="([^"]*)"', (REPO / "benchmarks" / "device_items.sh").read_text(), re.M).group(1)
    assert listed.split() == list(switch_ab.SWITCHES)


def test_suite_parts_split_the_kernel_tests_between_them(checkout):
    result, calls = run_items(checkout, "90b", "suite:d:60", "suite:e", "suite:f", "suite:g:500", "suite:c")
    assert result.returncode == 0, result.stderr
    assert calls[::2] == ["timeout 60", "timeout 300", "timeout 300", "timeout 500", "timeout 300"]  # each its limit
    d, e, f, g, c = (call.split() for call in calls[1::2])
    assert d[:7] == ["-m", "pytest", "-q", "-rs", "-m", "gpu", "--durations=3"]
    assert d[7:] == ["tests/kernels/test_launch.py", "tests/kernels/test_rotary.py"]  # those present of part d
    assert e[7:] == ["tests/kernels/test_rms_norm.py", "tests/kernels/test_hopper_gemm.py"]
    # grouped_gemm's every-candidate-config tests are part g's, not f's
    assert f[7:10] == ["-k", "not", "every_candidate_config_in_bf16"]
    assert sorted(f[10:]) == ["tests/kernels/test_cross_entropy.py", "tests/kernels/test_grouped_gemm.py"]
    assert g[7:] == ["-k", "every_candidate_config_in_bf16", "tests/kernels/test_grouped_gemm.py"]
    assert c[7:] == ["tests/experts", "tests/test_adapters.py", "tests/test_cli.py"]


def test_failed_items_are_counted_and_the_later_ones_still_run(checkout):
    result, calls = run_items(checkout, "90c", "wgrad", "experts", "cut:off:adamw_bf16", fail_on="wgrad_split_ab")
    assert result.returncode == 1
    assert [call.split()[0] for call in calls] == ["benchmarks/wgrad_split_ab.py", "benchmarks/bench_experts.py",
                                                   "benchmarks/train_step.py"]


@pytest.mark.parametrize("items, message", [
    (["90d", "experts", "suite:h"], "item 'suite:h': expected suite:b|c|d|e|f|g[:SECONDS]"),
    (["90d", "qwen3-30b-a3b:66:maybe"], "item 'qwen3-30b-a3b:66:maybe': expected suite:"),
    (["90d", "routing:llama:8:16384"], "item 'routing:llama:8:16384': expected routing:MODEL:LAYERS:SEQ"),
    (["90d", "experts:now"], "item 'experts:now': takes no arguments"),
    (["90d", "switch:fast"], "item 'switch:fast': expected switch:NAME, NAME one of direct persistent"),
    (["9 0", "experts"], "RUN: expected letters and digits (e.g. 90a), got '9 0'"),
    (["90d"], "usage: bash benchmarks/device_items.sh RUN ITEM"),
])
def test_a_bad_item_is_refused_in_one_line_before_anything_runs(checkout, items, message):
    result, calls = run_items(checkout, *items)
    assert result.returncode == 2 and calls == []
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1
