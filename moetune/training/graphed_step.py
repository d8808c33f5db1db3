"""moetune train's step under --cuda-graph: fixed input buffers, eager first steps, then one capture and replays.

    step = GraphedStep(peft_model, optimizer, params, load, config, device, pad_id)
    step.fill(units_of_each_micro_batch)                # the step's batches copied into the buffers
    loss_sum = step.run(capture=ready)                  # eager (side stream) until ready, then captured once, replayed

Every micro-batch is data.collate_fixed's [batch_size, max_seq_length] (right padding, no attention mask), and a
step always runs grad_accum of them (a short last step's missing ones are all padding: every label ignored, so they
add nothing to the loss, which is divided by the step's real labels, nor to the gradients). The buffers, the label
count and the learning rate (a tensor the schedule fills) are what a replay reads; clipping and the optimizer step
are inside the graph. Why a graph, and what a captured step must be: cuda_graph.py.
"""

from __future__ import annotations

import warnings

import torch

from ..messages import first_line
from . import data as data_mod
from .cuda_graph import capture_step, on_side_stream, without_rng_state
from .offload import StaticHostBuffers

__all__ = ["GraphedStep", "for_graph", "for_eager"]


def for_graph(optimizer, device) -> None:
    """Each group capturable (step counts and bias corrections on the device), its learning rate a one-element
    float32 tensor on `device`, which the schedule fills in place and a replayed step reads (a float would be
    recorded as the value it had at the capture). After a checkpoint is loaded too: torch's load_state_dict takes the
    saved groups' capturable and lr (an eager run's False and float)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def for_eager(optimizer) -> None:
    """Each group's learning rate a float and capturable off: a checkpoint written under --cuda-graph holds tensors
    and capturable groups, which an eager run would read on the host each step or step on the slower capturable
    path."""
    for group in optimizer.param_groups:
        group["capturable"] = False
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])


class GraphedStep:
    def __init__(self, model, optimizer, params: list, load, config, device: torch.device, pad_id: int):
        without_rng_state(model)  # before any step: the checkpoints' recompute keeps no RNG state (no dropout)
        self.model, self.optimizer, self.params, self.load = model, optimizer, params, load
        self.max_grad_norm = config.max_grad_norm
        self.rows, self.length, self.pad_id = config.batch_size, config.max_seq_length, pad_id
        shape = (config.batch_size, config.max_seq_length)
        self.inputs = [{"input_ids": torch.zeros(shape, dtype=torch.long, device=device),
                        "labels": torch.zeros(shape, dtype=torch.long, device=device),
                        "token_mask": torch.zeros(shape, dtype=torch.bool, device=device)}
                       for _ in range(config.grad_accum)]
        self.num_items = torch.zeros((), dtype=torch.long, device=device)  # transformers' num_items_in_batch
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the offloaded layer inputs' host buffers: made by the eager steps, the graph's from its capture on
        self.host_buffers = StaticHostBuffers()
        self.replay = None

    def fill(self, micro_batches: list[list]) -> int:
        """Copy one step's micro-batches (each a list of units) into the buffers; returns its real tokens."""
        if len(micro_batches) > len(self.inputs):
            raise ValueError(f"micro_batches: expected at most {len(self.inputs)}, got {len(micro_batches)}")
        batches = [data_mod.collate_fixed(micro_batches[i] if i < len(micro_batches) else [], self.pad_id, self.rows,
                                          self.length) for i in range(len(self.inputs))]
        for inputs, batch in zip(self.inputs, batches):
            for name, buffer in inputs.items():
                # pinned: an asynchronous copy (torch keeps the pinned block until the copy is done)
                buffer.copy_(batch[name].pin_memory() if buffer.is_cuda else batch[name], non_blocking=True)
        self.num_items.fill_(sum(int((b["labels"] != data_mod.IGNORE).sum()) for b in batches))
        return sum(int(b["token_mask"].sum()) for b in batches)

    def _step(self) -> torch.Tensor:
        with self.host_buffers.active():
            return self._micro_batches()

    def _micro_batches(self) -> torch.Tensor:
        total = None
        for inputs in self.inputs:
            self.load.token_mask = inputs["token_mask"].view(-1)
            loss = self.model(input_ids=inputs["input_ids"], labels=inputs["labels"], num_items_in_batch=self.num_items,
                              use_cache=False).loss
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            del loss  # its graph, and what its nodes hold, would live into the next micro-batch's forward
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run(self, capture: bool) -> torch.Tensor:
        """One step on the buffers' batches; returns the sum of its micro-batches' losses (on the device). capture:
        record the step now (once; it must have run eagerly before) and replay it from here on."""
        if self.replay is None and capture:
            try:
                # the eager steps on the side stream were its warm-up, and made (and the plan counted) its workspaces
                self.replay = capture_step(self._step, warmup=0, stream=self.side)
            except RuntimeError as err:  # something in the step reads a result on the host, or cannot be recorded
                raise RuntimeError(f"--cuda-graph: the training step could not be recorded as a CUDA graph "
                                   f"({first_line(err)}); run without --cuda-graph") from err
        if self.replay is not None:
            return self.replay()
        with warnings.catch_warnings():
            # torch's optimizers warn that a capturable one steps eagerly: here on purpose, before the capture
            warnings.filterwarnings("ignore", message=".*capturable=True.*without .* graph capture", category=UserWarning)
            # (on a side stream, the eager steps the capture's warm-up would otherwise repeat on the same batch)
            return self._step() if self.side is None else on_side_stream(self._step, self.side)
