"""benchmarks/lora_groups_ab.py on CPU: both ways agree and each is timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import lora_groups_ab  # noqa: E402


def test_every_shape_agrees_and_is_timed(tmp_path, capsys):
    out = tmp_path / "ab.json"
    cases = [f"{model}:5" for model in lora_groups_ab.PROJECTIONS]
    assert lora_groups_ab.main(["--cases", *cases, "--rank", "4", "--rounds", "2", "--warmup", "1", "--repeat", "2",
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == list(lora_groups_ab.PROJECTIONS)
    for row in rows:
        assert row["max_relative_error"] < 1e-5  # fp32 on CPU
        assert row["grouped_ms"] > 0 and row["alone_ms"] > 0
    assert "qwen3-30b-a3b 5: error" in capsys.readouterr().out


def test_bad_case_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        lora_groups_ab.main(["--cases", "qwen3-30b-a3b"])
    assert exit_info.value.code == 2
