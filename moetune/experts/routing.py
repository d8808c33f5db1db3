"""Dispatch: top-k expert ids -> rows sorted by expert.

Shape legend (used across experts/ and kernels/):
  T tokens, K experts per token (top-k), E experts, H hidden, I expert width, R LoRA rank,
  S = T * K routed rows (one per (token, slot) pair).

A RoutingPlan is computed once per MoE layer call and read by every backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..fp32_matmul import mm_fp32

__all__ = ["PlanLayout", "RoutingPlan", "plan_routing"]


@dataclass(frozen=True)
class RoutingPlan:
    """Expert-sorted order of the S = T*K (token, slot) pairs.

    perm_S:        sorted row -> flat pair index (t * K + j)            int64 [S]
    inv_perm_S:    flat pair index -> sorted row                          int64 [S]
    token_S:       sorted row -> token t                                  int64 [S]
    expert_S:      sorted row -> expert e                                 int64 [S]
    counts_E:      rows per expert                                        int64 [E]
    offsets_E:     cumulative row counts (end of each group), the form
                   torch._grouped_mm takes                                int32 [E]

    All six are views of one int64 buffer (`buffer`, laid out by `layout`): a backend saves the buffer for its
    backward as one saved tensor and rebuilds the plan there with layout.plan(buffer), rather than keeping the plan
    on ctx. Autograd frees saved tensors after backward and gradient checkpointing drops and recomputes them; an
    attribute on ctx lives as long as the graph node, which under checkpointing is the whole step: 2 MiB a layer,
    96 MiB for Qwen3-30B-A3B's 48 layers at 8K tokens, 384 MiB at 32K. One tensor, not six: under checkpointing
    each saved tensor costs three hook calls of host time (saved_tensors.py).
    """

    perm_S: torch.Tensor
    inv_perm_S: torch.Tensor
    token_S: torch.Tensor
    expert_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    num_tokens: int
    top_k: int
    buffer: torch.Tensor
    layout: PlanLayout

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def num_rows(self) -> int:
        return self.perm_S.numel()

    def gather_rows(self, x_TH: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> x[token(i)] for each sorted row i: [S, H]."""
        return x_TH.index_select(0, self.token_S)

    def sum_rows(self, y_SH: torch.Tensor, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token (optionally weighted) sum of the K sorted rows of each token: [S, H] -> [T, H].

        Deterministic (no atomics): the rows are put back in (token, slot) order, then reduced
        with one batched product that accumulates in fp32 inside the GEMM.
        """
        y_TKH = y_SH.index_select(0, self.inv_perm_S).view(self.num_tokens, self.top_k, -1)
        if weights_TK is None:
            return y_TKH.sum(dim=1)
        w_T1K = weights_TK.to(y_SH.dtype).view(self.num_tokens, 1, self.top_k)
        # into a [T, H] tensor of its own: a view returned from an autograd Function could not be changed in place
        out_TH = y_SH.new_empty(self.num_tokens, y_SH.shape[1])
        torch.bmm(w_T1K, y_TKH, out=out_TH.view(self.num_tokens, 1, -1))
        return out_TH

    def routing_weight_grad(
        self, dots_S: torch.Tensor, d_out_TH: torch.Tensor, down_bias_EH: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """d topk_weights [T, K] from dots_S = <y - b2, d_out[token]> per sorted row (fp32).

        The bias part <b2[e], d_out[t]> comes from one small [T, E] product instead of an [S, H] gather.
        """
        if down_bias_EH is not None:
            bias_dots_TE = mm_fp32(d_out_TH, down_bias_EH.T)  # bf16 on tensor cores: no fp32 copy of d_out
            dots_S = dots_S + bias_dots_TE[self.token_S, self.expert_S]
        return self.scatter_pairs(dots_S).to(dtype)

    def scatter_pairs(self, values_S: torch.Tensor) -> torch.Tensor:
        """Per sorted row values [S] -> [T, K] in (token, slot) order."""
        return values_S.index_select(0, self.inv_perm_S).view(self.num_tokens, self.top_k)


class PlanLayout:
    """Where a RoutingPlan's tensors lie in its one int64 buffer, each part starting on 16 bytes (as Triton's
    launches specialise pointers): the four [S] index arrays, counts_E, then an int32 part with offsets_E and, where
    the counting sort made them, tile_rows rows of grouped_gemm's tile schedules (cumulative M tiles per expert for
    BLOCK_M = 16 << i, rows of E rounded up to 4 int32)."""

    __slots__ = ("num_tokens", "top_k", "num_experts", "tile_rows", "_rows", "_small", "size")

    def __init__(self, num_tokens: int, top_k: int, num_experts: int, tile_rows: int = 0):
        self.num_tokens, self.top_k, self.num_experts, self.tile_rows = num_tokens, top_k, num_experts, tile_rows
        rows = num_tokens * top_k
        self._rows = rows + rows % 2                      # int64 per index array, padded to 16 bytes
        self._small = 4 * self._rows + num_experts + num_experts % 2  # where the int32 part starts
        width = -(-num_experts // 4) * 4                  # int32 per row of the int32 part
        self.size = self._small + (1 + tile_rows) * width // 2

    def new_buffer(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.size, dtype=torch.int64, device=device)

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E, tile_ends) in buffer; tile_ends is
        [tile_rows, E rounded up to 4] int32 (its rows 16-byte aligned), None where tile_rows is 0."""
        S, E = self.num_tokens * self.top_k, self.num_experts
        perm_S, inv_perm_S, token_S, expert_S = buffer[: 4 * self._rows].view(4, self._rows)[:, :S].unbind(0)
        small = buffer[self._small:].view(torch.int32)
        tile_ends = small[-(-E // 4) * 4:].view(self.tile_rows, -1) if self.tile_rows else None
        counts_E = buffer[4 * self._rows: 4 * self._rows + E]
        return perm_S, inv_perm_S, token_S, expert_S, counts_E, small[:E], tile_ends

    def plan(self, buffer: torch.Tensor, views: tuple | None = None) -> RoutingPlan:
        """The plan in buffer (a backward's saved buffer, or a new one's views). Its tile schedules, where it has
        them, are handed to grouped_gemm's memo again: they belong to the counts tensor, which is new here."""
        perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E, tile_ends = views or self.views(buffer)
        if tile_ends is not None and views is None:
            from ..kernels.grouped_gemm import remember_tile_schedule

            remember_tile_schedule(counts_E, tile_ends[:, :self.num_experts])
        return RoutingPlan(perm_S=perm_S, inv_perm_S=inv_perm_S, token_S=token_S, expert_S=expert_S,
                           counts_E=counts_E, offsets_E=offsets_E, num_tokens=self.num_tokens, top_k=self.top_k,
                           buffer=buffer, layout=self)


def plan_routing(topk_ids_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort the T*K pairs by expert (stable, so rows of one expert keep token order). Ids must lie in
    [0, num_experts): moe_experts checks them first, except where this does (checks_ids).

    On a GPU Triton runs on, a counting sort in three launches (kernels/expert_sort.py) gives the same plan as
    the ~10 torch ops below, for about a third of their host time (run 51f). It also checks the ids (see
    checks_ids)."""
    num_tokens, top_k = topk_ids_TK.shape
    counting_sort = _checking_sort(topk_ids_TK, num_experts)
    if counting_sort is not None:
        sort, tile_rows = counting_sort
        layout = PlanLayout(num_tokens, top_k, num_experts, tile_rows)
        buffer = layout.new_buffer(topk_ids_TK.device)
        views = layout.views(buffer)
        sort(topk_ids_TK, num_experts, views)
        # The sort leaves an id outside [0, E) out of the counts (and writes nothing for it): the rows add up to
        # every pair exactly when all ids are in range. Two ops after the plan instead of five before it (aminmax,
        # compares) while the GPU waits for the step's first large launch (run 55c); the assert runs before any
        # launch that reads the plan. A bad id stops the process with a device-side assert, as CUDA's own index
        # checks would (the message is for the CPU; torch's CUDA assert may not print it).
        torch._assert_async(views[5][-1] == topk_ids_TK.numel(),
                            f"topk_ids: expected expert ids in [0, {num_experts - 1}]")
        return layout.plan(buffer, views)
    return torch_sorted_plan(topk_ids_TK, num_experts)


def torch_sorted_plan(topk_ids_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """plan_routing's plan by torch's stable sort, on any device (no id check: see plan_routing)."""
    num_tokens, top_k = topk_ids_TK.shape
    layout = PlanLayout(num_tokens, top_k, num_experts)
    buffer = layout.new_buffer(topk_ids_TK.device)
    views = layout.views(buffer)
    perm_S, inv_perm_S, token_S, expert_S, counts_E, offsets_E, _ = views
    flat_ids = topk_ids_TK.reshape(-1).long()
    torch.sort(flat_ids, stable=True, out=(expert_S, perm_S))
    inv_perm_S.index_copy_(0, perm_S, torch.arange(perm_S.numel(), device=perm_S.device))
    torch.div(perm_S, top_k, rounding_mode="floor", out=token_S)
    # Not torch.bincount: on CUDA it reads the max id back to the host (a sync per MoE layer).
    counts_E.zero_().index_add_(0, flat_ids, torch.ones_like(flat_ids))
    torch.cumsum(counts_E, dim=0, dtype=torch.int32, out=offsets_E)
    return layout.plan(buffer, views)


def checks_ids(topk_ids_TK: torch.Tensor, num_experts: int) -> bool:
    """Whether plan_routing checks that the ids lie in [0, num_experts) itself, on the device (its counting sort
    runs: CUDA, a Triton that runs there, not under torch.compile, at most MAX_EXPERTS experts)."""
    return _checking_sort(topk_ids_TK, num_experts) is not None


def _checking_sort(topk_ids_TK: torch.Tensor, num_experts: int):
    """The counting sort plan_routing runs for these ids (and so checks them with), or None."""
    if not topk_ids_TK.is_cuda or topk_ids_TK.numel() == 0 or torch.compiler.is_compiling():
        return None
    return _counting_sort(topk_ids_TK.device, num_experts)


@functools.lru_cache(maxsize=None)
def _counting_sort(device: torch.device, num_experts: int):
    """(kernels.expert_sort.sort_into, the tile schedule rows it writes) where it runs for this device and expert
    count, else None. Memoised: the plan is made twice per MoE layer and step, and the imports (deferred so that
    experts/ imports without triton) and the probe cost a few microseconds each. probe's dtype is that of the Triton
    kernels' data; the sort reads integer ids only, so any dtype the GPU runs gives the same answer."""
    from .backends.triton import probe

    if probe(device.type, device.index, torch.float32) is not None:
        return None
    from ..kernels.expert_sort import MAX_EXPERTS, sort_into
    from ..kernels.grouped_gemm import TILE_BLOCKS

    return (sort_into, len(TILE_BLOCKS)) if 1 <= num_experts <= MAX_EXPERTS else None
