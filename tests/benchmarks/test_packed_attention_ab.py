"""benchmarks/packed_attention_ab.py: packed rows' attention through transformers' mask and moetune's varlen path
(on CPU: toy widths, a per-example sdpa standing in for torch's CUDA-only varlen kernel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import packed_attention_ab  # noqa: E402
import torch  # noqa: E402


def test_tiny_run_times_both_paths_and_they_agree(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "packed_attention_ab.py"), "--tiny", "--warmup", "1",
                           "--repeat", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["path"]) for r in rows] == [
        ("qwen3-30b-a3b", "mask"), ("qwen3-30b-a3b", "varlen"), ("glm-4.7-flash", "mask"), ("glm-4.7-flash", "varlen")]
    assert all(r["forward_backward_ms"] > 0 and r["examples"] > 1 for r in rows)
    assert all(rows[i]["relative_error_to_mask"] < 1e-5 for i in (1, 3))


def test_examples_fill_the_row_and_the_mask_keeps_each_to_itself():
    lengths = packed_attention_ab.example_lengths(100, 8, 40, seed=3)
    assert sum(lengths) == 100 and all(1 <= n <= 40 for n in lengths)
    mask = packed_attention_ab.block_diagonal_mask([2, 3], "cpu")[0, 0]
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, False, True, False, False], [False, False, True, True, False],
                             [False, False, True, True, True]]
    assert mask.dtype == torch.bool
