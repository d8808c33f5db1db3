"""The optimizer step run inside the backward pass, so that no buffer ever holds every gradient at once.

    optimizer = StepInBackward(params, torch.optim.AdamW, lr=1e-4, fused=True)
    loss.backward()        # each chunk of parameters steps as soon as its last gradient arrives, then frees them
    optimizer.step()       # steps what is left (parameters whose chunk-mates got no gradient); ends the step
    optimizer.zero_grad()  # nothing left to clear

A normal step keeps every trainable parameter's gradient until backward ends: 4 bytes per parameter in fp32
(2.4 GiB for the 643M LoRA parameters of a whole Qwen3-30B-A3B), alive at the step's peak, which is late in the
backward. Here the parameters are split into chunks of consecutive parameters of at most CHUNK_BYTES of gradient
(or one larger parameter; about a layer: chunks span layers, so two can be waiting for gradients at once), each chunk with its
own optimizer of the given class; a post-accumulate-grad hook counts the arrivals and steps the chunk when its last
gradient is in, then sets those gradients to None. Elementwise optimizers (AdamW, 8-bit AdamW) compute exactly what
one optimizer over all the parameters computes.

Not with several processes (DistributedDataParallel, FSDP): a gradient arrives here before it is averaged across
processes, so this is refused while a process group of more than one is initialised. What needs every gradient at
once cannot run: clipping by the global gradient norm, and accumulating gradients over several backward passes.
A clip after backward finds no gradients (they are stepped and freed) and clips nothing: handed to transformers'
Trainer, whose max_grad_norm defaults to 1.0, set max_grad_norm=0 (it logs a grad_norm of 0 otherwise). A parameter
whose chunk already stepped and that gets another gradient before step() or zero_grad() raises: a second backward pass, or a parameter used in two graphs (two segments of a
reentrant torch checkpoint; moetune's checkpointing is not reentrant). A backward that fails midway leaves the
chunks it reached stepped; zero_grad() then starts the next step.

Parameters that do not require grad when a group is added are left out of the chunks (never stepped, as the base
weights in `AdamW(model.parameters())`). Hyperparameters live in this optimizer's param_groups (learning-rate
schedulers edit them there) and are copied to a chunk's optimizer before each of its steps; the optimizer state
lives in the chunks' optimizers (`self.state` stays empty). state_dict() has the layout of one optimizer of the
inner class over all the parameters, so a checkpoint written with either loads into the other. Step hooks
(register_step_pre_hook) run at step(), not when the chunks step. A parameter is stepped by one StepInBackward at
a time: another one over it is refused until the first is garbage-collected or remove_hooks() is called.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["StepInBackward", "CHUNK_BYTES", "chunk_indices"]

# Gradient bytes per chunk: what may stay alive while its gradients come in, and few enough chunks (about 40 for a
# whole Qwen3-30B-A3B) that the host time of their steps stays small.
CHUNK_BYTES = 64 * 2**20


# Parameter -> the StepInBackward that steps it (a weak reference): two would both step it.
_owners = WeakIdKeyDictionary()  # keyed by identity: a tensor's == is elementwise


class StepInBackward(torch.optim.Optimizer):
    def __init__(self, params, optimizer_class, *, chunk_bytes: int = CHUNK_BYTES, **defaults):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: expected an integer >= 1, got {chunk_bytes!r}")
        _refuse_several_processes()
        self._optimizer_class = optimizer_class
        self._given = dict(defaults)  # the inner class's keyword arguments, as the caller gave them
        self._chunk_bytes = chunk_bytes
        self._chunks: list[tuple[dict, torch.optim.Optimizer, list[torch.Tensor]]] = []
        self._chunk_of: dict[torch.Tensor, int] = {}
        self._arrived: list[set[int]] = []  # per chunk: ids of the parameters whose gradient is in
        self._stepped: set[int] = set()  # chunks that stepped since the last step() or zero_grad()
        self._arrival_lock = threading.Lock()
        self._hooks = []
        super().__init__(params, defaults)  # calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params, names = group["params"], group.get("param_names")
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        for i in trainable:
            owner = _owners.get(params[i])
            if owner is not None and owner() is not None and owner() is not self:
                del self.param_groups[-1]
                raise ValueError("params: a parameter is already stepped in backward by another StepInBackward "
                                 "(call its remove_hooks() first)")
        ref = weakref.ref(self)
        for indices in chunk_indices([params[i] for i in trainable], self._chunk_bytes):
            chunk = [params[trainable[j]] for j in indices]
            inner_group = dict(_hyper(group), params=chunk)
            if names is not None:
                inner_group["param_names"] = [names[trainable[j]] for j in indices]
            inner = self._optimizer_class([inner_group], **self._given)
            for key, value in inner.param_groups[0].items():  # the inner class's full set of hyperparameters
                if key not in ("params", "param_names"):
                    group.setdefault(key, value)
            for key, value in inner.defaults.items():  # schedulers read defaults (OneCycleLR: betas)
                self.defaults.setdefault(key, value)
            index = len(self._chunks)
            self._chunks.append((group, inner, chunk))
            self._arrived.append(set())
            for p in chunk:
                self._chunk_of[p] = index
                _owners[p] = ref
                self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_arrive, ref)))

    def _on_gradient(self, p: torch.Tensor) -> None:
        index = self._chunk_of[p]
        # Each chunk lives on one device, so its gradients come on one autograd thread; the lock keeps the count
        # whole should two threads ever bring one chunk's (the chunk is marked stepped before it steps).
        with self._arrival_lock:
            if index in self._stepped:
                raise RuntimeError(
                    "StepInBackward: a parameter got a second gradient after its chunk stepped; the step in "
                    "backward needs one backward pass per step() (no gradient accumulation) and each parameter in "
                    "one graph")
            arrived = self._arrived[index]
            arrived.add(id(p))
            complete = len(arrived) == len(self._chunks[index][2])
            if complete:
                self._stepped.add(index)
        if complete:
            self._step_chunk(index)

    @torch.no_grad()
    def _step_chunk(self, index: int) -> None:
        _refuse_several_processes()  # (a process group made after this optimizer)
        group, inner, params = self._chunks[index]
        inner.param_groups[0].update(_hyper(group))
        inner.step()
        for p in params:
            p.grad = None
        self._arrived[index].clear()  # (_on_gradient marked the chunk stepped; step() ends the step after it)

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
        """Clear what gradients are left and end the step (also after a backward that failed midway)."""
        super().zero_grad(set_to_none)
        for arrived in self._arrived:
            arrived.clear()
        self._stepped.clear()

    def remove_hooks(self) -> None:
        """Detach from the parameters (their gradients then stay, as without this optimizer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p in self._chunk_of:
            owner = _owners.get(p)
            if owner is not None and owner() is self:
                del _owners[p]

    def __getstate__(self):
        raise TypeError("StepInBackward cannot be pickled or copied (its hooks live on the parameters); "
                        "save its state_dict() instead")

    def state_dict(self) -> dict:
        """The layout of one inner-class optimizer over all the parameters (indices in param_groups order)."""
        index_of = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {}
        for _, inner, params in self._chunks:
            inner_state = inner.state_dict()["state"]
            for local, p in enumerate(params):
                if local in inner_state:
                    state[index_of[p]] = inner_state[local]
        groups = [dict(_hyper(g), params=[index_of[p] for p in g["params"]],
                       **({"param_names": g["param_names"]} if "param_names" in g else {}))
                  for g in self.param_groups]
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
            inner_group = dict(inner.param_groups[0], **_hyper(group), params=list(range(len(params))))
            inner.load_state_dict({"state": state, "param_groups": [inner_group]})


def _refuse_several_processes() -> None:
    """A chunk steps on its gradients as they arrive in this process, before DistributedDataParallel (or FSDP) has
    averaged them over the processes: each process would step on its own batch only, apart from the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        raise RuntimeError("StepInBackward: not with several processes (DistributedDataParallel, FSDP): it steps each "
                           "gradient before they are averaged across processes; use a plain optimizer there")


def _arrive(ref, p: torch.Tensor) -> None:
    """The parameters' hook: holds its optimizer weakly, so a discarded one stops stepping."""
    owner = ref()
    if owner is not None:
        owner._on_gradient(p)


def _hyper(group: dict) -> dict:
    """A group's hyperparameters: what a chunk's optimizer copies before it steps."""
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def chunk_indices(params: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> list[list[int]]:
    """Indices of consecutive parameters in chunks of at most chunk_bytes of gradient (a larger parameter alone),
    each on one device: a model split over GPUs gets its gradients on one autograd thread per GPU, and a chunk's
    step then runs on the thread of the GPU it lives on."""
    chunks, current, size = [], [], 0
    for i, p in enumerate(params):
        if current and (size + p.nbytes > chunk_bytes or p.device != params[current[0]].device):
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += p.nbytes
    if current:
        chunks.append(current)
    return chunks
