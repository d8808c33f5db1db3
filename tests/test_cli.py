"""The moetune command through its real entry point (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def moetune(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moetune.cli", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_info_lists_versions_backends_and_choice():
    proc = moetune("info", "--device", "cpu", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    for word in ("moetune", "torch", "transformers", "peft", "backends", "grouped_mm", "native", "selected"):
        assert word in proc.stdout
    assert "selected      grouped_mm: fastest usable backend" in proc.stdout


def test_info_honours_environment_variable():
    proc = moetune("info", "--device", "cpu", env={"MOETUNE_MOE_BACKEND": "native"})
    assert proc.returncode == 0, proc.stderr
    assert "selected      native: forced by MOETUNE_MOE_BACKEND=native" in proc.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("info",), {"MOETUNE_MOE_BACKEND": "fastest"}, "MOETUNE_MOE_BACKEND: expected one of native, grouped_mm, triton"),
        (("info", "--device", "potato"), {}, "--device: expected cpu, cuda or cuda:N"),
        (("info", "--device", "mps"), {}, "--device: expected cpu, cuda or cuda:N, got 'mps'"),
        pytest.param(("info", "--device", "cuda"), {}, "--device: expected a device this machine has, got cuda",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
        (("train", "--data", ""), {}, "--data: expected a path, got ''"),
        (("train", "--output-dir", ""), {}, "--output-dir: expected a path, got ''"),
        (("train", "--checkpoint-layers", "1", "--no-gradient-checkpointing"), {},
         "--checkpoint-layers: applies with gradient checkpointing on"),
        (("info", "--dtype", "int8"), {}, "--dtype"),
        (("no-such-command",), {}, "invalid choice"),
    ],
)
def test_bad_input_exit_2_one_line_no_traceback(args, env, message):
    proc = moetune(*args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "command, words",
    [
        ("train", ("--model", "--data", "--max-seq-length", "--max-steps", "--epochs", "--lr", "--batch-size",
                   "--grad-accum", "--r", "--lora-alpha", "--target-modules", "--packing", "--seed", "--output-dir",
                   "--config", "--resume", "built-in demo", "chat template")),
        ("merge", ("model_dir", "adapter_dir", "out_dir", "--dtype")),
        ("info", ("--device", "--dtype", "MOETUNE_MOE_BACKEND")),
    ],
)
def test_help_of_each_subcommand(command, words):
    proc = moetune(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for word in words:
        assert word in text, word


def test_top_level_help_lists_subcommands():
    proc = moetune("--help")
    assert proc.returncode == 0
    for command in ("train", "merge", "info"):
        assert command in proc.stdout
