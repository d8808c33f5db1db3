"""How many decoder layers to checkpoint so that one training step fits the GPU (`checkpoint_layers="auto"`).

Checkpointing every layer costs each step one more forward of every layer (about a quarter of the step);
a layer left out keeps its activations on the GPU instead. Which is better depends on spare memory, and
that depends on the model, the tokens per step, the GPU and the optimizer, so it is measured, not guessed:

1. One probe step (forward + backward, no optimizer step) on random token ids of the planned [batch, length]
   shape, every layer checkpointed except the last decoder layer. The step's peak memory is measured, and the
   bytes the last layer's forward keeps alive (its activations, from forward to backward).
2. The optimizer's state is not allocated yet: trainable parameters x its bytes per parameter are added.
3. Layers left out: (budget - peak - optimizer state) // activations per layer, budget = a fraction of the
   device's memory (at most what is free plus what this process's allocator holds). The first `layers - left out` layers stay checkpointed (get_peft_model's checkpoint_layers).

Attention is flash/sdpa (linear in tokens), so a shorter batch later needs less; a longer one than planned
may not fit: plan for the longest batch. Not on CPU (no memory to plan for): everything stays checkpointed.
"""

from __future__ import annotations

import torch

__all__ = ["fit_checkpoint_layers", "choose_checkpoint_layers", "OPTIMIZER_STATE_BYTES"]

# Optimizer state per trainable parameter, allocated at the first step: AdamW's two fp32 moments; 8-bit AdamW's.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}


def choose_checkpoint_layers(layers: int, per_layer: int, probe_peak: int, state: int, budget: int) -> int:
    """Layers to keep checkpointed, from a probe step that left one layer (of per_layer bytes) un-checkpointed."""
    spare = budget - probe_peak - state
    if spare < 0:  # even the probe's one un-checkpointed layer does not fit
        return layers
    left_out = 1 + spare // per_layer
    return max(0, layers - left_out)


def _layers(model) -> list:
    from .fast_model import _decoder_layers

    return _decoder_layers(model)


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def fit_checkpoint_layers(
    model, batch_size: int, seq_len: int, *, memory_fraction: float = 0.9, optimizer: str = "adamw"
) -> dict:
    """Measure one probe step and set how many decoder layers stay checkpointed (see the module docstring).

    model: from FastMoEModel.get_peft_model(..., use_gradient_checkpointing=True), on one CUDA device.
    Returns what was measured and chosen: {"checkpoint_layers", "layers", "activation_bytes_per_layer",
    "probe_peak_bytes", "optimizer_state_bytes", "budget_bytes"}; on CPU {"checkpoint_layers": None, ...}.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction: expected a number in (0, 1], got {memory_fraction!r}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    layers = _layers(model)
    # Enabled once by get_peft_model (the layer's checkpoint function); the flags are what a plan changes, so
    # planning again (another length) works.
    if not layers or not all(getattr(layer, "_gradient_checkpointing_func", None) for layer in layers):
        raise ValueError("model: expected gradient checkpointing enabled (get_peft_model(use_gradient_checkpointing=True))")
    device = next(p.device for p in model.parameters())
    if device.type != "cuda":
        return {"checkpoint_layers": None, "layers": len(layers), "why": f"no memory plan on {device.type}"}

    last = layers[-1]
    for layer in layers:
        layer.gradient_checkpointing = layer is not last
    kept = {}

    def before(module, args, kwargs):
        kept["start"] = torch.cuda.memory_allocated(device)

    def after(module, args, kwargs, output):
        kept["bytes"] = torch.cuda.memory_allocated(device) - kept["start"]

    hooks = [last.register_forward_pre_hook(before, with_kwargs=True),
             last.register_forward_hook(after, with_kwargs=True)]
    was_training = model.training
    measured = False
    try:
        with torch.random.fork_rng(devices=[device]):  # the probe leaves the caller's random streams as they were
            ids = torch.randint(0, _vocab_size(model), (batch_size, seq_len), device=device)
            model.train()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            del ids
        measured = True
    finally:
        for hook in hooks:
            hook.remove()
        if not measured:  # e.g. out of memory: leave every layer checkpointed, the safe state
            for layer in layers:
                layer.gradient_checkpointing = True
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    torch.cuda.empty_cache()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * OPTIMIZER_STATE_BYTES[optimizer]
    free, total = torch.cuda.mem_get_info(device)
    # What this process may use: a fraction of the device, and no more than is free now plus what torch's caching
    # allocator already holds (other processes on the same GPU keep theirs).
    budget = int(min(memory_fraction * total, free + torch.cuda.memory_reserved(device)))
    per_layer = max(int(kept["bytes"]), 1)
    checkpointed = choose_checkpoint_layers(len(layers), per_layer, peak, state, budget)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < checkpointed
    return {
        "checkpoint_layers": checkpointed,
        "layers": len(layers),
        "activation_bytes_per_layer": per_layer,
        "probe_peak_bytes": peak,
        "optimizer_state_bytes": state,
        "budget_bytes": budget,
    }
