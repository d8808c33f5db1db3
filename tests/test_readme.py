"""The README's two set-up commands stay true: CI runs the test one verbatim, the first names real commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_two_setup_commands_and_ci_runs_the_test_one():
    install_and_run, test = readme_commands()
    assert "moetune" in install_and_run and "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_first_command_uses_an_existing_subcommand():
    from moetune.cli import build_parser

    install_and_run, _ = readme_commands()
    subcommand = install_and_run.split("moetune ", 1)[1].split()[0]
    parser = build_parser()
    assert parser.parse_args([subcommand]).command == subcommand
