"""benchmarks/router_logits_ab.py on CPU (--tiny): both ways timed in turn, their errors against float64 recorded,
and the library's switch left on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import router_logits_ab  # noqa: E402

from moetune.models import fast_routers  # noqa: E402


def test_both_ways_are_timed_and_checked(tmp_path):
    out = tmp_path / "ab.json"
    assert router_logits_ab.main(["--tiny", "--warmup", "1", "--repeat", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"].startswith("bf16") for r in rows] == [False, True, False, True]
    for row in rows:
        assert row["ms"] > 0 and row["logits_error"] < 1e-6 and row["grad_error"] < 1e-2
    assert fast_routers.TENSOR_CORE_LOGITS is True
