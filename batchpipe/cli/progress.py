"""Progress on a TTY: one self-rewriting line on stderr per long step; nothing otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click


class TerminalProgress:
    """Implements pipeline.Progress by redrawing `task: done/total (pct) rate` at most 10x/s."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.task = ""
        self.total: int | None = None
        self.done = 0
        self._start = 0.0
        self._drawn = 0.0

    def start(self, task: str, total: int | None = None) -> None:
        """Begin a step."""
        self.task, self.total, self.done = task, total, 0
        self._start = self._drawn = time.monotonic()
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        """Count `n` more units of work."""
        self.done += n
        self._draw()

    def finish(self) -> None:
        """End the step and leave its final line."""
        self._draw(force=True)
        click.echo("", err=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        rate = self.done / max(now - self._start, 1e-6)
        if self.total:
            pct = 100 * self.done / self.total
            text = f"{self.task}: {self.done:,}/{self.total:,} ({pct:.0f}%) {rate:,.0f}/s"
        else:
            text = f"{self.task}: {self.done:,} {rate:,.0f}/s"
        click.echo(f"\r\x1b[2K{text}", err=True, nl=False)


def make_progress() -> TerminalProgress | None:
    """A TerminalProgress when stderr is a TTY, else None (no bars in cron or Airflow logs)."""
    return TerminalProgress() if sys.stderr.isatty() else None
