"""Build the pipeline's Context for a command: settings, store, API client or built-in emulator."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from batchpipe.cli.app import State
from batchpipe.cli.progress import make_progress
from batchpipe.config import Settings
from batchpipe.db import Store, sqlite_path
from batchpipe.errors import UsageError
from batchpipe.pipeline import Context, NullProgress
from batchpipe.pipeline.context import DEFAULT_ORPHAN_GRACE_SECONDS

if TYPE_CHECKING:
    from batchpipe.client import BatchClient

# In emulator mode batches end after this long, so a demo shows progress without waiting.
EMULATE_PROCESSING_SECONDS = 1.0
EMULATE_POLL_INTERVAL = 0.5


def _orphan_grace() -> float:
    raw = os.environ.get("BATCHPIPE_ORPHAN_GRACE")
    if raw is None:
        return DEFAULT_ORPHAN_GRACE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UsageError(f"BATCHPIPE_ORPHAN_GRACE={raw!r}: expected a number of seconds >= 0")
    return value


def settings_for(state: State) -> Settings:
    """Settings from the root options and the environment."""
    return Settings.load(database_url=state.database_url, log_format=state.log_format)


def emulator_state_path(database_url: str) -> Path:
    """Where `--emulate` keeps the emulator's state between processes: beside a SQLite file."""
    path = sqlite_path(database_url)
    if path is not None:
        return path.with_name(path.name + ".emulator.json")
    return Path("batchpipe-emulator.json")


@contextmanager
def pipeline_context(state: State, *, emulate: bool = False) -> Iterator[Context]:
    """A Context for one command; closes the client and store (and saves emulator state)."""
    settings = settings_for(state)
    store = Store.open(settings.database_url)
    bar = make_progress()
    grace = _orphan_grace()
    saver = None
    if emulate:
        # Imported only here: nothing on the production path loads the emulator.
        from batchpipe.emulator import (  # noqa: PLC0415
            IN_PROCESS_BASE_URL,
            Emulator,
            EmulatorConfig,
        )

        path = emulator_state_path(settings.database_url)
        emu = (
            Emulator.load(path)
            if path.exists()
            else Emulator(EmulatorConfig(processing_seconds=EMULATE_PROCESSING_SECONDS))
        )
        emu_settings = dataclasses.replace(
            settings, api_key=settings.api_key or SecretStr("emulator")
        )

        def factory() -> BatchClient:
            from batchpipe.client import BatchClient  # noqa: PLC0415 (SDK loads on first use)

            return BatchClient(
                emu_settings, http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL
            )

        def saver() -> None:
            emu.save(path)

    else:

        def factory() -> BatchClient:
            from batchpipe.client import BatchClient  # noqa: PLC0415 (SDK loads on first use)

            return BatchClient(settings)

    ctx = Context(
        store=store,
        client_factory=factory,
        progress=bar or NullProgress(),
        orphan_grace_seconds=grace,
    )
    try:
        yield ctx
    finally:
        if bar is not None:
            bar.close()  # end the bar's line before the command prints its summary
        ctx.close()
        if saver is not None:
            saver()
        store.close()
