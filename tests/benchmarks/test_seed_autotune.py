"""seed_autotune.py: another GPU's picks copied under this GPU's name, this GPU's own picks kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import seed_autotune  # noqa: E402


def test_copies_other_gpus_picks_and_keeps_this_gpus_own(tmp_path, monkeypatch):
    source = tmp_path / "autotune-H100.json"
    source.write_text(json.dumps({
        "NVIDIA H100 80GB HBM3|triton 3.6.0|grouped_gemm/v4|(1, 2)|abc": {"BLOCK_M": 128},
        "NVIDIA H100 80GB HBM3|triton 3.6.0|grouped_gemm/v4|(3, 4)|abc": {"BLOCK_M": 64},
    }))
    cache = tmp_path / "cache" / "autotune.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"NVIDIA H200|triton 3.6.0|grouped_gemm/v4|(3, 4)|abc": {"BLOCK_M": 256}}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(sys, "argv", ["seed_autotune.py", str(source), str(cache)])
    seed_autotune.main()
    entries = json.loads(cache.read_text())
    assert entries["NVIDIA H200|triton 3.6.0|grouped_gemm/v4|(1, 2)|abc"] == {"BLOCK_M": 128}
    assert entries["NVIDIA H200|triton 3.6.0|grouped_gemm/v4|(3, 4)|abc"] == {"BLOCK_M": 256}  # its own kept
    assert len(entries) == 2
