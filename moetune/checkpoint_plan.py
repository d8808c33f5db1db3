"""How many decoder layers to checkpoint so that one training step fits the GPU (`checkpoint_layers="auto"`),
and how many of those keep their attention output (moetune/models/kept_attention.py).

Checkpointing every layer costs each step one more forward of every layer (about a quarter of the step);
a layer left out keeps its activations on the GPU instead. Which is better depends on spare memory, and
that depends on the model, the tokens per step, the GPU and the optimizer, so it is measured, not guessed:

1. One probe step (forward + backward, no optimizer step) on random token ids of the planned [batch, length]
   shape, every layer checkpointed except the first and the last decoder layer (dense and MoE layers differ in
   some models: both ends are measured, the larger counts); the checkpointed ones keep their attention output.
   The step's peak memory is measured; for the two ends, the bytes their forward keeps alive plus their input
   (which a checkpointed, offloaded layer would not keep on the GPU); for the others, the attention output kept.
2. The optimizer's state is not allocated yet: trainable parameters x its bytes per parameter are added. With the
   step in backward (training/step_in_backward.py) the probe holds the gradients as its chunks do: each until
   every parameter of its chunk has one, then the chunk's are dropped. Chunks span layers, and a chunk's
   gradients arrive at different times of the backward (a layer's experts first, its attention last), so several
   chunks can hold some of theirs at once, which adding the largest chunk once (before session 21) did not
   count. The chunks' own steps are not run; their temporaries are small for the optimizers moetune train makes
   (fused AdamW, AdamWBf16's one launch, 8-bit AdamW).
3. From the spare memory (budget - the estimate for every layer checkpointed, none keeping attention): first
   checkpointed layers keep their attention output, then layers are left out of checkpointing, each for its
   activations less the attention output it no longer keeps. Kept attention comes first because it buys more
   time per byte: its output is a small part of a layer's activations (Qwen3-30B-A3B at 8K: 64 of ~460 MiB)
   and the kernel a large part of its recompute (~0.85 of ~3.4 ms), and the ratio grows with the length.
   Within the budget the last layer is always left out: its backward runs first, so checkpointing it saves
   nothing at the step's peak (a checkpointed last layer recomputes there at once what it did not hold).
   budget = memory_fraction of what this process can have (the device, or what is free plus what torch's
   allocator holds, whichever is less), or max_memory_gib if that is less (a smaller card to plan for, a GPU
   shared with another job). The first `checkpoint_layers` layers stay checkpointed, the first
   `kept_attention_layers` of them keep their attention.
4. The estimate in 3 assumes the step peaks where the probe did; it need not (GLM-4.7-Flash at 8K under a 64 GiB
   cap: planned within it, measured 1.1 GiB over). So a plan beyond every layer checkpointed without kept
   attention is checked by a second probe step with the plan itself (its peak plus the optimizer state); while
   that is over the budget, layers go back to checkpointing (they buy the least time per byte), then kept
   attention is dropped, by as many as the excess needs and one more (a margin: in run 50g whole Qwen3-30B-A3B at
   8K fell to the floor after its checks, the last at 66.0 GiB against a budget of 66.0 GiB),
   and the check repeats; a plan still over after three checks, or a check that runs out of memory, falls back to
   every layer checkpointed, none keeping attention. The plan reports each check (`checks`).

5. The probe is not the training step: the optimizer's state comes into the estimate as a sum, not as it lives,
   and the step's own work is not run. Whole Qwen3-30B-A3B at 8K peaked 0.14 GiB over its checked plan in run 56
   (66.14 against 66.00 GiB; run 52c, 0.05 under), and 0.17 GiB over its checked plan on an H100 in run 58b
   (the probe steps nothing; the real step's optimizer chunks work inside backward). So a training loop hands
   its first steps' peaks to `refit_to_step` (through StepChecks), which gives
   back as a failed check does while a real step is over the budget; moetune train and
   benchmarks/train_step.py do. Steps that autotune are skipped: the timing's buffers set their peak.

A model of one or two decoder layers has no layer the probe checkpoints, so nothing measures kept attention and
none keeps it. If the probe itself runs out of memory, every layer stays checkpointed and none keeps attention. Attention is
flash/sdpa (linear in tokens), so a shorter batch later needs less; a longer one than planned may not fit: plan
for the longest batch. Not on CPU (no memory to plan for): everything stays checkpointed. Calling transformers'
gradient_checkpointing_enable again afterwards (HF Trainer does, when its gradient_checkpointing is on)
checkpoints every layer again and drops the kept attention.
"""

from __future__ import annotations

import sys

import torch

from .models import kept_attention
from .training.step_in_backward import StepInBackward

__all__ = ["fit_checkpoint_layers", "refit_to_step", "StepChecks", "choose_plan", "OPTIMIZER_STATE_BYTES"]

