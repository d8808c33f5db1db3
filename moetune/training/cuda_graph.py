"""A whole training step recorded once as a CUDA graph and replayed: the host then issues a step in one call.

    without_rng_state(model)                  # before the first step: checkpoints that keep no RNG state
    host_buffers = StaticHostBuffers()        # offloaded checkpoints' host buffers (offload.py), kept by replay
    with host_buffers.active():
        step()                                # eager steps first: compiles, autotuning, the optimizer's state
        replay = capture_step(step)           # step() again, recorded (after a few warm-up runs on a side stream)
    loss = replay()                           # the same step on the same input buffers, one launch from the host

Why: a whole-model step issues ~7,500-15,000 launches through Python, autograd and the checkpoint hooks, and on
the slower hosts lent so far the GPU waited on them: on one H200 a whole Qwen3-30B-A3B step at 8K took 700 ms
eagerly and 600 ms replayed (NOTES run 83e; on a fast H100 host 1.00-1.01x, run 61d).

What a step must be for its replays to be the steps it stands for: the same shapes and input buffers every time
(copy each batch into the captured input tensors); no host number that changes from step to step inside it
(AdamWBf16(capturable=True) or torch's optimizers with capturable=True, a tensor learning rate filled in place by the
schedule); no synchronisation with the host (a loss read with .item() belongs after the replay); checkpoints
offloaded to the host only with host buffers made before the capture (offload.StaticHostBuffers, active around the
eager steps and the capture; capture_step keeps them with the graph). transformers' mask functions
take a capture for tracing and then build an explicit [T, T] mask where the eager step has none (the causal flash
path): `eager_masks` answers for them as they decide eagerly for one unpacked sequence per row, so inputs must be
that (no packed batches under a graph).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from .offload import active_host_buffers, join_unused_fetches

__all__ = ["capture_step", "eager_masks", "on_side_stream", "without_rng_state"]


def without_rng_state(model: torch.nn.Module) -> None:
    """The model's gradient checkpoints, set to neither save nor restore the RNG state: a capture cannot record a
    generator's state being read and set on the host, and the layers of the models moetune trains draw no random
    numbers in training (dropout 0). A model with dropout would recompute other masks: refuse it there."""
    for module in model.modules():
        # nn.Dropout and its kin (Dropout1d-3d, AlphaDropout: _DropoutNd), and attention dropout, which transformers'
        # attention modules hold as a float and hand to the attention function
        rate = module.p if isinstance(module, torch.nn.modules.dropout._DropoutNd) else \
            getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            raise ValueError(f"model: a CUDA graph step needs no dropout (a recompute without the RNG state draws "
                             f"other masks), got {type(module).__name__} with {rate}")
        jitter = getattr(module, "jitter_noise", 0.0)  # Mixtral's router_jitter_noise: noise on the router's input
        if isinstance(jitter, (int, float)) and jitter > 0:
            raise ValueError(f"model: a CUDA graph step needs no router jitter (a recompute without the RNG state "
                             f"draws other noise and may route otherwise), got {type(module).__name__} with {jitter}")
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, functools.partial):
            module._gradient_checkpointing_func = functools.partial(
                func.func, *func.args, **{**func.keywords, "preserve_rng_state": False})


@contextlib.contextmanager
def eager_masks():
    """transformers' mask functions as they decide eagerly for a batch of unpacked rows, while a capture runs: they
    take a CUDA stream capture for tracing (is_tracing) and then skip their packed-batch check and the causal
    shortcut, building an explicit mask the eager step does not have."""
    from transformers import masking_utils

    saved = masking_utils.is_tracing, masking_utils.find_packed_sequence_indices
    # Without a mask tensor: not tracing, so the causal shortcut holds. With one (padded rows), transformers' own
    # answer: taken for tracing, it builds the mask rather than read the tensor on the host to skip it.
    masking_utils.is_tracing = lambda tensor=None: False if tensor is None else saved[0](tensor)
    masking_utils.find_packed_sequence_indices = lambda position_ids: None  # one sequence per row: eager's answer
    try:
        yield
    finally:
        masking_utils.is_tracing, masking_utils.find_packed_sequence_indices = saved


def on_side_stream(run: Callable, side: torch.cuda.Stream | None = None):
    """run() on a side stream, after the work queued on the current stream and before what is queued there next:
    torch's recipe for the eager steps before a capture (libraries that set themselves up at a first call on a
    stream do it there, not inside the capture). Returns what run returns."""
    side = torch.cuda.Stream() if side is None else side
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = run()
    torch.cuda.current_stream().wait_stream(side)
    return result


def capture_step(step: Callable[[], torch.Tensor], warmup: int = 3,
                 stream: torch.cuda.Stream | None = None) -> Callable[[], torch.Tensor]:
    """step() recorded as one CUDA graph; returns replay(), which runs it again and returns a copy of the loss it
    produced. step must leave no gradient behind (zero_grad(set_to_none=True) at its end, or the step in backward),
    and must have run eagerly before (compiles and autotuning are host work a capture cannot do). warmup: steps run
    on the capture's stream first, torch's recipe for libraries that set themselves up at a first call on a stream;
    they are training steps (the optimizer steps on the batch in the input tensors). The capture itself runs nothing.

    stream: the side stream to warm up and capture on (default: a new one). Pass the stream earlier eager steps ran
    on: cuBLAS keeps a workspace per thread (the caller's and autograd's) and stream, and a capture on a stream of
    its own allocates new ones (tens of MB on Hopper) in the graph's pool, above the peak those steps measured (and
    a memory plan checked)."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an integer >= 0, got {warmup!r}")
    if stream is not None and not isinstance(stream, torch.cuda.Stream):
        raise ValueError(f"stream: expected a torch.cuda.Stream or None, got {type(stream).__name__}")
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step: CUDA graphs need a CUDA GPU")
    side = torch.cuda.Stream() if stream is None else stream
    with eager_masks():
        on_side_stream(lambda: [step() for _ in range(warmup)], side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the eager steps' cached blocks, for the graph's private pool to take
    graph = torch.cuda.CUDAGraph()
    with eager_masks(), torch.cuda.graph(graph, stream=side):  # torch's own capture stream would need workspaces
        loss = step()
        join_unused_fetches()  # copies back of offloaded inputs that backward prefetched and never used

    def replay() -> torch.Tensor:
        graph.replay()
        return loss.clone()

    replay.graph = graph  # kept alive with the function; its pool holds the step's working memory
    replay.host_buffers = active_host_buffers()  # the graph copies offloaded inputs to and from their addresses
    return replay
