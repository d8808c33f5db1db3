"""A second CUDA stream for work off a block's critical path, overlapped with the kernels on its own stream.

The triton backward's LoRA weight gradients are bandwidth-bound reductions (~0.5 ms of a 7 ms Qwen3 16K block);
the dx GEMM beside them is compute-bound. On one stream they run one after the other; on two, the GPU can run the
reductions' programs while the GEMM's run.

Memory: what runs on the side stream is allocated beforehand on the caller's stream (grouped_wgrad.wgrad_launch
allocates, schedules and tunes; the function it returns only launches), for the caching allocator keeps each
stream's freed blocks to that stream: gradients allocated on the side stream would, once freed, be memory the next
forward cannot use. Safety without record_stream: a fork waits for everything the caller's stream has issued so
far, those allocations' earlier uses included, so the side stream touches them only after every earlier use of
their memory; the caller keeps them (the launch functions hold the partial sums' slabs) until join() has made its
stream wait for the side stream, and frees them only after. Under CUDA graph capture the fork makes the side stream
part of the same capture, and the join brings it back before the capture ends.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    # One per GPU for the process, made at the first backward (eager: before any CUDA graph capture).
    return torch.cuda.Stream(device=device_index)


class SideStream:
    """`with side.work(): ...` issues its launches on the device's side stream (or, off a GPU or when not
    `enabled`, where they would have run anyway); `side.join()` must follow before the caller's tensors are freed."""

    def __init__(self, reference: torch.Tensor, enabled: bool = True):
        self.enabled = enabled and reference.is_cuda
        self.forked = False
        if self.enabled:
            self.main = torch.cuda.current_stream(reference.device)
            self.side = _side_stream(reference.device.index)

    @contextlib.contextmanager
    def work(self):
        """Launches inside run on the side stream after everything the caller's stream has issued so far."""
        if not self.enabled:
            yield
            return
        self.side.wait_stream(self.main)
        self.forked = True
        with torch.cuda.stream(self.side):
            yield

    def join(self) -> None:
        if self.forked:
            self.main.wait_stream(self.side)
            self.forked = False
