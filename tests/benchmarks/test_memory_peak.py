"""memory_peak.py: replaying the allocator's history to the peak and naming what is alive there (synthetic traces;
record_step itself needs CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_peak  # noqa: E402

MiB = 2**20


# stand-ins for the package directories and where their names start
PACKAGES = [("/site/transformers/", "/site/"), ("/site/torch/nn/", "/site/"), ("/repo/moetune/", "/repo/")]


def frames(*paths: str) -> list[dict]:
    return [{"filename": path, "line": 10 + i, "name": f"f{i}"} for i, path in enumerate(paths)]


def test_the_peak_lists_what_is_alive_then_not_what_was_freed_before():
    ours = frames("/site/torch/autograd/function.py", "/repo/moetune/experts/backends/triton.py",
                  "/site/transformers/models/qwen3_moe/modeling_qwen3_moe.py")
    theirs = frames("/site/torch/nn/functional.py", "/site/transformers/models/qwen3_moe/modeling_qwen3_moe.py")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * MiB, "frames": theirs},      # freed before the peak
        {"action": "free_requested", "addr": 1, "size": 100 * MiB},
        {"action": "free_completed", "addr": 1, "size": 100 * MiB},
        {"action": "free_requested", "addr": 99, "size": 4 * MiB},                 # allocated before the step
        {"action": "free_completed", "addr": 99, "size": 4 * MiB},                 # (counted once)
        {"action": "alloc", "addr": 2, "size": 60 * MiB, "frames": ours},
        {"action": "alloc", "addr": 3, "size": 60 * MiB, "frames": ours},
        {"action": "alloc", "addr": 4, "size": 8 * MiB, "frames": theirs},
        {"action": "free_requested", "addr": 3, "size": 60 * MiB},                 # the peak was just before
        {"action": "alloc", "addr": 5, "size": 30 * MiB, "frames": theirs},
    ]
    summary = memory_peak.live_at_peak({"device_traces": [trace]}, packages=PACKAGES)
    assert summary["peak_above_start_bytes"] == 124 * MiB   # the step's 128 less the 4 it freed of the start's
    assert summary["allocations_at_peak"] == 3
    largest = summary["largest"]
    assert (largest[0]["bytes"], largest[0]["count"], largest[0]["each_bytes"]) == (120 * MiB, 2, 60 * MiB)
    assert largest[0]["owner"] == "moetune/experts/backends/triton.py:11 f1"   # not torch.autograd's frame
    assert largest[1]["owner"] == "torch/nn/functional.py:10 f0"                # the innermost owner frame
    text = memory_peak.report(summary, start_bytes=1024 * MiB)
    assert text.startswith("memory peak: 1.12 GiB requested = 1.00 before the step + 0.12 during it (3 tensors")
    assert "moetune/experts/backends/triton.py:11 f1" in text.splitlines()[1]


def test_wrappers_do_not_own_what_they_pass_through():
    """A checkpointed layer runs inside moetune's recompute and torch's module calls: the tensor belongs to the
    transformers line inside them, not to the wrapper."""
    stack = frames("/site/transformers/integrations/sdpa_attention.py", "/site/torch/nn/modules/module.py",
                   "/repo/moetune/models/recompute.py", "/site/torch/utils/checkpoint.py",
                   "/repo/moetune/training/offload.py", "/site/transformers/modeling_layers.py")
    assert memory_peak.owner(stack, PACKAGES) == "transformers/integrations/sdpa_attention.py:10 f0"
    assert memory_peak.owner(stack[1:], PACKAGES) == "/site/torch/nn/modules/module.py:11 f1"  # only wrappers: innermost


def test_an_empty_or_missing_trace_is_a_zero_peak():
    assert memory_peak.live_at_peak({"device_traces": []})["peak_above_start_bytes"] == 0
    assert memory_peak.live_at_peak({"device_traces": [[]]}, top=3)["largest"] == []
    assert memory_peak.owner([]) == "?"
    assert memory_peak.owner(frames("/x/y.py")) == "/x/y.py:10 f0"


def test_the_real_package_directories_are_found():
    import moetune

    assert any(moetune.__file__.startswith(directory) for directory, _ in memory_peak._PACKAGES)
    path = moetune.__file__.replace("__init__.py", "experts/api.py")
    assert memory_peak.owner([{"filename": path, "line": 3, "name": "moe_experts"}]) == "moetune/experts/api.py:3 moe_experts"


@pytest.mark.gpu
def test_a_cuda_step_under_the_history_names_the_allocating_line(tmp_path):
    """The real allocator's trace: the largest tensor alive at the peak is the one this test allocated, named by
    this file's line, and the snapshot pickles for memory_viz."""
    import torch

    def step():  # no reduction here: torch sums uint8 through an int64 copy (8x the bytes, run 53h)
        held = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")  # alive at the peak
        scratch = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
        del scratch
        return held.data_ptr()

    start = memory_peak.requested_bytes()  # 0 here if nothing was allocated on the GPU yet
    snapshot = memory_peak.record_step(step, str(tmp_path / "snap.pickle"))
    summary = memory_peak.live_at_peak(snapshot, device=torch.cuda.current_device())
    assert summary["peak_above_start_bytes"] >= 72 * MiB
    assert summary["max_allocated_above_start_bytes"] >= 72 * MiB   # torch's own count of the same step
    assert summary["largest"][0]["each_bytes"] == 64 * MiB
    assert "test_memory_peak.py" in summary["largest"][0]["owner"]
    assert (tmp_path / "snap.pickle").stat().st_size > 0
    assert "memory peak:" in memory_peak.report(summary, start)


def test_requested_bytes_before_the_first_allocation_is_zero(monkeypatch):
    """torch's memory_stats() is empty until the allocator's first allocation (run 53a's KeyError)."""
    import torch

    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {})
    assert memory_peak.requested_bytes() == 0
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {"requested_bytes.all.current": 5 * MiB})
    assert memory_peak.requested_bytes() == 5 * MiB
