"""Gradient checkpointing whose saved layer inputs wait in pinned host memory, copied on a side CUDA stream.

With checkpointing, what a decoder layer leaves on the GPU between forward and backward is its input hidden
state [B, T, H]. Qwen3-30B-A3B (48 layers, H=2048) at 32K tokens in bf16 keeps 48 x 128 MiB = 6 GiB of them on
top of 59 GiB of weights. `offloaded_checkpoint` copies each layer input to pinned host memory while the layer
computes and brings it back in backward, one layer ahead: the copy of layer i-1's input runs during layer i's
recompute and backward. The GPU then holds at most two layer inputs (the one in use and the prefetched one).

Design: torch.utils.checkpoint (non-reentrant) unchanged, inside a `saved_tensors_hooks` context. The
non-reentrant checkpoint saves the function's positional tensor arguments as autograd saved tensors before it
installs its own hook (which turns everything saved inside the function into recompute placeholders), so the
outer hook sees exactly those arguments: in transformers' convention
`_gradient_checkpointing_func(partial(forward, **kwargs), hidden_states)`, the hidden state. Keyword arguments
(masks, position embeddings, position ids: shared by all layers) live in the partial's closure and stay on the
GPU. Everything else is torch's own code: RNG stash and restore (dropout), autocast state, gradients of the
parameters inside the layer when its input does not require grad (the first layer after a frozen embedding),
`torch.autograd.grad`, outputs of any structure. The gradients are bitwise those of torch.utils.checkpoint: the
same autograd nodes run on the same values, only where the input waits in between changes.
A custom autograd.Function (Unsloth's offloaded checkpointer) is the reentrant design instead: it needs a dummy
input that requires grad so LoRA weights of the first layer get gradients, runs a nested backward whose
parameter gradients bypass `torch.autograd.grad`, and redoes the RNG handling.
transformers >= 5.17 `activation_checkpointing_enable(offload=True)` is the same composition with torch's
`save_on_cpu`: both copies run on the compute stream, so the layers' kernels wait for them (and torch 2.9's
device-to-host copy is blocking: the host waits for the GPU to reach each layer), and nothing is prefetched.

Stream safety (CUDA), for a layer input x:
  forward   side waits for compute (x is written there); side: pinned.copy_(x, non_blocking);
            x.record_stream(side): x is freed as soon as the next layer is done with it, and the caching
            allocator must not hand its block to a new tensor before the copy has read it.
  backward  x' = empty on compute; side waits for compute (x' may reuse a block compute-stream kernels still
            use); side: x'.copy_(pinned, non_blocking); event; x'.record_stream(side) (x' may be dropped
            unused); compute waits for the event before the recompute reads x'.
The pinned buffers come from torch's caching host allocator, which keeps each block until the copies recorded on
it are done. Elsewhere (CPU in the tests, other devices) "offload" is a plain copy into an ordinary host tensor
and back, through the same code.

Inside a CUDA graph capture (a whole step recorded and replayed, training/cuda_graph.py) two things change:
  - record_stream would keep each block from reuse until the capture ends (the allocator cannot query events
    while capturing), so the step would hold every layer input after all. Instead the compute stream waits for
    the copy to the host once the layer's forward is done (it has long finished by then: a layer computes for
    milliseconds, the copy of its input takes a fraction of one), and for the copy back before the recompute, as
    in eager mode; then the blocks go back to the graph's pool at once.
  - A replay writes and reads the host addresses its capture saw, and pinned memory cannot be allocated while
    capturing. `StaticHostBuffers` holds buffers made by the eager steps before the capture (same shapes) and
    reused from step to step; the capture takes the same ones, and they live as long as whoever holds the graph
    holds them. Every copy to and from them runs on the device's one side stream (buffers are kept per device), so
    a buffer handed to the next layer input is written only after the copy that read it.
  - A copy back that backward started but never used (the prefetch of an input whose layer autograd did not reach,
    as in torch.autograd.grad over some of the weights) must still be joined to the capture: such copies are kept,
    with their device blocks, until `join_unused_fetches()` (which capture_step calls after the step) makes the
    capturing stream wait for them.

Limits: the hooks are Python (a captured step runs them once, at its capture); an in-place change of a layer
input after its layer ran raises at backward time (as autograd's own version check does), not during the race with
the copy; one prefetch per unpack, in the order inputs were packed on this thread (two graphs alive at once still
prefetch correctly when backward runs through them in reverse packing order, otherwise a prefetched input waits
until it is used or its graph is freed).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch

from ..models.recompute import checkpoint

__all__ = ["StaticHostBuffers", "active_host_buffers", "disable_offloaded_checkpointing",
           "enable_offloaded_checkpointing", "join_unused_fetches", "offloaded_checkpoint"]

STANDARD_ATTR = "_moetune_standard_checkpointing_func"  # the checkpoint function offloading replaced
_side_streams: dict[int, torch.cuda.Stream] = {}
_thread = threading.local()  # .last: weakref to the _Stash packed last on this thread; .buffers: StaticHostBuffers
# copies back to the device started while capturing and not yet used: id(ready event) -> (the event, the device copy)
_unjoined: dict[int, tuple[torch.cuda.Event, torch.Tensor]] = {}


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's work is being recorded into a CUDA graph (the current stream of x's device is capturing)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class StaticHostBuffers:
    """Host buffers for the offloaded layer inputs of steps recorded as a CUDA graph, reused from step to step.

        buffers = StaticHostBuffers()
        with buffers.active():          # around the eager steps before the capture, and the capture
            step(); replay = capture_step(step)   # replay keeps `buffers`: the graph copies to and from them

    Inside `active()` on this thread, each offloaded layer input takes a buffer of its shape and dtype (pinned for a
    CUDA tensor) and gives it back when autograd lets the input go; a capture then finds the buffers its eager steps
    made and allocates none (pinned memory cannot be allocated while capturing)."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.buffers: list[torch.Tensor] = []  # every buffer made, kept alive with this object

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)  # pinned for a CUDA tensor
        free = self._free.setdefault(key, [])
        if free:
            return free.pop()
        if _capturing(like):
            raise RuntimeError(
                f"offloaded_checkpoint: a layer input of shape {tuple(like.shape)} came up in a CUDA graph capture "
                "without a host buffer from the eager steps before it; run the same step eagerly inside "
                "StaticHostBuffers.active() first")
        buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=like.is_cuda)
        self.buffers.append(buffer)
        return buffer

    def give_back(self, buffer: torch.Tensor, device: torch.device) -> None:
        """buffer, taken for a layer input on `device`, is free for the next one there."""
        self._free[(tuple(buffer.shape), buffer.dtype, device)].append(buffer)

    @contextlib.contextmanager
    def active(self):
        """Offloaded layer inputs packed on this thread inside the block take their host buffers from here."""
        outer = active_host_buffers()
        _thread.buffers = self
        try:
            yield self
        finally:
            _thread.buffers = outer


