"""The training loop of `moetune train`: a lean loop of our own over a FastMoEModel peft model.

    summary = train(TrainConfig(...))     # validates everything first (prepare.py), then trains

Per optimizer step: grad_accum micro-batches, loss = sum of token losses / response tokens in the whole
step (transformers' num_items_in_batch), AdamW on the LoRA parameters, gradient clipping at
--max-grad-norm (1.0), linear warm-up then cosine decay to lr/10. Writes metrics.jsonl rows, checkpoints
(checkpoint.py), and at the end the adapter, loss.png, expert_load.png and summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

from ..messages import first_line
from . import data as data_mod
from .checkpoint import atomic_dir, load_checkpoint, resume_settings, save_checkpoint
from .config import TrainConfig
from .metrics import ExpertLoad, MetricsLog, peak_memory_gib, read_metrics
from .prepare import RUN_FILES, Plan, prepare

__all__ = ["train", "run", "TrainingDiverged"]

MIN_LR_RATIO = 0.1


# fp16's loss scale starts at 2^16 and halves at each skipped step: below 1 it no longer scales the loss up.
MIN_LOSS_SCALE = 1.0


class TrainingDiverged(RuntimeError):
    """A step's loss or a trained weight was not finite and no loss scaler skipped the step (the weights hold NaN or
    inf), or fp16's scaler skips every step: the run stops before any checkpoint or adapter is written from them."""


def _stop_if_diverged(loss_sum: float, step: int, config: TrainConfig, params=()) -> None:
    """Raise TrainingDiverged where the loss (summed since the last check) or, where given, a trained weight is not
    finite. The weights are checked before anything is written from them: a gradient can overflow while its loss
    stays finite, and the weights then turn NaN a step before the loss does."""
    what = None
    if not math.isfinite(loss_sum):
        what = f"the loss is {loss_sum}"
    elif params and not bool(torch.stack([n.float() for n in torch._foreach_norm(list(params))]).isfinite().all()):
        what = "a trained weight is not finite"
    if what is not None:
        _diverged(what, step, config)


def _stop_if_scaler_gave_up(scale: float, step: int, config: TrainConfig) -> None:
    """fp16's scaler skips a step whose gradients overflow and halves its scale (here after the step); below
    MIN_LOSS_SCALE they overflow however small it makes the loss (the forward itself is not finite), and every step
    from here on would be skipped while the run reported success."""
    if scale < MIN_LOSS_SCALE:
        _diverged(f"fp16's loss scale fell to {scale:g} (every step's gradients overflow, so each is skipped)",
                  step, config, fp16=True)


def _diverged(what: str, step: int, config: TrainConfig, fp16: bool = False) -> None:
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(config.output_dir)
    where = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"
    # Only settings the run does not have already (clipping is off with the step in backward, which refuses it).
    tries = [f"a lower --lr than {config.lr:g}"]
    if config.max_grad_norm == 0 and not config.step_in_backward:
        tries.append("--max-grad-norm 1.0")
    if fp16:  # only fp16 runs have a loss scaler
        tries.append("--dtype bfloat16 or float32")
    again = "" if last else f"; start again with --overwrite --output-dir {config.output_dir}"
    raise TrainingDiverged(f"{what} by step {step}; stopped without writing the weights it stepped ({where}); try "
                           f"{' or '.join(tries)}{again}")


def train(config: TrainConfig, console=None) -> dict:
    """Check the inputs, train, write the outputs; returns the run summary."""
    plan = prepare(config)
    # The run's GPU current while it runs (the caller's after): a launch on another GPU than the current one
    # switches devices each time (kernels/launch.py), and torch's defaults ("cuda") go to the current one.
    with torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext():
        return run(plan, console)


