"""The `moetune` command. Thin: parses, calls the library, prints.

Subcommands so far: `info`. (`train` and `merge` arrive with the training and
integration work.) User errors exit with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from . import __version__
from .experts import ENV_VAR, KNOWN_BACKENDS, available_backends, select_backend

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
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
    dtype = _DTYPES[args.dtype]
    resolved = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    name, why = select_backend(resolved, dtype, explain=True)
    print(f"moetune       {__version__}")
    print(f"python        {platform.python_version()}")
    for package in ("torch", "transformers", "peft", "triton", "safetensors"):
        print(f"{package:<14}{_version(package)}")
    print(f"device        {_device_line(resolved)}")
    print(f"backends      {', '.join(available_backends(resolved, dtype))} usable for {args.dtype} (fastest first)")
    print(f"selected      {name}: {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # user-facing: one line, exit 2
        print(f"moetune {args.command}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
