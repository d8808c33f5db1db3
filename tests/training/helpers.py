"""Shared pieces of the training tests: the CLI in-process and as a subprocess, JSONL files, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moetune import cli

DEMO_RECORD = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """moetune's main() in this process (a CLI runner): (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """The installed entry point's module in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "moetune.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


def write_jsonl(path, records, raw_lines=()) -> str:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(output_dir) -> dict:
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)