def active_host_buffers() -> StaticHostBuffers | None:
    """The StaticHostBuffers active on this thread, if any (what a capture must keep alive with its graph)."""
    return getattr(_thread, "buffers", None)


class _Stash:
    """One offloaded layer input: its host copy, and its device copy while fetched but not yet used."""

    __slots__ = ("__weakref__", "buffers", "copied", "device", "fetched", "host", "previous", "ready", "source",
                 "version")

    def __init__(self, x: torch.Tensor):
        self.device = x.device
        # Weak: the stash must not keep the device tensor alive (freeing it is the point); kept to detect an
        # in-place change, as autograd does for the tensors it saves itself.
        self.source = weakref.ref(x)
        self.version = x._version
        self.fetched = self.ready = self.copied = None
        last = getattr(_thread, "last", None)
        self.previous = last  # weakref or None: the input packed before this one, fetched after it
        _thread.last = weakref.ref(self)
        cuda, capturing = x.device.type == "cuda", _capturing(x)
        self.buffers = active_host_buffers()
        if self.buffers is not None:
            self.host = self.buffers.take(x)
        elif capturing:
            raise RuntimeError("offloaded_checkpoint: inside a CUDA graph capture the layer inputs need host buffers "
                               "made before it: run the eager steps and the capture inside StaticHostBuffers.active()")
        else:
            self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=cuda)
        if cuda:
            side = _side_stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                self.host.copy_(x, non_blocking=True)
                if capturing:  # offloaded_checkpoint makes the compute stream wait for it after the layer
                    self.copied = side.record_event()
            if not capturing:
                x.record_stream(side)
        else:
            self.host.copy_(x)

    def __del__(self):
        # autograd let this input go: the next layer input may take the buffer (its copies queue behind this one's
        # on the same side stream)
        buffers = getattr(self, "buffers", None)
        if buffers is not None and getattr(self, "host", None) is not None:
            buffers.give_back(self.host, self.device)

    def fetch(self) -> None:
        """Start the copy back to the device (no-op when already started)."""
        if self.fetched is not None:
            return
        x = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        if self.device.type == "cuda":
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                x.copy_(self.host, non_blocking=True)
                self.ready = side.record_event()
            if _capturing(x):  # take() waits for `ready` before any use; join_unused_fetches() if none comes
                _unjoined[id(self.ready)] = (self.ready, x)
            else:
                x.record_stream(side)
        else:
            x.copy_(self.host)
        self.fetched = x

    def take(self) -> torch.Tensor:
        """The device copy, usable on the current stream; then start fetching the previous input."""
        source = self.source()
        if source is not None and source._version != self.version:
            raise RuntimeError(
                "offloaded_checkpoint: a layer input was modified by an inplace operation after its layer ran "
                f"(version {self.version} -> {source._version}); its gradients would be wrong"
            )
        self.fetch()
        x, self.fetched = self.fetched, None  # a second backward (retain_graph) fetches again
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            _unjoined.pop(id(self.ready), None)
            self.ready = None
        previous = self.previous() if self.previous is not None else None
        if previous is not None and previous.device == self.device:
            previous.fetch()
        return x


