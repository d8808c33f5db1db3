"""What is alive at a training step's memory peak: one step under torch's allocator history, replayed.

`torch.cuda.max_memory_allocated` gives the peak, not what makes it. `record_step(step)` runs `step()` while the
CUDA caching allocator records every allocation with its Python stack, and `live_at_peak(snapshot)` replays that
history to the moment the bytes held were highest and lists the tensors alive then that the step itself allocated
(weights, optimizer state and other tensors from before the step are the `start`; those the step frees count
down from it). Each tensor is named by the innermost frame of moetune, transformers, peft or torch.nn that is not a
pass-through wrapper (a module's __call__, a checkpoint), so a line reads as the code that holds the memory. The raw
snapshot can also be saved for https://pytorch.org/memory_viz.

The trace's sizes are the bytes each tensor asked for; `torch.cuda.memory_allocated` counts the allocator's blocks
(rounded up to 512 B, a large block up to ~1 MB more). So the start is read in requested bytes too, and the peak
torch itself reports for the step (max_memory_allocated, blocks) is kept beside the replayed one as a check.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from collections.abc import Callable

import torch

# Packages whose frames name an allocation (their directories, found without importing them).
OWNER_PACKAGES = ("moetune", "transformers", "peft")
# Frames of those packages that only pass a call through (a module's __call__, transformers' checkpointing layer and
# forward decorators, moetune's recompute and offload wrappers): never the owner.
PASS_THROUGH = ("torch/nn/modules/module.py", "transformers/modeling_layers.py", "transformers/utils/generic.py",
                "moetune/models/recompute.py", "moetune/training/offload.py")


def _package_dirs() -> list[tuple[str, str]]:
    """(directory, the directory names are given from) for each owner package, found without importing it, and
    torch/nn: ('.../site-packages/transformers/', '.../site-packages/'), ('.../torch/nn/', '.../site-packages/')."""
    dirs = []
    for name in OWNER_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend((os.path.join(path, ""), os.path.join(os.path.dirname(path), ""))
                        for path in spec.submodule_search_locations)
    torch_dir = os.path.dirname(torch.__file__)
    dirs.append((os.path.join(torch_dir, "nn", ""), os.path.join(os.path.dirname(torch_dir), "")))
    return dirs


_PACKAGES = _package_dirs()


def owner(frames: list[dict], packages: list[tuple[str, str]] | None = None) -> str:
    """'package/path.py:line function' of the innermost frame inside an owner package (`packages` as
    _package_dirs gives them) that is not a pass-through wrapper; else the innermost frame, as it is."""
    for frame in frames:  # innermost first, as torch records them
        path = frame.get("filename", "")
        for directory, root in packages if packages is not None else _PACKAGES:
            if path.startswith(directory):
                relative = path[len(root):].replace(os.sep, "/")
                if not any(relative.startswith(wrapper) for wrapper in PASS_THROUGH):
                    return f"{relative}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "?"


def requested_bytes() -> int:
    """Bytes the live tensors asked for (the trace's unit); 0 before the allocator's first allocation, when torch's
    memory_stats() is still empty (run 53a: a KeyError in a fresh process)."""
    return torch.cuda.memory_stats().get("requested_bytes.all.current", 0)


def record_step(step: Callable[[], object], save_path: str | None = None, max_entries: int = 1_000_000) -> dict:
    """Run step() with the allocator's history on; returns the snapshot with the step's block peak above its start
    ("max_allocated_above_start", from torch's own statistics), and pickles it to save_path."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_blocks = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    snapshot["max_allocated_above_start"] = torch.cuda.max_memory_allocated() - start_blocks
    trace = (snapshot.get("device_traces") or [[]])[torch.cuda.current_device()]
    if len(trace) >= max_entries:  # a ring buffer: the step's first events are gone, the replay would be wrong
        print(f"memory_peak: the history kept only the last {max_entries} events of the step; "
              "pass a larger max_entries", file=sys.stderr)
        snapshot["truncated"] = True
    if save_path:
        with open(save_path, "wb") as f:
            pickle.dump(snapshot, f)
    return snapshot


def live_at_peak(snapshot: dict, device: int = 0, top: int = 15, packages: list[tuple[str, str]] | None = None) -> dict:
    """Replay device `device`'s trace: the peak of requested bytes relative to the start (tensors the step frees
    that it did not allocate count down) and the allocations of the step alive at that moment, largest first,
    grouped by owner and size."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []

    def replay(stop: int):
        """The step's live allocations (addr -> event) after events[:stop], the bytes held relative to the start
        and the index of their highest point."""
        live: dict[int, dict] = {}
        current = peak = peak_index = 0
        for index, event in enumerate(events[:stop]):
            action, addr = event.get("action"), event.get("addr")
            if action == "alloc":
                live[addr] = event
                current += event["size"]
                if current > peak:
                    peak, peak_index = current, index + 1
            elif action == "free_requested" or (action == "free_completed" and addr in live):
                # bytes held drop at the free request (the block may then wait for its streams before it is
                # reused); a free_completed counts only where no request came first
                freed = live.pop(addr, None)
                current -= (freed or event).get("size", 0)
        return live, peak, peak_index

    _, peak, peak_index = replay(len(events))
    at_peak = replay(peak_index)[0]  # replayed again to the peak: no copy of the live set at every new high
    groups: dict[tuple[str, int], int] = {}
    for event in at_peak.values():  # owners named for these only
        key = (owner(event.get("frames") or [], packages), event["size"])
        groups[key] = groups.get(key, 0) + 1
    rows = sorted(((size * count, count, size, name) for (name, size), count in groups.items()), reverse=True)
    return {
        "peak_above_start_bytes": peak,
        "max_allocated_above_start_bytes": snapshot.get("max_allocated_above_start"),
        "truncated": bool(snapshot.get("truncated")),
        "allocations_at_peak": len(at_peak),
        "largest": [{"bytes": total, "count": count, "each_bytes": size, "owner": name}
                    for total, count, size, name in rows[:top]],
    }


def report(summary: dict, start_bytes: int) -> str:
    """start_bytes: the bytes tensors held before the step, as requested (memory_stats' requested_bytes)."""
    GiB = 2**30
    check = summary.get("max_allocated_above_start_bytes")
    lines = [f"memory peak: {(start_bytes + summary['peak_above_start_bytes']) / GiB:.2f} GiB requested = "
             f"{start_bytes / GiB:.2f} before the step + {summary['peak_above_start_bytes'] / GiB:.2f} during it "
             f"({summary['allocations_at_peak']} tensors of the step alive then"
             + (f"; torch's block peak: +{check / GiB:.2f}" if check is not None else "")
             + ("; TRUNCATED history" if summary.get("truncated") else "") + "); largest:"]
    for row in summary["largest"]:
        lines.append(f"  {row['bytes'] / 2**20:9.1f} MiB  {row['count']:4d} x {row['each_bytes'] / 2**20:8.2f} MiB  "
                     f"{row['owner']}")
    return "\n".join(lines)
