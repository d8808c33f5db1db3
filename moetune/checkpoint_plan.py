"""How many decoder layers to checkpoint so that one training step fits the GPU (`checkpoint_layers="auto"`).

Checkpointing every layer costs each step one more forward of every layer (about a quarter of the step);
a layer left out keeps its activations on the GPU instead. Which is better depends on spare memory, and
that depends on the model, the tokens per step, the GPU and the optimizer, so it is measured, not guessed:

1. One probe step (forward + backward, no optimizer step) on random token ids of the planned [batch, length]
   shape, every layer checkpointed except the first and the last decoder layer (dense and MoE layers differ in
   some models: both ends are measured, the larger counts). The step's peak memory is measured, and for those two
   layers the bytes their forward keeps alive plus their input (which a checkpointed, offloaded layer would not
   keep on the GPU).
2. The optimizer's state is not allocated yet: trainable parameters x its bytes per parameter are added.
3. Layers left out: (budget - peak - optimizer state) // bytes per layer, more than the two the probe left out;
   budget = memory_fraction of what this process can have (the device, or what is free plus what torch's
   allocator holds, whichever is less), or max_memory_gib if that is less (a smaller card to plan for, a GPU
   shared with another job). The first `layers - left out` layers stay checkpointed.

If the probe itself runs out of memory, every layer stays checkpointed. Attention is flash/sdpa (linear in
tokens), so a shorter batch later needs less; a longer one than planned may not fit: plan for the longest batch.
Not on CPU (no memory to plan for): everything stays checkpointed. Calling transformers'
gradient_checkpointing_enable again afterwards (HF Trainer does, when its gradient_checkpointing is on)
checkpoints every layer again.
"""

from __future__ import annotations

import torch

__all__ = ["fit_checkpoint_layers", "choose_checkpoint_layers", "OPTIMIZER_STATE_BYTES"]

# Optimizer state per trainable parameter, allocated at the first step: AdamW's two fp32 moments; 8-bit AdamW's.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}


def choose_checkpoint_layers(layers: int, per_layer: int, probe_peak: int, state: int, budget: int,
                             probed: int = 1) -> int:
    """Layers to keep checkpointed, from a probe step that left `probed` layers (per_layer bytes each) out."""
    spare = budget - probe_peak - state
    if spare < 0 or per_layer <= 0:  # the probe's own layers do not fit, or nothing sensible was measured
        return layers
    left_out = probed + spare // per_layer
    return max(0, layers - left_out)


class CudaMemory:
    """The allocator figures the planner reads (a fake stands in for it in CPU tests)."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def available(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return min(total, free + torch.cuda.memory_reserved(self.device))

    def release(self) -> None:
        torch.cuda.empty_cache()


def _layers(model) -> list:
    from .fast_model import _decoder_layers

    return _decoder_layers(model)


def fit_checkpoint_layers(
    model, batch_size: int, seq_len: int, *, memory_fraction: float = 0.9, max_memory_gib: float | None = None,
    optimizer: str = "adamw", memory=None,
) -> dict:
    """Measure one probe step and set how many decoder layers stay checkpointed (see the module docstring).

    model: from FastMoEModel.get_peft_model(..., use_gradient_checkpointing=True), on one CUDA device. The probe
    clears the parameters' .grad and the device's peak-memory statistics. max_memory_gib: a cap on the budget in GiB
    (torch.cuda.max_memory_allocated's measure). memory: for tests (CudaMemory's methods).
    Returns what was measured and chosen: {"checkpoint_layers", "layers", "activation_bytes_per_layer",
    "probe_peak_bytes", "optimizer_state_bytes", "budget_bytes"}, plus "why" where even every layer checkpointed
    is estimated over the budget; or {"checkpoint_layers", "layers", "why"} when nothing was measured (CPU:
    checkpoint_layers None, nothing changed; probe out of memory: all layers).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) or not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction: expected a number in (0, 1], got {memory_fraction!r}")
    if max_memory_gib is not None and (
        isinstance(max_memory_gib, bool) or not isinstance(max_memory_gib, (int, float))
        or not 0 < max_memory_gib < float("inf")
    ):
        raise ValueError(f"max_memory_gib: expected None or a number of GiB > 0, got {max_memory_gib!r}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    layers = _layers(model)
    # Enabled once by get_peft_model (the layer's checkpoint function); the flags are what a plan changes, so
    # planning again (another length) works.
    if not layers or not all(getattr(layer, "_gradient_checkpointing_func", None) for layer in layers):
        raise ValueError("model: expected gradient checkpointing enabled (get_peft_model(use_gradient_checkpointing=True))")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"model: expected all parameters on one device to plan its memory, got {sorted(map(str, devices))}")
    (device,) = devices
    if memory is None:
        if device.type != "cuda":
            return {"checkpoint_layers": None, "layers": len(layers), "why": f"no memory plan on {device.type}"}
        memory = CudaMemory(device)

    probed = [layers[0], layers[-1]] if len(layers) > 1 else [layers[0]]
    for layer in layers:
        layer.gradient_checkpointing = not any(layer is p for p in probed)
    kept: dict[int, int] = {}

    def before(module, args, kwargs):
        kept[id(module)] = -memory.allocated()

    def after(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        kept[id(module)] += memory.allocated() + (hidden.nbytes if isinstance(hidden, torch.Tensor) else 0)

    hooks = [h for layer in probed for h in (layer.register_forward_pre_hook(before, with_kwargs=True),
                                             layer.register_forward_hook(after, with_kwargs=True))]
    was_training = model.training
    peak = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG stays
            ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch_size, seq_len), device=device)
            model.train()
            model.zero_grad(set_to_none=True)
            memory.start()
            model(input_ids=ids, labels=ids).loss.backward()
            peak = memory.peak()
            del ids
    except torch.OutOfMemoryError:
        pass  # below: every layer checkpointed, as before the probe
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if peak is None:
            for layer in layers:
                layer.gradient_checkpointing = True
        memory.release()
    if peak is None:
        return {"checkpoint_layers": len(layers), "layers": len(layers),
                "why": f"the probe step ran out of memory at batch {batch_size} x {seq_len} tokens"}

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * OPTIMIZER_STATE_BYTES[optimizer]
    budget = int(memory_fraction * memory.available())
    if max_memory_gib is not None:
        budget = min(budget, int(max_memory_gib * 2**30))
    per_layer = max(kept.values(), default=0)
    checkpointed = choose_checkpoint_layers(len(layers), per_layer, peak, state, budget, probed=len(probed))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < checkpointed
    plan = {
        "checkpoint_layers": checkpointed,
        "layers": len(layers),
        "activation_bytes_per_layer": per_layer,
        "probe_peak_bytes": peak,
        "optimizer_state_bytes": state,
        "budget_bytes": budget,
    }
    # Every layer checkpointed: the probe's peak less what the layers it left out kept, plus the optimizer state.
    least = peak - sum(kept.values()) + state
    if least > budget:
        plan["why"] = (f"even with every layer checkpointed the step is estimated at {least / 2**30:.1f} GiB, "
                       f"over the budget of {budget / 2**30:.1f} GiB: it may not fit")
    return plan
