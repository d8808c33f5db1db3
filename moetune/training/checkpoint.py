"""Checkpoints: written atomically, enough to continue a run exactly where it stopped.

    checkpoints/step-000040/
        adapter/            the PEFT adapter at that step (usable on its own)
        state.pt            trainable parameters (exact fp32 copies), optimizer, scheduler, RNG states, step

Each checkpoint is written into `checkpoints/.tmp-step-N` and renamed into place, so a checkpoint
directory that exists is complete: a run killed while saving leaves only a `.tmp-` directory,
which the next save removes. The data position is not stored: the order of each epoch is a function
of (seed, epoch) and the step number fixes where in it the run was.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import random
import re
import shutil

import torch

from ..messages import first_line

__all__ = ["CHECKPOINTS", "save_checkpoint", "latest_checkpoint", "load_checkpoint", "atomic_dir", "resume_settings"]

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _free_space(directory: str) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def atomic_dir(final: str, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to final (replacing an older final); a write that fails leaves
    neither final nor tmp_dir behind."""
    final = os.path.normpath(final)  # "out/" would split to ("out", ""): a temp dir inside the final one
    parent, name = os.path.split(final)
    tmp = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


# Settings that fix the data order, the batches or the parameters: a resumed run must keep them to
# continue the same trajectory (max_steps, lr and the like may change).
RESUME_KEYS = ("model", "data", "batch_size", "grad_accum", "seed", "packing", "max_seq_length", "r", "lora_alpha",
               "target_modules", "train_router", "optim",  # optimizer states of one kind do not load into the other
               "data_fingerprint")
_PATHS = ("model", "data")  # compared as the files they name, not as spelled
RUN_SETTINGS = "settings.json"
_NOT_CARRIED = ("data_fingerprint", "resume", "overwrite")  # what a resumed run does not take from its checkpoint


def saved_settings(output_dir: str) -> dict:
    """The settings the newest checkpoint in output_dir was trained with ({}: none, or one written before they were
    kept)."""
    checkpoint = latest_checkpoint(output_dir)
    path = None if checkpoint is None else os.path.join(checkpoint, RUN_SETTINGS)
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: cannot read {path}: {err}") from None


def _resolved(path: str) -> str:
    """A file's or directory's real path (the same file spelled another way compares equal); anything else as given:
    a pipe's (`--data <(zcat ...)`, /dev/fd/63) real path names the pipe of one process."""
    return os.path.realpath(path) if os.path.isfile(path) or os.path.isdir(path) else path


def resume_settings(config: dict, examples) -> dict:
    """The run's settings as its checkpoints record them and a resume compares them: paths resolved (the same file
    spelled another way resumes), and a fingerprint of the tokenised data (a file changed under the same name, which
    would change the batches, does not)."""
    settings = dict(config)
    for key in _PATHS:
        if settings[key] is not None:
            settings[key] = _resolved(settings[key])
    digest = hashlib.sha1()
    for example in examples:
        digest.update(len(example.input_ids).to_bytes(8, "little"))
        digest.update(array.array("q", example.input_ids).tobytes())
        digest.update(array.array("q", example.labels).tobytes())
    settings["data_fingerprint"] = digest.hexdigest()
    return settings


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, keep: int, settings: dict,
                    log_window: dict | None = None, scaler=None) -> str:
    """log_window: what the metrics have summed since their last row (loss, steps, expert counts), so a run resumed
    here logs its next row over the same steps as the uninterrupted run. scaler: fp16's loss scaler, if any."""
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")

    def write(tmp: str) -> None:
        model.save_pretrained(os.path.join(tmp, "adapter"))
        state = {
            "step": step,
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "log_window": log_window or {},
            "settings": {k: settings[k] for k in RESUME_KEYS},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        path = os.path.join(tmp, "state.pt")
        try:
            torch.save(state, path)
        except RuntimeError as err:
            why = first_line(err)
            if "unexpected pos" in why:  # torch's zip writer's words for a write that came up short
                why = f"the write came up short, the disk is likely full ({_free_space(tmp)} free; torch: {why})"
            raise OSError(f"cannot write {path}: {why}") from None
        # The run's settings, readable without the optimizer state: a bare --resume takes them (config.py).
        with open(os.path.join(tmp, RUN_SETTINGS), "w") as f:
            json.dump({k: v for k, v in settings.items() if k not in _NOT_CARRIED}, f, indent=1)

    atomic_dir(final, write)
    for old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old[1])
    return final


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def _current_name(name: str) -> str:
    """A parameter name as this release has it: expert LoRA factors were plain parameters of the experts module
    (`...experts.lora_A_gate_up`) before they were held per adapter (`...experts.lora_A_gate_up.default.weight`)."""
    from ..models.hook import DEFAULT_ADAPTER, LORA_PARAMS

    return f"{name}.{DEFAULT_ADAPTER}.weight" if name.rsplit(".", 1)[-1] in LORA_PARAMS else name


