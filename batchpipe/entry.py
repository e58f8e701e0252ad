"""The console script's entry point: quiet about Ctrl-C from the first moment.

Importing the CLI pulls in click, pyarrow, sqlalchemy and the anthropic SDK, about half a
second before any command runs. A Ctrl-C in that time used to print Python's
KeyboardInterrupt traceback. This module imports nothing heavy itself: it first makes
SIGINT end the process with one line on stderr and exit code 130, then imports the CLI and
runs it. A command's body switches SIGINT back to raising KeyboardInterrupt (see
``batchpipe.cli.app.handle_errors``), so that an interrupt there unwinds, releases the
job's lease and says the state is saved.

``batchpipe.cli.main`` stays the entry point for programmatic callers; it installs no
handler of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any

from batchpipe.errors import EXIT_INTERRUPTED

# Said before a command's body starts or after it ended, so no work is ever half-done.
_QUIET_LINE = b"interrupted; no work was in progress, run the same command again\n"


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI as the `batchpipe` command, with Ctrl-C and SIGTERM quiet during start-up."""
    previous = _exit_quietly_on_sigint()
    previous_term = _exit_quietly_on_sigterm()
    try:
        from batchpipe.cli import main as cli_main  # noqa: PLC0415 (after the handler, on purpose)

        return cli_main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _exit_quietly_on_sigint() -> Any:
    """Make SIGINT print one line and exit 130 at once; returns the handler it replaced.

    Leaves SIGINT alone when it is not Python's own KeyboardInterrupt handler: a shell starts
    background jobs with SIGINT ignored, and an embedding program may have its own.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _exit_quietly)


def _exit_quietly_on_sigterm() -> Any:
    """The same for SIGTERM (Airflow, systemd, `kill`), which a command's body turns into an
    unwinding exit 130 too: without this it killed the process outright (exit -15, 143 in a
    shell) when it came during start-up or after the body had finished. Left alone when
    someone else installed a handler or ignores it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(_signum: int, _frame: FrameType | None) -> None:
    # Outside a command's body nothing is open or half-written, so there is nothing to
    # unwind; os._exit also skips finalising modules an import left half-initialised.
    # os.write on fd 2 rather than print: sys.stderr may be mid-write in the interrupted frame.
    with contextlib.suppress(OSError):
        os.write(2, _QUIET_LINE)
    os._exit(EXIT_INTERRUPTED)
