"""What is alive at a training step's memory peak: one step under torch's allocator history, replayed.

`torch.cuda.max_memory_allocated` gives the peak, not what makes it. `record_step(step)` runs `step()` while the
CUDA caching allocator records every allocation with its Python stack, and `live_at_peak(snapshot, base)` replays
that history to the moment the allocated bytes were highest and lists the tensors alive then that the step itself
allocated (weights, optimizer state and other allocations from before the step are `base`). Each is named by the
innermost frame of moetune, transformers, peft or torch.nn (where it was allocated), so a line reads as the code
that holds the memory. The raw snapshot can also be saved for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import torch

# Frames worth naming an allocation by, in order of preference (the first one found, innermost first).
OWNERS = ("/moetune/", "/transformers/", "/peft/", "/torch/nn/", "/benchmarks/")


def record_step(step: Callable[[], object], save_path: str | None = None, max_entries: int = 400_000) -> dict:
    """Run step() with the allocator's history on; returns the snapshot (and pickles it to save_path)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if save_path:
        with open(save_path, "wb") as f:
            pickle.dump(snapshot, f)
    return snapshot


def owner(frames: list[dict]) -> str:
    """'file:line function' of the innermost frame in one of OWNERS, else the innermost frame."""
    for marker in OWNERS:
        for frame in frames:
            if marker in frame.get("filename", ""):
                path = frame["filename"]
                return f"{path[path.rindex(marker) + 1:]}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "?"


def live_at_peak(snapshot: dict, device: int = 0, top: int = 15) -> dict:
    """Replay device `device`'s trace: the peak of bytes allocated during it (above what was allocated before it
    began) and the allocations alive at that moment, largest first, grouped by owner and size."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    traces = snapshot.get("device_traces") or []
    for event in traces[device] if device < len(traces) else []:
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = (event["size"], owner(event.get("frames") or []))
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            # allocated bytes drop at the free request (the block may wait for its streams before it is reused)
            current -= live.pop(addr)[0]
    groups: dict[tuple[str, int], int] = {}
    for size, name in at_peak.values():
        groups[(name, size)] = groups.get((name, size), 0) + 1
    rows = sorted(((size * count, count, size, name) for (name, size), count in groups.items()), reverse=True)
    return {
        "peak_above_start_bytes": peak,
        "allocations_at_peak": len(at_peak),
        "largest": [{"bytes": total, "count": count, "each_bytes": size, "owner": name}
                    for total, count, size, name in rows[:top]],
    }


def report(summary: dict, start_bytes: int) -> str:
    lines = [f"memory peak: {(start_bytes + summary['peak_above_start_bytes']) / 2**30:.2f} GiB = "
             f"{start_bytes / 2**30:.2f} before the step + {summary['peak_above_start_bytes'] / 2**30:.2f} during it "
             f"({summary['allocations_at_peak']} tensors alive then); largest:"]
    for row in summary["largest"]:
        lines.append(f"  {row['bytes'] / 2**20:9.1f} MiB  {row['count']:4d} x {row['each_bytes'] / 2**20:8.2f} MiB  "
                     f"{row['owner']}")
    return "\n".join(lines)
