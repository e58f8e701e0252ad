"""`batchpipe emulator`: serve the local Message Batches API emulator over HTTP.

Every knob of ``EmulatorConfig`` becomes a flag, generated from the model so the help can
never drift from what the emulator accepts.
"""

from __future__ import annotations

import signal
import types
from pathlib import Path
from typing import Any, get_args, get_origin

import click
from pydantic import ValidationError

from batchpipe.cli.app import cli, handle_errors
from batchpipe.emulator import Emulator, EmulatorConfig, EmulatorServer
from batchpipe.errors import UsageError

_EPILOG = """\b
Point the SDK (or batchpipe itself) at it:
  ANTHROPIC_BASE_URL=http://127.0.0.1:PORT ANTHROPIC_API_KEY=anything
Control endpoints (no auth): GET /_emulator/stats, GET|POST /_emulator/faults (JSON knobs),
POST /_emulator/clock {"advance": seconds}, POST /_emulator/reset.
"""


def _knob_options() -> list[click.Option]:
    """One click option per EmulatorConfig field, help taken from the field's description."""
    options: list[click.Option] = []
    for name, info in EmulatorConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = info.description or ""
        default = info.get_default(call_default_factory=True)
        annotation = info.annotation
        if get_origin(annotation) in (list, tuple):
            item_type: Any = int if get_origin(annotation) is list else str
            if item_type is str:
                choices = get_args(get_args(annotation)[0])  # a Literal's values, if any
                item_type = click.Choice(list(choices)) if choices else str
            options.append(
                click.Option(
                    [flag, name],
                    multiple=True,
                    type=item_type,
                    default=None,
                    help=f"{help_text}. Repeat the flag for several. Default: "
                    f"{' '.join(str(v) for v in default) or 'none'}",
                )
            )
        else:
            options.append(
                click.Option(
                    [flag, name],
                    type=annotation if annotation in (int, float) else str,
                    default=None,
                    help=f"{help_text}. Default: {default}",
                )
            )
    return options


def _serve(host: str, port: int, state: Path | None, knobs: dict[str, Any]) -> None:
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()}
    given = {k: v for k, v in given.items() if v is not None and v != []}
    try:
        if state is not None and state.exists():
            emu = Emulator.load(state)
            emu.configure(**given)
        else:
            emu = Emulator(EmulatorConfig(**given))
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-') if e['loc'] else 'settings'}: {e['msg']}"
            for e in exc.errors()
        )
        raise UsageError(f"invalid emulator settings: {problems}") from None
    try:
        server = EmulatorServer(emu, host=host, port=port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

    def _terminate(_signum: int, _frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt  # leave serve_forever the same way Ctrl-C does

    signal.signal(signal.SIGTERM, _terminate)
    click.echo(server.url, nl=True)
    click.echo(
        f"emulator listening on {server.url}; use ANTHROPIC_BASE_URL={server.url} "
        "ANTHROPIC_API_KEY=anything. Ctrl-C to stop.",
        err=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("emulator stopped", err=True)
    finally:
        server.stop()
        if state is not None:
            emu.save(state)


@cli.command("emulator", epilog=_EPILOG)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Snapshot file: loaded at start if it exists, written on exit.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="TCP port (0: any free port; the URL printed tells which).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@handle_errors
def emulator_command(host: str, port: int, state: Path | None, **knobs: Any) -> None:
    """Run a local emulator of the Message Batches API (no key, no network needed).

    Prints its URL on stdout, then serves until Ctrl-C or SIGTERM. Knobs set timing and
    seeded fault injection; rates are fractions in [0, 1], times are seconds.
    """
    _serve(host, port, state, knobs)


# The knobs are added after the fixed options so --help lists host/port/state first.
emulator_command.params.extend(_knob_options())