def join_unused_fetches() -> int:
    """Make the current stream (a capturing one) wait for the copies back to the device that backward started while
    capturing and never used, then let their device blocks go; returns how many. A capture must end with every
    stream it forked joined, and a block must not be reused while a copy still writes it. Call it inside the capture
    after the step (capture_step does); a no-op when every fetched input was used, as in a full backward."""
    pending = list(_unjoined.values())
    _unjoined.clear()
    for ready, x in pending:
        torch.cuda.current_stream(x.device).wait_event(ready)
    return len(pending)


def _unpack(packed):
    return packed.take() if isinstance(packed, _Stash) else packed


def offloaded_checkpoint(function, *args, use_reentrant: bool = False, **kwargs):
    """torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs), with the positional
    tensor arguments held on the host between forward and backward.

    Same calling convention as transformers' `_gradient_checkpointing_func`. Keyword arguments of `function`
    belong in a partial (they are not offloaded); `kwargs` are checkpoint's own options.
    """
    if use_reentrant:
        raise ValueError("use_reentrant: offloaded checkpointing builds on the non-reentrant checkpoint; got True")
    if not torch.is_grad_enabled():  # nothing is saved
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    # Cleared on exit: autograd keeps the pack hook alive with every tensor it packed, and a hook holding the
    # arguments would keep them on the device.
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    stashed = []

    def pack(t: torch.Tensor):
        # Older torch (2.9) also saves checkpoint's own 0-element dummy here: keep anything else as it is.
        if not any(t is a for a in inputs):
            return t
        stash = _Stash(t)
        stashed.append(stash)
        return stash

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            out = checkpoint(function, *args, use_reentrant=False, **kwargs)
        for stash in stashed:  # captured: the copies to the host done before the inputs' blocks can be reused
            if stash.copied is not None:
                torch.cuda.current_stream(stash.device).wait_event(stash.copied)
                stash.copied = None
        return out
    finally:
        inputs.clear()
        stashed.clear()


def _checkpointable_layers(model) -> list:
    """The decoder layers checkpointing was enabled on: those checkpointing now, and those a partial plan left out
    (get_peft_model's checkpoint_layers), which a memory plan may checkpoint later by their flag alone."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
            and (m.gradient_checkpointing or "_gradient_checkpointing_func" in m.__dict__)]


def enable_offloaded_checkpointing(model) -> int:
    """Switch every decoder layer of `model` (transformers model, bare or peft-wrapped) that checkpointing was
    enabled on to `offloaded_checkpoint`, whether it checkpoints now or only once a plan sets its flag; returns the
    number of layers. Checkpointing must be enabled already; checkpoint options set then (transformers' partial
    keywords) are kept. Idempotent."""
    layers = _checkpointable_layers(model)
    if not layers:
        raise ValueError(
            "model: no decoder layer has gradient checkpointing enabled; enable it first "
            "(FastMoEModel.get_peft_model(use_gradient_checkpointing=True) or activation_checkpointing_enable)"
        )
    for layer in layers:
        func = layer._gradient_checkpointing_func
        if isinstance(func, functools.partial) and func.func is offloaded_checkpoint:
            continue
        options = dict(func.keywords) if isinstance(func, functools.partial) else {}
        if options.get("use_reentrant"):
            raise ValueError("model: checkpointing uses use_reentrant=True; offloading needs the non-reentrant one")
        options.pop("use_reentrant", None)
        setattr(layer, STANDARD_ATTR, func)
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, **options)
    return len(layers)


def disable_offloaded_checkpointing(model) -> int:
    """Give every layer switched by enable_offloaded_checkpointing its previous checkpointing function back;
    returns the number of layers restored."""
    restored = 0
    for module in model.modules():
        func = module.__dict__.pop(STANDARD_ATTR, None)
        if func is not None:
            module._gradient_checkpointing_func = func
            restored += 1
    return restored
