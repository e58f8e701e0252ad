"""Progress on a TTY: one self-rewriting line on stderr per long step; nothing otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click

# A rate over less than this is noise (and `waiting` redraws in an instant); leave it out.
_MIN_SECONDS_FOR_RATE = 1.0


class TerminalProgress:
    """Implements pipeline.Progress by redrawing `task: done/total (pct) rate` at most 10x/s.

    A finished step's line stays on screen, and the next step of the *same* name redraws over
    it: `run` reports `waiting` once per poll, which shows as one line that updates in place
    rather than a line per poll. A different step starts on a new line; `close` ends the last.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.task = ""
        self.total: int | None = None
        self.done = 0
        self.detail = ""
        self._start = 0.0
        self._drawn = 0.0
        self._line_open = False

    def start(self, task: str, total: int | None = None) -> None:
        """Begin a step."""
        if self._line_open and task != self.task:
            self._newline()
        self.task, self.total, self.done, self.detail = task, total, 0, ""
        self._start = self._drawn = time.monotonic()
        self._draw(force=True)

    def update(self, task: str, done: int, total: int | None = None, detail: str = "") -> None:
        """Show ``task`` at ``done`` of ``total`` in one draw, with ``detail`` after it.

        For `waiting`, once per poll: the count is set, not counted up from 0 (start then
        advance showed 0 for a moment each poll), and the rate runs from the first poll.
        """
        if task != self.task:
            if self._line_open:
                self._newline()
            self._start = time.monotonic()
        self.task, self.total, self.done, self.detail = task, total, done, detail
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        """Count `n` more units of work."""
        self.done += n
        self._draw()

    def finish(self) -> None:
        """End the step, showing its final count."""
        self._draw(force=True)

    def close(self) -> None:
        """End the last line, so what is printed next starts on its own line."""
        if self._line_open:
            self._newline()

    def _newline(self) -> None:
        click.echo("", file=self.stream)
        self._line_open = False

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        elapsed = now - self._start
        rate = (
            f" {self.done / elapsed:,.0f}/s"
            if elapsed >= _MIN_SECONDS_FOR_RATE and self.done
            else ""
        )
        if self.total:
            pct = 100 * self.done / self.total
            text = f"{self.task}: {self.done:,}/{self.total:,} ({pct:.0f}%){rate}"
        else:
            text = f"{self.task}: {self.done:,}{rate}"
        if self.detail:
            text += f" · {self.detail}"
        click.echo(f"\r\x1b[2K{text}", file=self.stream, nl=False)
        self._line_open = True


def make_progress() -> TerminalProgress | None:
    """A TerminalProgress when stderr is a TTY, else None (no bars in cron or Airflow logs)."""
    return TerminalProgress() if sys.stderr.isatty() else None
