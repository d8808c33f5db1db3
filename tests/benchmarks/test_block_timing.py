"""benchmarks/block_timing.py's per-step GPU busy time (the A/B scripts' GPU measure), without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import block_timing  # noqa: E402


def test_busy_per_step_divides_the_profile_by_its_steps(monkeypatch):
    seen = []

    def profile(step, steps=1):
        seen.append(steps)
        return {"busy_ms": 10.0, "gpu_ops": 40, "span_ms": 12.0}

    monkeypatch.setattr(block_timing, "gaps", profile)
    assert block_timing.busy_per_step(lambda: None, 4) == {"busy_ms": 2.5, "gpu_ops": 10.0}
    assert seen == [4]
