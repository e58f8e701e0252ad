"""The root click group, shared options and the error-to-exit-code mapping."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from batchpipe import __version__, log
from batchpipe.errors import EXIT_INTERRUPTED, BatchpipeError, Interrupted

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """What the root group hands to every command."""

    def __init__(self, *, database_url: str | None, log_format: str, debug: bool) -> None:
        self.database_url = database_url
        self.log_format = log_format
        self.debug = debug


# Commands that touch no state database (so no --db after their name).
_WITHOUT_DB = frozenset({"emulator"})
LOG_FORMATS = ("auto", "console", "json")


def _root_option_again(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A root option given after the command's name: as if it had come before it."""
    state = ctx.find_object(State)
    if state is None or value is None or value is False:
        return value
    if param.name == "database_url":
        state.database_url = value  # given before the name too: the later one, as click does
        return value
    if param.name == "log_format":
        state.log_format = value
    else:
        state.debug = True
    log.configure(state.log_format, level=logging.DEBUG if state.debug else logging.INFO)
    return value


def _accept_root_options(command: click.Command) -> None:
    """Give ``command`` (and a group's commands) the root's --db, --log-format and --debug.

    `batchpipe run in.jsonl … --db URL` is how people write a cron line or an Airflow
    command; click alone answered "No such option '--db'. Did you mean '--job'?".
    """
    if getattr(command, "_batchpipe_root_options", False):
        return
    command._batchpipe_root_options = True  # type: ignore[attr-defined]
    taken = {flag for param in command.params for flag in param.opts}
    added = [
        click.Option(
            ["--db", "database_url"],
            metavar="URL",
            expose_value=False,
            callback=_root_option_again,
            help="The state database (as `batchpipe --db URL`).",
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(LOG_FORMATS),
            expose_value=False,
            callback=_root_option_again,
            help="Log style on stderr (as `batchpipe --log-format`).",
        ),
        click.Option(
            ["--debug"],
            is_flag=True,
            default=None,
            expose_value=False,
            callback=_root_option_again,
            help="Show tracebacks and debug logs (as `batchpipe --debug`).",
        ),
    ]
    for option in added:
        # A command's own option of the name stays its own; the emulator has no database.
        if taken.isdisjoint(option.opts) and not (
            option.name == "database_url" and command.name in _WITHOUT_DB
        ):
            command.params.append(option)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_root_options(sub)


class _RootGroup(click.Group):
    """The root group: its options are also accepted after a command's name."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # At resolution, not registration: a subgroup's commands (`db upgrade`) are added
        # to it after it was added here.
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _accept_root_options(command)
        return command


@click.group(
    cls=_RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="batchpipe")
@click.option(
    "--db",
    "database_url",
    metavar="URL",
    default=None,
    help="State database as a SQLAlchemy URL (sqlite:///state.db, postgresql+psycopg://…). "
    "Env: BATCHPIPE_DATABASE_URL. Default: sqlite:///batchpipe.db",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=None,
    help="Log style on stderr: console on a TTY, JSON lines otherwise (auto). "
    "Env: BATCHPIPE_LOG_FORMAT.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, log_format: str | None, debug: bool) -> None:
    """Push a dataset through Anthropic's Message Batches API and join the answers back.

    \b
    Typical use:
      batchpipe run reviews.parquet --prompt 'Classify: {{ body }}' \\
          --model claude-haiku-4-5 --max-tokens 16 -o labels.parquet
    Try it offline with --emulate (a built-in local emulator of the API; no key needed).
    """
    fmt = log_format or os.environ.get("BATCHPIPE_LOG_FORMAT") or "auto"
    log.configure(fmt, level=logging.DEBUG if debug else logging.INFO)
    ctx.obj = State(database_url=database_url, log_format=fmt, debug=debug)


def handle_errors(func: F) -> F:
    """Turn BatchpipeError into one stderr line and its exit code (tracebacks with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = click.get_current_context().find_object(State)
        previous = _raise_on_sigterm()
        previous_sigint = _raise_on_sigint()
        try:
            return func(*args, **kwargs)
        except Interrupted:
            click.echo("terminated; state is saved, run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BatchpipeError as exc:
            if state is not None and state.debug:
                # The traceback as well, never instead of the exit code: cron and Airflow
                # act on it (75 retries, 1 and 2 do not), debugging or not.
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "interrupted; state is saved, run the same command again to resume", err=True
            )
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if previous_sigint is not None:
                signal.signal(signal.SIGINT, previous_sigint)

    return wrapper  # type: ignore[return-value]


def _raise_on_sigterm() -> Any:
    """Make SIGTERM (Airflow timeouts, systemd, `kill`) unwind like Ctrl-C.

    Unwinding runs the `finally` blocks that release the job's lease and save state, so the
    next run need not wait for the lease to time out. Returns the previous handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def _handler(signum: int, _frame: Any) -> None:
        raise Interrupted(f"received signal {signum}")

    return signal.signal(signal.SIGTERM, _handler)


def _raise_on_sigint() -> Any:
    """Make Ctrl-C raise KeyboardInterrupt in the command's body, so it unwinds and saves state.

    The `batchpipe` command (``batchpipe.entry``) starts with a handler that exits at once,
    which suits imports and argument parsing but would skip releasing the lease here.
    A SIGINT that is ignored (a shell's background job) stays ignored. Returns the previous
    handler, or None when nothing was changed.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGINT)
    if current in (signal.SIG_IGN, None, signal.default_int_handler):
        return None
    return signal.signal(signal.SIGINT, signal.default_int_handler)
