"""The `moetune` command. Thin: parses, calls the library, prints.

Subcommands: `train` (fine-tune; the built-in demo without arguments), `merge` (fold an adapter into a
checkpoint), `info` (device, versions, backends). User errors exit with code 2 and one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import platform
import sys
import warnings

import torch

from . import __version__
from .devices import resolve_device
from .experts import ENV_VAR, KNOWN_BACKENDS, available_backends, select_backend
from .messages import first_line, os_error_line

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        return f"{props.name} (sm{major}{minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def cmd_info(args: argparse.Namespace) -> int:
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    dtype = _DTYPES[args.dtype]
    # (None: the GPU if there is one; a one-line error for CUDA without one, or a GPU index past them)
    resolved = resolve_device(device, "--device")
    name, why = select_backend(resolved, dtype, explain=True)
    print(f"moetune       {__version__}")
    print(f"python        {platform.python_version()}")
    for package in ("torch", "transformers", "peft", "triton", "safetensors"):
        print(f"{package:<14}{_version(package)}")
    print(f"device        {_device_line(resolved)}")
    print(f"backends      {', '.join(available_backends(resolved, dtype))} usable for {args.dtype} (fastest first)")
    print(f"selected      {name}: {why}")
    return 0


def _rerun_advice(output_dir: str) -> str:
    """How to go on after a run stopped part-way."""
    from .training.checkpoint import latest_checkpoint

    try:
        if latest_checkpoint(output_dir) is not None:
            return f"continue with --resume --output-dir {output_dir}"
        if os.path.isdir(output_dir) and os.listdir(output_dir):  # it blocks a plain rerun; nothing to resume
            return f"no checkpoint yet; start again with --overwrite --output-dir {output_dir}"
    except OSError:  # the file system that stopped the run may fail this look too
        return f"continue with --resume, or start again with --overwrite, --output-dir {output_dir}"
    return "nothing was written"


# FastMoEModel's parameters (TrainConfig fields of the same name) whose checks reach `moetune train`'s user.
_API_PARAMETERS = ("target_modules",)


def cmd_train(args: argparse.Namespace) -> int:
    # The demo and every --model are local: nothing may reach a model hub (set before transformers loads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .training import config as train_config
    from .training import train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    config = train_config.resolve_config(flags, args.config)
    from .training.loop import TrainingDiverged

    try:
        summary = train(config)
    except ValueError as err:  # the Python API names its parameter; the command line has a flag for it
        message = first_line(err)
        for parameter in _API_PARAMETERS:
            if message.startswith(f"{parameter}: "):
                message = train_config.flag(parameter) + message[len(parameter):]
        raise ValueError(message) from None
    except TrainingDiverged as err:  # not a usage error: exit 1, one line
        print(f"moetune train: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # a failure once the run has started (torch, a kernel, out of memory): not the input
        print(f"moetune train: error: {first_line(err)}; {_rerun_advice(config.output_dir)}", file=sys.stderr)
        return 1
    except OSError as err:  # the disk or the file system (full, read-only, gone), not the input: exit 1, one line
        print(f"moetune train: error: {os_error_line(err)}; {_rerun_advice(config.output_dir)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moetune train: interrupted; {_rerun_advice(config.output_dir)}", file=sys.stderr)
        return 130
    print(f"done: {summary['steps']} steps on {summary['device']} (experts backend {summary['moe_backend']}), "
          f"loss {_loss(summary['loss_first'])} -> {_loss(summary['loss_last'])}, "
          f"{summary['train_seconds_this_session']:.1f} s, peak {summary['peak_memory_gib']:.2f} GiB")
    out = summary["outputs"]
    print(f"adapter       {out['adapter']}")
    print(f"metrics       {out['metrics']}")
    print(f"plots         {out['loss_plot']}, {out['expert_load_plot']}")
    print(f"summary       {os.path.join(config.output_dir, 'summary.json')}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .adapters import merge

    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        raise ValueError(f"out_dir: {args.out_dir} exists and is not empty; choose a new directory")
    if args.dtype != "auto":
        dtype = _DTYPES[args.dtype]
    else:
        dtype = "auto"
    try:
        merge(args.model_dir, args.adapter_dir, args.out_dir, dtype=dtype)
    except OSError as err:
        raise ValueError(f"cannot read the checkpoint or adapter: {first_line(err)}") from None
    print(f"merged {args.adapter_dir} into {args.model_dir} -> {args.out_dir}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage of `train` runs to a screenful)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moetune", description="Fast, memory-lean LoRA fine-tuning of Mixture-of-Experts LLMs."
    )
    parser.add_argument("--version", action="version", version=f"moetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = sub.add_parser(
        "info",
        help="device, versions, usable expert backends and the one selected",
        description=f"Show the device, library versions, the usable MoE expert backends "
        f"({', '.join(KNOWN_BACKENDS)}) and which one moetune selects, and why. "
        f"{ENV_VAR} forces one.",
    )
    info.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    info.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES), help="compute dtype (default: bfloat16)")
    info.set_defaults(func=cmd_info)
    _add_train(sub)
    _add_merge(sub)
    return parser


def _add_train(sub) -> None:
    from .training.config import add_arguments

    train = sub.add_parser(
        "train",
        help="LoRA fine-tuning (no arguments: the built-in demo)",
        description="LoRA fine-tuning of a Mixture-of-Experts model. Without arguments it trains the built-in demo "
        "(a tiny random-init Qwen3-MoE on a small instruction set) and writes the adapter, metrics.jsonl, "
        "loss.png, expert_load.png and summary.json into ./moetune-output. Every flag is also a key of --config "
        "(same name with underscores); flags given on the command line win.",
    )
    train.add_argument("--config", default=None, metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) file of settings")
    add_arguments(train)
    train.set_defaults(func=cmd_train)


def _add_merge(sub) -> None:
    merge = sub.add_parser(
        "merge",
        help="fold a PEFT adapter into a checkpoint (a plain transformers model)",
        description="Fold the LoRA adapter in ADAPTER_DIR into the checkpoint in MODEL_DIR and write a plain "
        "transformers checkpoint (tokenizer files copied) to OUT_DIR, which must be new or empty.",
    )
    merge.add_argument("model_dir", help="base checkpoint directory the adapter was trained on")
    merge.add_argument("adapter_dir", help="adapter directory (e.g. moetune-output/adapter)")
    merge.add_argument("out_dir", help="where the merged checkpoint goes")
    merge.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                       help="dtype of the merged weights (default: auto, as stored in MODEL_DIR)")
    merge.set_defaults(func=cmd_merge)


def _loss(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _one_line_warning(command: str, message, category, *_, **__) -> str:
    """A warning as one line, not Python's file:line and source line; its category where it is no UserWarning."""
    text = (str(message).strip().splitlines() or [""])[0]
    return f"moetune {command}: {'warning' if category is UserWarning else category.__name__}: {text}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = functools.partial(_one_line_warning, args.command)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # user-facing: one line, exit 2
        print(f"moetune {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a command's own handling (while torch and transformers import)
        print(f"moetune {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
