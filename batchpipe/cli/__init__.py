"""The command line: parse, call the library, render. The only package that imports click.

Every command is a few lines. Errors become one line on stderr and the exit code their class
carries (see ``batchpipe.errors``); tracebacks only with ``--debug``.
"""

from __future__ import annotations

from typing import Any

# Importing the command modules attaches their commands to the root group.
from batchpipe.cli import cost_cmd, emulator_cmd, info_cmd, jobs_cmd, report_cmd  # noqa: F401
from batchpipe.cli.app import cli
from batchpipe.memory import tune_allocator, tune_collector


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    tune_allocator()
    tune_collector()
    return cli.main(args=argv, prog_name="batchpipe")


__all__ = ["cli", "main"]
