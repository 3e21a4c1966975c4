"""Refresh the `--help` blocks of README.md from the current CLI (tests/unit/test_docs.py checks)."""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import typer.core
from typer.testing import CliRunner

from connector.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def render(path: list[str]) -> str:
    with mock.patch.object(typer.core, "HAS_RICH", False):
        result = CliRunner().invoke(
            app, [*path, "--help"], prog_name="winback", terminal_width=78, max_content_width=78
        )
    return result.stdout


def main() -> None:
    text = README.read_text(encoding="utf-8")

    def replace(match: re.Match[str]) -> str:
        command = match.group(1)
        path = command.split()[1:]
        return f"$ {command} --help\n{render(path)}```"

    updated = re.sub(r"\$ (winback[\w -]*?) --help\n.*?```", replace, text, flags=re.DOTALL)
    README.write_text(updated, encoding="utf-8")


if __name__ == "__main__":
    main()
