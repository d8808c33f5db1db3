"""The optimizer step run inside the backward pass, so that no buffer ever holds every gradient at once.

    optimizer = StepInBackward(params, torch.optim.AdamW, lr=1e-4, fused=True)
    loss.backward()        # each chunk of parameters steps as soon as its last gradient arrives, then frees them
    optimizer.step()       # steps what is left (parameters whose chunk-mates got no gradient); ends the step
    optimizer.zero_grad()  # nothing left to clear

A normal step keeps every trainable parameter's gradient until backward ends: 4 bytes per parameter in fp32
(2.4 GiB for the 643M LoRA parameters of a whole Qwen3-30B-A3B), alive at the step's peak, which is late in the
backward. Here the parameters are split into chunks of consecutive parameters of about CHUNK_BYTES of gradient
(a layer or two: the gradients of one chunk arrive close together), each chunk with its own optimizer of the
given class; a post-accumulate-grad hook counts the arrivals and steps the chunk when its last gradient is in,
then sets those gradients to None. Elementwise optimizers (AdamW, 8-bit AdamW) compute exactly what one optimizer
over all the parameters computes.

What needs every gradient at once cannot run: clipping by the global gradient norm, and accumulating gradients
over several backward passes. A parameter whose chunk already stepped and that gets another gradient before
step() raises (a second backward pass, or a parameter used by two separate graphs).

Hyperparameters live in this optimizer's param_groups (learning-rate schedulers edit them there) and are copied
to a chunk's optimizer before each of its steps. state_dict() has the layout of one optimizer of the inner class
over all the parameters, so a checkpoint written with either loads into the other.
"""

from __future__ import annotations

import torch

__all__ = ["StepInBackward", "CHUNK_BYTES"]

# Gradient bytes per chunk: what may stay alive while its gradients come in, and few enough chunks (about 40 for a
# whole Qwen3-30B-A3B) that the host time of their steps stays small.
CHUNK_BYTES = 64 * 2**20


class StepInBackward(torch.optim.Optimizer):
    def __init__(self, params, optimizer_class, *, chunk_bytes: int = CHUNK_BYTES, **defaults):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: expected an integer >= 1, got {chunk_bytes!r}")
        self._optimizer_class = optimizer_class
        self._chunk_bytes = chunk_bytes
        self._chunks: list[tuple[dict, torch.optim.Optimizer, list[torch.Tensor]]] = []
        self._chunk_of: dict[torch.Tensor, int] = {}
        self._arrived: list[set[int]] = []  # per chunk: ids of the parameters whose gradient is in
        self._stepped: set[int] = set()  # chunks that stepped since the last step()
        self._hooks = []
        super().__init__(params, defaults)  # calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        given = _hyper(group)  # what the inner class takes; the first inner adds the rest of its own
        for params in _split(group["params"], self._chunk_bytes):
            inner = self._optimizer_class(params, **given)
            for key, value in inner.param_groups[0].items():  # the inner class's full set of hyperparameters
                group.setdefault(key, value)
            index = len(self._chunks)
            self._chunks.append((group, inner, params))
            self._arrived.append(set())
            for p in params:
                if not p.requires_grad:
                    raise ValueError("params: expected parameters that require grad")
                self._chunk_of[p] = index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    def _on_gradient(self, p: torch.Tensor) -> None:
        index = self._chunk_of[p]
        if index in self._stepped:
            raise RuntimeError(
                "StepInBackward: a parameter got a second gradient after its chunk stepped; the step in backward "
                "needs one backward pass per step() (no gradient accumulation) and each parameter in one graph")
        arrived = self._arrived[index]
        arrived.add(id(p))
        if len(arrived) == len(self._chunks[index][2]):
            self._step_chunk(index)

    @torch.no_grad()
    def _step_chunk(self, index: int) -> None:
        group, inner, params = self._chunks[index]
        inner.param_groups[0].update(_hyper(group))
        inner.step()
        for p in params:
            p.grad = None
        self._arrived[index].clear()
        self._stepped.add(index)

    def step(self, closure=None):
        """Step the chunks that got only some of their gradients (an optimizer skips parameters without one),
        and end the step: the next backward pass starts the next one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, arrived in enumerate(self._arrived):
            if arrived:
                self._step_chunk(index)
        self._stepped.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for arrived in self._arrived:
            arrived.clear()

    def remove_hooks(self) -> None:
        """Detach from the parameters (their gradients then stay, as without this optimizer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        """The layout of one inner-class optimizer over all the parameters (indices in param_groups order)."""
        index_of = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {}
        for _, inner, params in self._chunks:
            inner_state = inner.state_dict()["state"]
            for local, p in enumerate(params):
                if local in inner_state:
                    state[index_of[p]] = inner_state[local]
        groups = [dict(_hyper(g), params=[index_of[p] for p in g["params"]]) for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state_dict: its parameter groups do not match this optimizer's")
        saved_index = {p: i for g_own, g in zip(self.param_groups, groups) for p, i in zip(g_own["params"], g["params"])}
        for own, saved in zip(self.param_groups, groups):
            own.update(_hyper(saved))
        for group, inner, params in self._chunks:
            state = {local: state_dict["state"][saved_index[p]] for local, p in enumerate(params)
                     if saved_index[p] in state_dict["state"]}
            inner.load_state_dict({"state": state, "param_groups": [dict(_hyper(group), params=list(range(len(params))))]})


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _split(params: list[torch.Tensor], chunk_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters in chunks of at least chunk_bytes of gradient (the last may hold less)."""
    chunks, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= chunk_bytes:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks
