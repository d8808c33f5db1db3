"""The experts benchmark runs end to end, and its providers compute the same function.

At toy sizes of each benchmarked architecture, in fp32, moetune (reading the LoRA factors
PEFT created) must agree with transformers' grouped_mm experts + PEFT target_parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_experts.py"


def test_tiny_run_agrees_with_transformers_peft(tmp_path):
    out = tmp_path / "experts.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--dtype", "float32", "--tokens", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["checks"]) == {"tiny-qwen3-30b-a3b", "tiny-gpt-oss-20b", "tiny-glm-4.7-flash"}
    for shape, errors in result["checks"].items():
        assert set(errors) >= {"grouped_mm", "native"}
        for backend, err in errors.items():
            assert err["out"] < 1e-5 and err["dx"] < 1e-5, (shape, backend, err)
    providers = {(row["shape"], row["provider"]) for row in result["rows"] if "ms" in row}
    assert ("tiny-qwen3-30b-a3b", "baseline") in providers and ("tiny-gpt-oss-20b", "grouped_mm") in providers
    assert result["environment"]["torch"]


def test_lora_input_ab_runs_every_way_in_the_interpreter(tmp_path):
    """benchmarks/lora_input_ab.py: the measured way and both forced ways give the same block, each timed."""
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("lora_input_ab.py")), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line.split("grads: ")[1].split() for line in proc.stdout.splitlines() if "rel err of" in line]
    assert len(errors) == 2 and all(float(e) < 1e-5 for line in errors for e in line)  # forced ways vs measured
    rows = json.loads(out.read_text())["rows"]
    assert sorted(row["mode"] for row in rows) == ["in loop", "measured", "own launch"]


SWITCHED = {"direct": "MOETUNE_DIRECT_LAUNCH", "persistent": "MOETUNE_TRITON_PERSISTENT",
            "sum": "moetune.experts.backends.triton.SUM_KERNEL",
            "wgrad_split": "moetune.kernels.grouped_wgrad.SPLIT_ROWS",
            "wgrad_stream": "moetune.experts.backends.triton.WGRAD_SIDE_STREAM"}


@pytest.mark.parametrize("switch, ways", [("direct", ("triton", "direct")), ("persistent", ("one_tile", "persistent")),
                                          ("sum", ("torch", "kernel")), ("wgrad_split", ("one_program", "split")),
                                          ("wgrad_stream", ("one_stream", "side_stream"))])
def test_switch_ab_runs_both_ways_in_the_interpreter(tmp_path, switch, ways):
    """benchmarks/switch_ab.py: both ways of a switch give the same block (in the interpreter the direct way falls
    back to Triton's path and nothing is tuned; the script's comparison and output are what is checked here; the
    tiny block's fp32 sums over k come out the same in either order), each timed."""
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("switch_ab.py")), "--switch", switch, "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitwise equal both ways: True" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["blocks"]
    assert result["switch"] == SWITCHED[switch]
    assert row["bitwise_equal"] and len(row[ways[0]]["ms"]) == len(row[ways[1]]["ms"]) == 1


def test_switch_ab_refuses_launch_timings_for_the_sum_switch():
    """The sum switch changes no GEMM launch: --launches would time two identical ways."""
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("switch_ab.py")), "--switch", "sum", "--tiny",
                           "--launches", "qwen3-30b-a3b:16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--launches: the 'sum' switch changes no GEMM launch" in proc.stderr


def test_switch_ab_restores_a_module_flag_when_a_case_raises(monkeypatch):
    """--switch sum sets the triton backend's SUM_KERNEL per way; a case that raises (out of memory, say) must not
    leave it set for the rest of the process."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import switch_ab

    from moetune.experts.backends import triton as triton_backend

    def failing_block(name, tokens, args, device, dtype):
        switch_ab.set_way(args, "torch")
        assert triton_backend.SUM_KERNEL is False
        raise RuntimeError("out of memory")

    monkeypatch.setattr(switch_ab, "block", failing_block)
    before = triton_backend.SUM_KERNEL
    with pytest.raises(RuntimeError, match="out of memory"):
        switch_ab.main(["--switch", "sum", "--tiny"])
    assert triton_backend.SUM_KERNEL is before


def test_plot_draws_the_queued_times_where_measured(tmp_path):
    """benchmarks/plot.py: a panel for steps queued back to back (harness.measure's queued_ms, CUDA only), none for
    a CPU run's rows; each panel's bars carry that panel's own ratio."""
    import importlib.util

    import matplotlib.pyplot as plt

    spec = importlib.util.spec_from_file_location("experts_plot", SCRIPT.with_name("plot.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)

    def rows(queued):
        out = []
        for provider, ms, q in (("baseline", 10.0, 9.0), ("triton", 4.0, 2.0)):
            row = {"shape": "s", "tokens": 64, "provider": provider, "rank": 16, "ms": ms, "peak_gib": 1.0,
                   "speedup": 10.0 / ms, "memory_ratio": 0.5}
            if queued:
                row.update(queued_ms=q, speedup_queued=9.0 / q)
            out.append(row)
        return out

    notes = {}
    for queued in (False, True):
        path = tmp_path / f"experts-{queued}.json"
        path.write_text(json.dumps({"environment": {"device": "d", "torch": "t", "transformers": "x", "peft": "p",
                                                    "date": "2026-12-04"}, "shapes": {"s": {}},
                                    "rows": rows(queued)}))
        assert plot.plot(path).exists()
        notes[queued] = [[t.get_text() for t in ax.texts if t.get_text()] for ax in plt.gcf().axes]
        plt.close("all")
    assert notes[False] == [["2.50x"], ["0.50x"]]  # time alone, memory
    assert notes[True] == [["2.50x"], ["4.50x"], ["0.50x"]]  # time alone, queued, memory


def test_block_timing_says_it_needs_a_gpu():
    """benchmarks/block_timing.py measures a GPU waiting for its host: without CUDA a one-line usage error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the script would run")
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("block_timing.py"))], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("needs a CUDA GPU (it measures a GPU "
                                                                                  "waiting for its host)")


def test_block_timing_reads_idle_gaps_from_a_trace():
    """block_timing.idle_gaps: busy time against span, gaps largest first, each with how late the host issued the
    op after the gap (from the runtime event of the same correlation id), None where no launch event matches."""
    sys.path.insert(0, str(SCRIPT.parent))
    import block_timing

    def kernel(name, ts, dur, correlation):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    events = [
        kernel("gemm", 100.0, 50.0, 1), kernel("sum", 160.0, 10.0, 2), kernel("wgrad", 400.0, 100.0, 3),
        kernel("copy", 505.0, 5.0, 4),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90.0, "dur": 3.0,
         "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 380.0, "dur": 3.0,
         "args": {"correlation": 3}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::sum", "ts": 150.0, "dur": 5.0},  # not a GPU op
    ]
    found = block_timing.idle_gaps(events, top=2)
    assert found["gpu_ops"] == 4
    assert found["busy_ms"] == pytest.approx(0.165) and found["span_ms"] == pytest.approx(0.410)
    assert found["idle_ms"] == pytest.approx(0.245)
    assert [(g["after"], g["before"], g["gap_us"], g["launch_lag_us"]) for g in found["largest"]] == [
        ("sum", "wgrad", 230.0, 210.0),  # issued 210 us after the GPU went idle: it waited for the host
        ("gemm", "sum", 10.0, None),  # no launch event in the trace for this one
    ]
    assert block_timing.idle_gaps([], top=2) == {}