# transformers' Trainer.get_decay_parameter_names: no weight decay on these (biases, norm weights).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_groups(model, weight_decay: float) -> list:
    """The trainable parameters as the optimizer's groups, split as transformers' Trainer splits them: weight decay
    on the rest, none on biases and norm weights (a trained router's bias, as gpt-oss has, is a routing offset).
    One group where nothing is exempt or there is no decay, as before the split (checkpoints' optimizer state)."""
    from transformers.trainer_pt_utils import get_parameter_names

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS)) if weight_decay else None
    if decayed is None or all(name in decayed for name, _ in trainable):
        return [p for _, p in trainable]
    return [{"params": [p for name, p in trainable if name in decayed], "weight_decay": weight_decay},
            {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]


def make_optimizer(params, config):
    """AdamW over the LoRA parameters (tensors, or groups as decay_groups makes them): torch's, moetune's with bf16
    states (--optim adamw_bf16, bf16_adamw.py), or bitsandbytes' with 8-bit states (--optim adamw_8bit); with
    config.step_in_backward, stepped inside the backward pass (step_in_backward.py).

    On CUDA torch's fused kernel: its default there (foreach) allocates a temporary the size of the state's
    second moment (4 bytes per trainable parameter: 2.4 GiB for Qwen3-30B-A3B's 643M) at the step, on top of the
    gradients, which can make the optimizer step the peak of the whole training step."""
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    # a step captured as a CUDA graph (benchmarks/train_step.py --cuda-graph on; moetune train's --cuda-graph sets
    # its groups after any checkpoint loads, graphed_step.for_graph): step counts and corrections on the device
    if getattr(config, "capturable", False):
        kwargs["capturable"] = True
    if config.optim == "adamw_8bit":
        import bitsandbytes  # checked importable, with a CUDA device, by prepare._check_optimizer

        optimizer_class = bitsandbytes.optim.AdamW8bit
    elif config.optim == "adamw_bf16":
        from .bf16_adamw import AdamWBf16

        optimizer_class = AdamWBf16
    else:
        optimizer_class = torch.optim.AdamW
        kwargs["fused"] = (bool(tensors) and all(p.is_cuda for p in tensors)) or None
    if config.step_in_backward:
        from .step_in_backward import StepInBackward

        return StepInBackward(params, optimizer_class, **kwargs)
    return optimizer_class(params, **kwargs)


_frozen_depth = 0  # collector_frozen blocks running (nested ones leave the freeze to the outermost)


@contextlib.contextmanager
def collector_frozen():
    """Everything alive now (the model, its hooks, the data) leaves Python's garbage collector for the block.

    A full collection walks every tracked object; with a whole model loaded that took 230-280 ms, once every ten
    steps or so, inside a 600 ms step (Qwen3-30B-A3B, run 51c). Frozen objects are still freed by reference
    counting; only cycles among them wait, for the first full collection after the block.

    The outermost block always ends with gc.unfreeze(), which also returns objects frozen before it (CPython cannot
    unfreeze a part): the lent GPU machines' Python starts with objects frozen (375), and keeping the freeze there
    kept the model's cycles, which hold its LM head and LoRA state, after the model was deleted (run 53: +0.9 /
    +1.75 GiB in the next models built in the process). A nested block leaves the freeze to the outer one."""
    global _frozen_depth
    if _frozen_depth == 0:
        gc.collect()
        gc.freeze()
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0:
            gc.unfreeze()


def _loss_scaler(plan: Plan, params: list):
    """fp16's dynamic loss scaler (torch.amp.GradScaler, as Trainer's fp16 uses it): without one, the gradients of
    long sequences' losses (each token's share 1/labels) underflow in fp16 activations. The trained parameters must
    be fp32 (LoRA's are): the scaler does not unscale fp16 gradients in place."""
    if plan.dtype != torch.float16:
        return None
    half = [p for p in params if p.dtype == torch.float16]
    if half:
        raise ValueError(f"--dtype: float16 trains with loss scaling, which needs fp32 trained parameters; "
                         f"{len(half)} are fp16 (--train-router's copies of the routers): use bfloat16 or float32")
    return torch.amp.GradScaler(plan.device.type)


def _write_demo_model(plan: Plan, directory: str) -> None:
    """The demo base model: Qwen3-MoE from the shipped config, random weights from the run's seed. Written
    out so the adapter has a base to load onto (and `moetune merge` has a checkpoint to merge into)."""
    import transformers

    torch.manual_seed(plan.config.seed)
    model = transformers.AutoModelForCausalLM.from_config(plan.model_config, dtype=torch.float32)
    model.save_pretrained(directory)
    plan.tokenizer.save_pretrained(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _base_model_dir(plan: Plan) -> tuple[str, str | None]:
    """(directory to load the base model from, temporary directory to move into the output or None)."""
    if plan.model_dir is not None:
        return plan.model_dir, None
    demo_dir = os.path.join(plan.config.output_dir, "demo-model")
    if plan.resume_from is not None and os.path.isfile(os.path.join(demo_dir, "config.json")):
        return demo_dir, None  # a resumed demo run continues on the very weights it started with
    # Written outside --output-dir first: it moves in only once the model and its LoRA set-up are valid.
    tmp = tempfile.mkdtemp(prefix="moetune-demo-model-")
    try:
        _write_demo_model(plan, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, tmp


def _build_model(plan: Plan, model_dir: str):
    from safetensors import SafetensorError

    from ..fast_model import FastMoEModel
    from ..models.quantized import MissingWeights

    config = plan.config
    try:
        model, _ = FastMoEModel.from_pretrained(
            model_dir, max_seq_length=config.max_seq_length, dtype=plan.dtype, device_map=str(plan.device), strict=True
        )
    except MissingWeights as err:
        raise err.naming("--model") from None
    except (OSError, SafetensorError) as err:
        raise ValueError(f"--model: cannot load the weights in {model_dir}: {first_line(err)}") from None
    with warnings.catch_warnings():
        # peft 0.21 reads an attribute transformers >= 5.2x deprecates; not actionable for the user.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = FastMoEModel.get_peft_model(
            model, r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
            use_gradient_checkpointing=config.gradient_checkpointing,
            checkpoint_layers=None if config.checkpoint_layers == "auto" else config.checkpoint_layers,
            train_router=config.train_router,
            random_state=config.seed,
        )
    return model, peft_model


def _clear_old_run(output_dir: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _progress(console, total: int, start: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False,
    )


def run(plan: Plan, console=None) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its load/save bars would interleave with ours
    config = plan.config
    device = plan.device
    torch.manual_seed(config.seed)
    model_dir, demo_tmp = _base_model_dir(plan)
    try:  # the model and its LoRA set-up load (or fail on bad input) before anything is written
        base_model, peft_model = _build_model(plan, model_dir)
        scaler = _loss_scaler(plan, [p for p in peft_model.parameters() if p.requires_grad])
        # Packed rows through varlen attention, with no [T, T] mask, where this GPU and model allow (before the
        # memory plan, which measures this path)
        from ..models import packed_attention

        packed_varlen = config.packing and packed_attention.use_for(base_model, device, plan.dtype)
        if config.cuda_graph:  # (before anything is written: a model with dropout is refused here)
            from .cuda_graph import without_rng_state

            try:
                without_rng_state(peft_model)
            except ValueError as err:
                raise ValueError(f"--cuda-graph: {first_line(err).removeprefix('model: ')}") from None
        checkpoint_plan = None
        if config.checkpoint_layers == "auto" and config.gradient_checkpointing:
            from ..fast_model import FastMoEModel

            # Planned for the longest batch this run can see: batch_size sequences of max_seq_length tokens.
            checkpoint_plan = FastMoEModel.fit_checkpoint_layers(
                peft_model, config.batch_size, config.max_seq_length, optimizer=config.optim,
                max_memory_gib=config.max_memory, keep_attention=config.keep_attention,
                step_in_backward=config.step_in_backward,
            )
    except BaseException:
        if demo_tmp:
            shutil.rmtree(demo_tmp, ignore_errors=True)
        raise
    if plan.data_note:
        print(f"moetune: data: {plan.data_note}", file=sys.stderr)
    if checkpoint_plan is not None and "why" in checkpoint_plan \
            and (checkpoint_plan["checkpoint_layers"] is not None or config.max_memory is not None):  # asked, not met
        print(f"moetune: checkpoint plan: {checkpoint_plan['why']}", file=sys.stderr)
    if plan.resume_from is None and config.overwrite:
        _clear_old_run(config.output_dir)
    if demo_tmp:
        model_dir = os.path.join(config.output_dir, "demo-model")
        try:
            os.makedirs(config.output_dir, exist_ok=True)
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.move(demo_tmp, model_dir)  # (a copy where the two are on different file systems)
        except BaseException:  # no half-copied demo model left to look like a run, nor the temporary one
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(demo_tmp, ignore_errors=True)
            raise
        os.chmod(model_dir, 0o777 & ~_umask())  # mkdtemp made it private; the rest of the output is not
    else:
        os.makedirs(config.output_dir, exist_ok=True)
    # The adapter names its base model (AutoPeftModel loads it from there): the demo where it ended up, not the
    # temporary directory, and --model absolute, as the checkpoint's settings name it (a relative name would find
    # it only from this directory, and peft would look it up on the Hub from anywhere else).
    peft_model.peft_config["default"].base_model_name_or_path = os.path.abspath(model_dir)
    spec = base_model.moetune_spec
    from ..models.hook import find_experts

    units = data_mod.make_units(plan.examples, config.max_seq_length, config.packing)
    per_epoch = data_mod.steps_per_epoch(len(units), config.batch_size, config.grad_accum)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(decay_groups(peft_model, config.weight_decay), config)
    # transformers' schedule, as Trainer's lr_scheduler_type="cosine_with_min_lr" (min_lr_rate 0.1) runs it: the
    # first step of a warm-up at lr 0, then linear to the peak and a cosine down to a tenth of it.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, total,
                                                           min_lr_rate=MIN_LR_RATIO)
    start = 0
    settings = resume_settings(dataclasses.asdict(config), plan.examples)
    window: dict = {}  # the metrics' sums since their last row before the checkpoint
    if plan.resume_from is not None:
        start = load_checkpoint(plan.resume_from, peft_model, optimizer, scheduler, settings, log_window=window,
                                scaler=scaler)
        if start > total:  # nothing written yet: the run would report steps it did not take back
            raise ValueError(f"--max-steps: this run ends at step {total} (--max-steps or --epochs), before the step "
                             f"of the checkpoint it resumes ({start}); ask for at least {start} steps")
    from ..kernels import autotune
    from .graphed_step import GraphedStep, for_eager, for_graph

    # After the schedule is made (its base rates stay floats) and a checkpoint loaded (written either way)
    for_graph(optimizer, device) if config.cuda_graph else for_eager(optimizer)
    metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
    metrics = MetricsLog(metrics_path, start if plan.resume_from else None)
    load = ExpertLoad(find_experts(base_model, spec), device)
    pad_id = plan.tokenizer.pad_token_id if plan.tokenizer.pad_token_id is not None else plan.tokenizer.eos_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from ..checkpoint_plan import StepChecks

    plan_checks = StepChecks(peft_model, checkpoint_plan, device)  # the first real steps against the plan's budget
    graphed = GraphedStep(peft_model, optimizer, params, load, config, device, pad_id) if config.cuda_graph else None
    # Eager steps since the memory plan or an autotuned pick last changed: a graph is captured after two (and once the
    # plan's checks are over), so that nothing it records runs for the first time inside the capture.
    eager_steps = 0
    first_replayed = None  # the step number of the first replayed step

    peft_model.train()
    epoch_plan, epoch_of_plan = None, None
    tokens_interval, loss_interval, steps_interval = 0, torch.zeros((), device=device), 0
    if window:  # continue the window the checkpoint was written in (tokens/s counts this session's part only)
        loss_interval.fill_(window["loss"])
        steps_interval = window["steps"]
        load.counts.copy_(window["expert_counts"])
    t_interval = t_start = time.perf_counter()
    saving_s = 0.0  # writing checkpoints: not training time (tokens/s)
    tokens_total = 0
    with collector_frozen(), _progress(console, total, start) as progress:
        task = progress.add_task("train", total=total, completed=start, loss="-", tps="-")
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if epoch != epoch_of_plan:
                epoch_plan = data_mod.epoch_steps(len(units), config.batch_size, config.grad_accum, config.seed, epoch)
                epoch_of_plan = epoch
            if graphed is not None:
                tokens_interval += graphed.fill([[units[i] for i in mb] for mb in epoch_plan[index]])
                tunings = autotune.tunings()
                loss_interval += graphed.run(capture=eager_steps >= 2 and plan_checks.done)
                eager_steps = 0 if autotune.tunings() != tunings else eager_steps + (graphed.replay is None)
                if graphed.replay is not None and first_replayed is None:
                    first_replayed = step + 1
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
            else:
                batches = [data_mod.collate([units[i] for i in mb], pad_id, config.packing, packed_varlen)
                           for mb in epoch_plan[index]]
                num_labels = sum(int((b["labels"] != data_mod.IGNORE).sum()) for b in batches)
                for batch in batches:
                    token_mask = batch.pop("token_mask")
                    tokens_interval += int(token_mask.sum())
                    load.token_mask = token_mask.reshape(-1).to(device, non_blocking=True)
                    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}  # (varlen's longest segment is an int)
                    loss = peft_model(**batch, num_items_in_batch=num_labels, use_cache=False).loss
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    loss_interval += loss.detach()
                    del loss  # its graph, and what the graph's nodes hold (the LoRA factors' casts), would live into the next forward
                if scaler is not None:
                    scaler.unscale_(optimizer)  # before clipping, which reads the true gradients
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                if scaler is None:
                    optimizer.step()
                    scheduler.step()
                else:  # a step with inf/nan gradients is skipped and lowers the scale; the schedule waits, as in Trainer
                    before = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    scale = scaler.get_scale()  # (each read waits for the device: once a step, used twice)
                    if scale >= before:
                        scheduler.step()
                    _stop_if_scaler_gave_up(scale, step + 1, config)
                optimizer.zero_grad(set_to_none=True)
            if plan_checks.after_step():
                eager_steps = 0  # the next steps run another plan
            steps_interval += 1
            done = step + 1
            if done % config.logging_steps == 0 or done == total:
                now = time.perf_counter()
                row = {
                    "step": done,
                    "epoch": round(done / per_epoch, 4),
                    "loss": float(loss_interval) / steps_interval,
                    "lr": float(lr),  # (a tensor under --cuda-graph)
                    "tokens_per_s": tokens_interval / (now - t_interval),
                    "tokens": tokens_interval,  # (non-padding; weighs this row's expert load in the run's)
                    # (the first steps' peaks too, which the plan's checks took out of the device's statistics)
                    "peak_memory_gib": round(max(peak_memory_gib(device), plan_checks.earlier_peak_bytes / 2**30), 4),
                    "expert_load": {str(layer): shares for layer, shares in zip(load.layers, load.take())},
                }
                metrics.write(row)
                if scaler is None:  # (fp16's scaler skips the steps whose gradients overflowed, the loss too)
                    _stop_if_diverged(row["loss"], done, config)
                progress.update(task, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:,.0f}")
                tokens_total += tokens_interval
                tokens_interval, steps_interval, t_interval = 0, 0, now
                loss_interval.zero_()
            if done % config.save_steps == 0 or done == total:
                loss_sum = float(loss_interval)  # (one read of the device: the check's and the window's)
                if scaler is None:  # the steps since the last logged row, and the weights about to be written
                    _stop_if_diverged(loss_sum, done, config, params)
                window = {"loss": loss_sum, "steps": steps_interval, "expert_counts": load.counts.cpu()}
                saving = time.perf_counter()
                save_checkpoint(config.output_dir, done, peft_model, optimizer, scheduler, config.keep_checkpoints,
                                settings, log_window=window, scaler=scaler)
                saving = time.perf_counter() - saving
                t_interval += saving  # tokens/s counts training, not the checkpoint's writing
                saving_s += saving
            progress.update(task, completed=done)
    elapsed = time.perf_counter() - t_start
    return _finish(plan, peft_model, load, metrics_path, model_dir, total, per_epoch, start, elapsed, tokens_total,
                   checkpoint_plan, saving_s, first_replayed, base_model.config._attn_implementation)


def _finish(plan, peft_model, load, metrics_path, model_dir, total, per_epoch, start, elapsed, tokens,
            checkpoint_plan=None, saving_s: float = 0.0, first_replayed: int | None = None,
            attention: str | None = None) -> dict:
    from .plots import plot_expert_load, plot_loss

    config = plan.config
    out = config.output_dir
    atomic_dir(os.path.join(out, "adapter"), peft_model.save_pretrained)
    rows = read_metrics(metrics_path)
    plot_loss(rows, os.path.join(out, "loss.png"))
    plot_expert_load(_mean_load(rows), load.layers, os.path.join(out, "expert_load.png"))
    load.remove()
    # The first and the last tenth of the logged rows; a non-finite loss (fp16's skipped steps) is written as null
    # and left out of their means, so a tail of nulls has none.
    tenth = max(1, len(rows) // 10)
    head, tail = ([r["loss"] for r in part if r["loss"] is not None] for part in (rows[:tenth], rows[-tenth:]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    summary = {
        "model": config.model or "built-in demo (Qwen3-MoE, random init)",
        "base_model_dir": os.path.abspath(model_dir),
        "data": plan.data_path,
        "data_format": plan.data_format,
        "records": len(plan.examples),
        "steps": total,
        "epochs": round(total / per_epoch, 4),
        "resumed_from_step": start if plan.resume_from else None,
        "trainable_parameters": trainable,
        "device": str(plan.device),
        "dtype": str(plan.dtype).removeprefix("torch."),
        "checkpoint_layers": checkpoint_plan if checkpoint_plan is not None else config.checkpoint_layers,
        # What select_backend prefers for this device and dtype; each experts call may still pick another by
        # its size (on CUDA triton only from its measured threshold up).
        "moe_backend": plan.backend,
        "moe_backend_why": plan.backend_why,
        "attention": attention,  # the model's attention implementation (moetune_packed_varlen: --packing, no mask)
        # --cuda-graph: the first step of this session replayed from the recorded graph (None: every step ran eagerly)
        "cuda_graph_first_replayed_step": first_replayed,
        "train_seconds_this_session": round(elapsed, 2),  # wall time, checkpoints' writing included
        "checkpoint_seconds_this_session": round(saving_s, 2),
        "tokens_per_s_this_session": round(tokens / (elapsed - saving_s), 1) if elapsed > saving_s else None,
        # The mean finite loss of the first and of the last tenth of the logged rows (at least one row each;
        # None where all of that tenth's were null).
        "loss_first": sum(head) / len(head) if head else None,
        "loss_last": sum(tail) / len(tail) if tail else None,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
        "outputs": {
            "adapter": os.path.join(out, "adapter"), "metrics": metrics_path,
            "loss_plot": os.path.join(out, "loss.png"), "expert_load_plot": os.path.join(out, "expert_load.png"),
        },
    }
    tmp = os.path.join(out, ".tmp-summary.json")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out, "summary.json"))  # written last: its presence marks a finished run
    return summary


def _mean_load(rows: list[dict]) -> list[list[float]]:
    """Expert load over the whole run (a resumed run's rows included): each row's shares weighted by the tokens it
    counted, so the result is the run's share whatever --logging-steps was (rows written before rows carried their
    tokens weigh one each)."""
    layers = sorted(rows[0]["expert_load"], key=int)
    weights = [r.get("tokens", 1) for r in rows]
    total = sum(weights) or 1
    return [[sum(w * r["expert_load"][layer][e] for w, r in zip(weights, rows)) / total
             for e in range(len(rows[0]["expert_load"][layer]))] for layer in layers]