# Optimizer state per trainable parameter, allocated at the first step: AdamW's two fp32 moments; two bf16 ones
# (training/bf16_adamw.py); 8-bit AdamW's.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_bf16": 4, "adamw_8bit": 2}
CHECKS = 3  # probe steps at most that check a plan (step 4 of the module docstring)


def choose_plan(layers: int, per_layer: int, least: int, budget: int, attention: int = 0) -> tuple[int, int]:
    """(layers checkpointed, of those keeping their attention) for a step estimated at `least` bytes with every
    layer checkpointed and none keeping attention; per_layer: the activations of a layer left out; attention:
    the output a checkpointed layer keeps (0: none can). Within the budget the last layer is never checkpointed."""
    spare = budget - least
    if spare < 0 or per_layer <= 0:  # over budget already, or nothing sensible was measured
        return layers, 0
    if attention > 0:
        if spare < layers * attention:
            checkpointed, keeping = layers, int(spare // attention)
        else:
            spare -= layers * attention
            extra = per_layer - attention  # a layer left out drops its kept output, holds all its activations
            checkpointed = max(0, layers - int(spare // extra)) if extra > 0 else 0
            keeping = checkpointed
    else:
        checkpointed, keeping = max(0, layers - int(spare // per_layer)), 0
    # The last layer is left out for free: its backward comes first, so a checkpointed last layer recomputes there
    # at once what it did not hold and the step peaks as high (run 58b: 48 layers checkpointed peaked 36 MB above
    # 47), while its recompute costs time. The plan's check measures it.
    if checkpointed == layers:
        checkpointed, keeping = layers - 1, min(keeping, layers - 1)
    return checkpointed, keeping


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

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_so_far(self) -> int:  # the allocator's own count: no wait for the GPU
        return torch.cuda.max_memory_allocated(self.device)


def _layers(model) -> list:
    from .fast_model import _decoder_layers

    return _decoder_layers(model)


def fit_checkpoint_layers(
    model, batch_size: int, seq_len: int, *, memory_fraction: float = 0.9, max_memory_gib: float | None = None,
    optimizer: str = "adamw", keep_attention: bool = True, step_in_backward: bool = False, memory=None,
) -> dict:
    """Measure one probe step and set how many decoder layers stay checkpointed, and how many of those keep their
    attention output (see the module docstring).

    model: from FastMoEModel.get_peft_model(..., use_gradient_checkpointing=True), on one CUDA device. The probe
    clears the parameters' .grad and the device's peak-memory statistics. max_memory_gib: a cap on the budget in GiB
    (torch.cuda.max_memory_allocated's measure). keep_attention: False plans without kept attention (every
    checkpointed layer recomputes it). step_in_backward: the optimizer steps inside the backward pass
    (training/step_in_backward.py): the probes hold each gradient until its chunk is complete, as that optimizer
    does (chunks of the trainable parameters in model.parameters() order, as moetune train makes them). memory: for tests (CudaMemory's methods).
    Returns what was measured and chosen: {"checkpoint_layers", "kept_attention_layers", "layers",
    "activation_bytes_per_layer", "attention_bytes_per_layer", "probe_peak_bytes", "optimizer_state_bytes",
    "budget_bytes", "verified_peak_bytes" (the checked plan's peak with the state; None when the plan is every
    layer checkpointed without kept attention, which is not checked), "checks" (each check's plan and its peak with
    the state: [((checkpointed, keeping), bytes or None)])}, plus "why" where even every layer checkpointed
    is estimated over the budget, or where the checks fell back to it (still over, or out of memory); or
    {"checkpoint_layers", "layers", "why"} when nothing was measured (CPU: checkpoint_layers None, nothing changed;
    probe out of memory: all layers, none keeping attention).
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
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    for name, value in (("keep_attention", keep_attention), ("step_in_backward", step_in_backward)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected True or False, got {value!r}")
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
            return {"checkpoint_layers": None, "layers": len(layers),
                    "why": f"no memory plan on {device.type} (it measures CUDA memory); the checkpointing is unchanged"}
        memory = CudaMemory(device)

    probed = [layers[0], layers[-1]] if len(layers) > 1 else [layers[0]]
    for layer in layers:
        layer.gradient_checkpointing = not any(layer is p for p in probed)
    kept_attention.keep_attention(layers, len(layers) if keep_attention else 0)
    kept_attention.reset_kept_bytes()
    kept: dict[int, int] = {}

    def before(module, args, kwargs):
        kept[id(module)] = -memory.allocated()

    def after(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        kept[id(module)] += memory.allocated() + (hidden.nbytes if isinstance(hidden, torch.Tensor) else 0)

    def probe() -> int | None:
        try:
            return _probe_step(model, memory, device, batch_size, seq_len, step_in_backward)
        except BaseException:
            _apply(layers, len(layers), 0)  # every layer checkpointed, as before the probe
            raise

    hooks = [h for layer in probed for h in (layer.register_forward_pre_hook(before, with_kwargs=True),
                                             layer.register_forward_hook(after, with_kwargs=True))]
    try:
        peak = probe()
    finally:
        for hook in hooks:
            hook.remove()
    if peak is None:
        _apply(layers, len(layers), 0)
        return {"checkpoint_layers": len(layers), "kept_attention_layers": 0, "layers": len(layers),
                "why": f"the probe step ran out of memory at batch {batch_size} x {seq_len} tokens"}

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * OPTIMIZER_STATE_BYTES[optimizer]
    budget = int(memory_fraction * memory.available())
    if max_memory_gib is not None:
        budget = min(budget, int(max_memory_gib * 2**30))
    per_layer = max(kept.values(), default=0)
    attention = kept_attention.largest_kept_bytes()
    # Every layer checkpointed, none keeping attention: the probe's peak less what the layers it left out kept
    # and the attention its checkpointed layers kept, plus the optimizer state.
    least = peak - sum(kept.values()) - (len(layers) - len(probed)) * attention + state
    checkpointed, keeping = choose_plan(len(layers), per_layer, least, budget, attention)
    keeping = _apply(layers, checkpointed, keeping)
    verified, unfit, checked = None, None, []
    for check in range(CHECKS):
        if (checkpointed, keeping) == (len(layers), 0):  # the floor: nothing the estimate added to check
            verified = None  # (a measurement of a plan given back to the floor says nothing about the floor)
            break
        measured = probe()
        verified = None if measured is None else measured + state
        checked.append(((checkpointed, keeping), verified))
        if verified is not None and verified <= budget:
            break
        if verified is None or check == CHECKS - 1:  # out of memory, or still over: the floor, unchecked
            unfit = "ran out of memory" if verified is None else f"peaked at {verified / 2**30:.1f} GiB"
            checkpointed, keeping, verified = len(layers), 0, None
        else:
            checkpointed, keeping = _give_back(len(layers), checkpointed, keeping, per_layer, attention,
                                               verified - budget)
        keeping = _apply(layers, checkpointed, keeping)
    plan = {
        "checkpoint_layers": checkpointed,
        "kept_attention_layers": keeping,
        "layers": len(layers),
        "activation_bytes_per_layer": per_layer,
        "attention_bytes_per_layer": attention,
        "probe_peak_bytes": peak,
        "optimizer_state_bytes": state,
        "budget_bytes": budget,
        "verified_peak_bytes": verified,
        "checks": checked,
    }
    if least > budget:
        plan["why"] = (f"even with every layer checkpointed the step is estimated at {least / 2**30:.2f} GiB, "
                       f"over the budget of {budget / 2**30:.2f} GiB: it may not fit")
    elif unfit is not None:
        plan["why"] = (f"a probe step with a plan above every layer checkpointed {unfit} (budget "
                       f"{budget / 2**30:.2f} GiB): every layer checkpointed, none keeping attention")
    return plan


def refit_to_step(model, plan: dict, peak_bytes: int) -> bool:
    """After a real training step under `plan` (fit_checkpoint_layers' result): where the step's peak (bytes, as
    torch.cuda.max_memory_allocated counts them since the step began) is over the plan's budget, checkpoint more
    layers or keep fewer attention outputs by the excess and one more, as a failed check does (module docstring, 5).
    Returns whether the plan changed; each call is recorded in plan["step_checks"] as ((checkpointed, keeping),
    peak_bytes). A plan already at every layer checkpointed without kept attention has nothing to give back."""
    if isinstance(peak_bytes, bool) or not isinstance(peak_bytes, int) or peak_bytes < 0:
        raise ValueError(f"peak_bytes: expected an integer >= 0, got {peak_bytes!r}")
    if not _measured(plan):
        raise ValueError("plan: expected fit_checkpoint_layers' result for a measured plan (with its budget)")
    layers = _layers(model)
    if len(layers) != plan["layers"]:
        raise ValueError(f"plan: made for {plan['layers']} decoder layers, the model has {len(layers)}")
    current = plan["checkpoint_layers"], plan["kept_attention_layers"]
    plan.setdefault("step_checks", []).append((current, peak_bytes))
    over = peak_bytes - plan["budget_bytes"]
    if over <= 0:
        return False
    checkpointed, keeping = _give_back(len(layers), *current, plan["activation_bytes_per_layer"],
                                       plan["attention_bytes_per_layer"], over)
    if (checkpointed, keeping) == current:  # every layer checkpointed without kept attention: nothing to give
        return False
    plan["checkpoint_layers"], plan["kept_attention_layers"] = checkpointed, _apply(layers, checkpointed, keeping)
    return True


def _measured(plan) -> bool:
    """Whether plan is fit_checkpoint_layers' result for a measured plan (one with a budget to check against)."""
    return isinstance(plan, dict) and plan.get("checkpoint_layers") is not None and "budget_bytes" in plan


class StepChecks:
    """refit_to_step for a training loop's first `steps` steps that autotuned nothing (a step that tunes holds the
    timing's buffers at its peak), on CUDA, for a measured plan; otherwise after_step does nothing. The peak
    statistics restart where a step tuned or the plan changed, so the next check sees the new plan's steps only;
    the highest peak before a restart is kept in earlier_peak_bytes, for whoever reports the run's peak."""

    def __init__(self, model, plan: dict | None, device, steps: int = CHECKS, memory=None):
        from .kernels import autotune

        self.model, self.plan, self._autotune = model, plan, autotune
        device = torch.device(device)
        measured = _measured(plan)
        self.memory = memory if memory is not None else CudaMemory(device) if device.type == "cuda" else None
        self.left = steps if measured and self.memory is not None else 0
        self._tunings = autotune.tunings()
        self.earlier_peak_bytes = 0
        if self.left:
            self._restart_peak()

    def _restart_peak(self) -> None:
        self.earlier_peak_bytes = max(self.earlier_peak_bytes, self.memory.peak_so_far())
        self.memory.reset_peak()

    @property
    def done(self) -> bool:
        """Whether the checks are over (or there were none): the plan holds from here on."""
        return self.left <= 0

    def after_step(self) -> bool:
        """Call after each optimizer step; True where the plan changed."""
        if self.left <= 0:
            return False
        tunings = self._autotune.tunings()
        if tunings != self._tunings:
            self._tunings = tunings
            self._restart_peak()
            return False
        self.left -= 1
        changed = refit_to_step(self.model, self.plan, self.memory.peak_so_far())
        if changed:
            self._restart_peak()
            print(f"moetune: a training step peaked over the memory plan's budget; now {self.plan['checkpoint_layers']} "
                  f"layers checkpointed, {self.plan['kept_attention_layers']} keeping attention", file=sys.stderr)
        return changed


def _apply(layers, checkpointed: int, keeping: int) -> int:
    """Checkpoint the first `checkpointed` layers, the first `keeping` of them keeping attention; returns how
    many keep it."""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < checkpointed
    return kept_attention.keep_attention(layers, keeping)


def _give_back(layers: int, checkpointed: int, keeping: int, per_layer: int, attention: int, over: int):
    """(checkpointed, keeping) with `over` bytes less and one layer's or kept output's worth more, a margin for
    the next check: layers left out return to checkpointing first (keeping attention where the others do), then
    kept attention goes.

    The last layer left out is not returned for memory: its backward comes first, and a checkpointed last layer
    recomputes there the activations it did not hold, so the step's peak stays (run 58b, whole Qwen3-30B-A3B at 8K:
    47 -> 48 layers checkpointed, each keeping attention, peaked 36 MB higher, not 568 MB lower). Kept attention
    goes instead, and every layer is checkpointed only at the floor."""
    returnable = layers - 1 - checkpointed  # the layers left out, less the last
    if returnable > 0:
        # choose_plan's plans: every checkpointed layer keeps, or none. With no attention output measured (a plan
        # made with keep_attention=False) none keeps, also where no layer was checkpointed yet.
        keeps = attention > 0 and keeping == checkpointed
        saved = per_layer - (attention if keeps else 0)
        more = min(returnable, -(-over // saved) + 1 if saved > 0 else returnable)
        return checkpointed + more, keeping + (more if keeps else 0)
    if attention > 0 and keeping > 0:
        return checkpointed, max(0, keeping - -(-over // attention) - 1)
    return layers, 0


def _probe_step(model, memory, device, batch_size: int, seq_len: int, in_chunks: bool = False) -> int | None:
    """The peak of one forward + backward on random ids of the planned shape (None: out of memory). The caller's
    RNG, training mode and the parameters' .grad (cleared) are left as they were. in_chunks: gradients are held
    and dropped as the step in backward's chunks hold and free them."""
    was_training = model.training
    holder = None
    try:
        if in_chunks:  # StepInBackward itself, with chunks that step nothing: its hooks hold and free the gradients
            holder = StepInBackward([p for p in model.parameters() if p.requires_grad], _NoStep)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch_size, seq_len), device=device)
            model.train()
            model.zero_grad(set_to_none=True)
            memory.start()
            model(input_ids=ids, labels=ids).loss.backward()
            del ids
            return memory.peak()
    except torch.OutOfMemoryError:
        return None
    finally:
        if holder is not None:
            holder.remove_hooks()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        memory.release()


class _NoStep(torch.optim.Optimizer):
    """A chunk optimizer that updates nothing: the probe needs StepInBackward's holding of gradients, not its steps."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None
