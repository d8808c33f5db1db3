"""benchmarks/plot_ab.py: the A/B scripts' rows become a two-way bar plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import plot_ab  # noqa: E402


def test_router_rows_take_the_median_of_rounds():
    rows = [{"tokens": 8, "way": "fp32", "gpu_busy_us": u} for u in (10.0, 30.0, 20.0)]
    rows += [{"tokens": 8, "way": "bf16", "gpu_busy_us": 5.0}]
    labels, ways, value = plot_ab.cases(rows)
    assert labels == ["8 tokens"] and ways == ["fp32", "bf16"] and value[("8 tokens", "fp32")] == 20.0


def test_lora_order_rows_give_both_orders_in_us():
    rows = [{"model": "m", "part": "qkv", "first_gpu_busy_ms": 0.5, "last_gpu_busy_ms": 0.6}]
    labels, ways, value = plot_ab.cases(rows)
    assert ways == ["LoRA term first", "LoRA term last"] and value[(labels[0], "LoRA term last")] == pytest.approx(600)


def test_a_plot_is_written_beside_the_json(tmp_path):
    path = tmp_path / "ab.json"
    rows = [{"tokens": t, "way": w, "gpu_busy_us": 1.0 + t} for t in (8, 16) for w in ("a", "b")]
    path.write_text(json.dumps({"environment": {"device": "cpu", "date": "2026-12-06"}, "rows": rows}))
    assert plot_ab.plot(path) == tmp_path / "ab.png" and (tmp_path / "ab.png").stat().st_size > 0


def test_one_way_is_refused(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"rows": [{"tokens": 8, "way": "a", "gpu_busy_us": 1.0}]}))
    with pytest.raises(ValueError, match="expected two ways"):
        plot_ab.plot(path)


def test_sum_over_k_cases_compare_torch_with_the_default_or_a_chosen_tile(tmp_path):
    case = {"shape": "glm", "tokens": 8, "K": 4, "H": 64, "torch_us": 150.0, "kernel_us": 120.0,
            "bitwise_equal_torch": True,
            "sweep": [{"block_t": 8, "block_h": 256, "num_warps": 4, "us": 120.0},
                      {"block_t": 1, "block_h": 64, "num_warps": 8, "us": 115.0}]}
    labels, ways, value = plot_ab.cases([case])
    assert ways == ["torch sum(dim=1)", "sum_over_k, the run's default tile"]
    assert value[(labels[0], ways[1])] == 120.0 and value[(labels[0], ways[0])] == 150.0
    # a chosen tile: its block_h capped at H's power of 2 (2048 -> 64 here)
    labels, ways, value = plot_ab.cases([case], tile=(1, 2048, 8))
    assert ways[1] == "sum_over_k, 1 x 2048 tile, 8 warps" and value[(labels[0], ways[1])] == 115.0
    with pytest.raises(ValueError, match="no 2 x 2048 tile at 8 warps in the sweep of glm"):
        plot_ab.cases([case], tile=(2, 2048, 8))
    path = tmp_path / "sum.json"
    path.write_text(json.dumps({"environment": {"device": "cpu", "date": "2026-12-06"}, "cases": [case]}))
    assert plot_ab.plot(path).stat().st_size > 0


def test_sum_over_k_rows_without_timings_are_refused():
    with pytest.raises(ValueError, match="without timings"):
        plot_ab.cases([{"shape": "glm", "tokens": 37, "K": 4, "H": 96, "bitwise_equal_torch": True}])


def test_packed_attention_rows_leave_out_a_case_one_path_could_not_run(tmp_path):
    rows = [{"model": "qwen3", "path": "mask", "seq": 8, "examples": 2, "forward_backward_ms": 4.0},
            {"model": "qwen3", "path": "varlen", "seq": 8, "examples": 2, "forward_backward_ms": 1.0},
            {"model": "qwen3", "path": "mask", "seq": 32, "unsupported": "CUDA out of memory"},
            {"model": "qwen3", "path": "varlen", "seq": 32, "examples": 5, "forward_backward_ms": 3.0}]
    labels, ways, value = plot_ab.cases(rows)
    assert ways == ["block-diagonal mask + sdpa", "varlen, no mask"] and labels == ["qwen3\n8 tokens\n2 examples"]
    assert value[(labels[0], ways[0])] == 4000.0 and value[(labels[0], ways[1])] == 1000.0
    path = tmp_path / "packed.json"
    path.write_text(json.dumps({"environment": {"device": "cpu", "date": "2026-12-07"}, "rows": rows}))
    assert plot_ab.plot(path).stat().st_size > 0


def test_wgrad_split_rows_compare_unsplit_with_split_per_routing(tmp_path):
    rows = [{"shape": "qwen3", "tokens": 16, "routing": kind, "busiest_over_mean": busiest, "unsplit_ms": unsplit,
             "split_ms": 0.5} for kind, busiest, unsplit in (("even", 1.1, 0.5), ("busy", 16.0, 1.5))]
    labels, ways, value = plot_ab.cases(rows)
    assert ways == ["unsplit: one program an expert", "split into chunks of rows"]
    assert labels == ["qwen3 16\neven: busiest\n1.1x the mean", "qwen3 16\nbusy: busiest\n16.0x the mean"]
    assert value[(labels[1], ways[0])] == 1500.0 and value[(labels[1], ways[1])] == 500.0
    path = tmp_path / "wgrad.json"
    path.write_text(json.dumps({"environment": {"device": "cpu", "date": "2026-12-07"}, "cases": rows}))
    assert plot_ab.plot(path).stat().st_size > 0
    with pytest.raises(ValueError, match="without timings"):
        plot_ab.cases([{"shape": "qwen3", "tokens": 16, "routing": "even", "ok": True}])