def _modules(names) -> str:
    """The kinds of module holding these LoRA parameters ("q_proj, experts"), for a message."""
    return ", ".join(sorted({re.sub(r"\.(lora_|modules_to_save).*", "", name).rsplit(".", 1)[-1] for name in names}))


def load_checkpoint(path: str, model, optimizer, scheduler, settings: dict, log_window: dict | None = None,
                    scaler=None) -> int:
    """Restore a checkpoint into the freshly built model/optimizer/scheduler; returns its step. log_window, where
    given, is filled with the metrics' window saved with it (empty for a checkpoint without one)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"--resume: cannot read checkpoint {path}: {err}") from None
    fingerprinted = "data_fingerprint" in state["settings"]
    for key, saved in state["settings"].items():  # a checkpoint's own keys: older ones have fewer
        if key == "data" and fingerprinted:  # the same records under another name (a pipe's copy) continue the run
            continue
        if key in _PATHS and saved is not None:
            saved = _resolved(saved)
        if key == "data_fingerprint" and settings[key] != saved:
            raise ValueError(f"--resume: {path} was trained on other data (the records of --data or their "
                             "tokenisation changed): its batches would not continue")
        if settings[key] != saved:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: {path} was trained with {flag} {saved!r}, this run has {settings[key]!r}")
    params = dict(model.named_parameters())
    state["trainable"] = {_current_name(name): value for name, value in state["trainable"].items()}
    saved, ours = set(state["trainable"]), {n for n, p in params.items() if p.requires_grad}
    if saved != ours:  # (the default targets of latent attention took in its q/kv projections on 2026-12-06)
        there, here = _modules(saved - ours) or "nothing more", _modules(ours - saved) or "nothing more"
        raise ValueError(f"--resume: checkpoint {path} was trained with other LoRA targets than this run (LoRA on "
                         f"{there} there, on {here} here): give --target-modules as it had them")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            if params[name].shape != value.shape:
                raise ValueError(f"--resume: checkpoint {path} has {name} of shape {list(value.shape)}, this run {list(params[name].shape)}")
            params[name].copy_(value)
    saved_groups, groups = len(state["optimizer"]["param_groups"]), len(optimizer.param_groups)
    if saved_groups != groups:  # weight decay spares biases and norms (a group of its own) since 2026-12-05
        raise ValueError(
            f"--resume: checkpoint {path} holds {saved_groups} optimizer parameter group(s), this run {groups}: its "
            f"weight decay {'spares' if groups > saved_groups else 'decays'} biases and norm weights (a --weight-decay "
            f"of 0 against one above 0, or a checkpoint from before biases were spared); resume with the checkpoint's "
            f"--weight-decay, or start again"
        )
    # This run's --lr and --weight-decay, which the optimizer and the schedule were just built with: loading their
    # states would bring back the checkpoint's (a resume with a new --lr would silently keep the old one). Only
    # where the checkpoint has its settings file: a bare --resume of an older one took the defaults for them.
    own_lrs, own_decays = list(scheduler.base_lrs), [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if os.path.exists(os.path.join(path, RUN_SETTINGS)):
        scheduler.base_lrs = own_lrs
        for group, lr, decay in zip(optimizer.param_groups, own_lrs, own_decays):
            group["initial_lr"], group["weight_decay"] = lr, decay
    # The lr of the step to come from this run's schedule: a run resumed with another --max-steps (or from a
    # checkpoint of an older schedule) would otherwise take its first step at the lr the checkpoint saved.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if scaler is not None and state.get("scaler"):  # (a checkpoint of another dtype has none: the scaler starts anew)
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    if log_window is not None:
        log_window.update(state.get("log_window", {}))
    return int(state["step"])
