"""benchmarks/lora_order_ab.py: both orders agree (fp32 on CPU; bf16 on a GPU, to its rounding), each is timed, and
the library's order is left on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import lora_order_ab  # noqa: E402

from moetune import lora_linear  # noqa: E402


def test_both_orders_agree_and_are_timed(tmp_path):
    out = tmp_path / "ab.json"
    cases = [f"{model}:5" for model in lora_order_ab.O_PROJ]
    assert lora_order_ab.main(["--cases", *cases, "--rank", "4", "--rounds", "2", "--warmup", "1", "--repeat", "2",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["part"]) for r in rows] == [(m, p) for m in lora_order_ab.O_PROJ for p in ("qkv", "o_proj")]
    for row in rows:
        assert row["max_relative_difference"] < (1e-2 if torch.cuda.is_available() else 1e-5)
        assert row["first_ms"] > 0 and row["last_ms"] > 0
    assert lora_linear.LORA_TERM_FIRST is True


def test_bad_case_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        lora_order_ab.main(["--cases", "mixtral:5"])
    assert exit_info.value.code == 2
