"""What a run measures: expert load per MoE layer, peak memory, and the metrics.jsonl rows."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys

import torch
from torch import nn

__all__ = ["ExpertLoad", "peak_memory_gib", "MetricsLog"]


class ExpertLoad:
    """Counts the router's top-k choices per MoE layer: how many (token, slot) pairs each expert received.

    Hooks the experts modules rather than the routers: every supported architecture hands its experts
    module the same `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`, after any group-limited
    or biased selection, while router outputs differ per architecture (logits, scores, indices in varying
    tuples). Counting stays on the device (one index_add_ per layer per forward, no host read); `take()` does the one
    transfer per logged step. Padding tokens are routed too, but `token_mask` weights them out.
    With gradient checkpointing every layer runs forward twice; both passes see the same tokens, so the
    shares (counts / total per layer) are unchanged.
    """

    def __init__(self, experts: dict[str, nn.Module], device: torch.device):
        self.names = sorted(experts, key=_layer_number)
        self.layers = [_layer_number(n) for n in self.names]
        num_experts = {int(experts[n].gate_up_proj.shape[0]) for n in self.names}
        assert len(num_experts) == 1, f"experts modules disagree on the expert count: {num_experts}"
        self.num_experts = num_experts.pop()
        self.counts = torch.zeros(len(self.names), self.num_experts, dtype=torch.float64, device=device)
        self.token_mask: torch.Tensor | None = None  # [B*T] bool, set before each forward
        self._handles = [
            experts[n].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, n in enumerate(self.names)
        ]

    def _hook(self, row: int):
        def count(module, args, kwargs):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            k = top_k_index.shape[-1]
            if self.token_mask is not None and self.token_mask.numel() * k == top_k_index.numel():
                weights = self.token_mask.repeat_interleave(k).to(torch.float64)
            else:
                weights = torch.ones(top_k_index.numel(), dtype=torch.float64, device=self.counts.device)
            # index_add_, not bincount: CUDA's bincount reads the indices' min and max on the host to size its output,
            # two waits for the GPU in every MoE layer's forward (and a CUDA graph capture cannot hold them)
            self.counts[row].index_add_(0, top_k_index.reshape(-1).to(self.counts.device), weights)

        return count

    def take(self) -> list[list[float]]:
        """Shares per layer since the last call ([layer][expert], each row sums to 1), and reset."""
        counts = self.counts.to("cpu", copy=True)  # copy: on CPU .cpu() would alias the buffer zeroed next
        self.counts.zero_()
        return _shares(counts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _shares(counts: torch.Tensor) -> list[list[float]]:
    return (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()


def _layer_number(name: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", "." + name + ".")
    return int(numbers[-1]) if numbers else 0


def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated by torch. CPU: the process's peak resident set size (all of Python included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """metrics.jsonl: one JSON row per logged step, flushed as written (a crash keeps what was logged)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        else:  # drop rows the interrupted run logged after its last checkpoint: they are about to be redone
            rows = read_metrics(path) if os.path.isfile(path) else []
            with open(path, "w") as f:
                for row in rows:
                    if row["step"] <= resume_step:
                        f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        # JSON has no NaN or Infinity: a non-finite figure (a diverged loss) is written as null.
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
