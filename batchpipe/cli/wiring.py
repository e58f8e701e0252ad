"""Build the pipeline's Context for a command: settings, store, API client or built-in emulator."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from batchpipe.cli.app import State
from batchpipe.cli.progress import make_progress
from batchpipe.config import Settings
from batchpipe.db import Store, sqlite_path
from batchpipe.errors import AuthenticationFailed, TransientAPIError, UsageError
from batchpipe.pipeline import Context, NullProgress
from batchpipe.pipeline.context import DEFAULT_ORPHAN_GRACE_SECONDS

if TYPE_CHECKING:
    from batchpipe.client import BatchClient

# In emulator mode batches end after this long, so a demo shows progress without waiting.
EMULATE_PROCESSING_SECONDS = 1.0
EMULATE_POLL_INTERVAL = 0.5
# How long an `--emulate` command waits for another one to let go of the emulator's state.
EMULATE_LOCK_PATIENCE_S = 30.0
_LOCK_PAUSE_S = 0.1


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


def require_api_key(state: State) -> None:
    """Refuse at once, before any input is read or anything stored, a command that will call
    the API with no ANTHROPIC_API_KEY (exit 2); otherwise the whole input would be validated
    and the job recorded, only for the submit to fail.

    Asked of every real API, an emulator at ANTHROPIC_BASE_URL included: the SDK sends a key
    with every call, and a local emulator accepts any. `--emulate` needs none (its callers
    skip this). The key itself is never printed.
    """
    if settings_for(state).api_key is not None:
        return
    # Not the URL itself: it may carry credentials of a proxy.
    where = "the API at ANTHROPIC_BASE_URL" if settings_for(state).base_url else "the Anthropic API"
    raise AuthenticationFailed(
        f"ANTHROPIC_API_KEY is not set, and this command calls {where}: set ANTHROPIC_API_KEY "
        "(any value will do for a local emulator at ANTHROPIC_BASE_URL), or pass --emulate to "
        "use the built-in emulator; nothing was read or stored"
    )


def emulator_state_path(database_url: str) -> Path:
    """Where `--emulate` keeps the emulator's state between processes: beside a SQLite file."""
    path = sqlite_path(database_url)
    if path is not None:
        return path.with_name(path.name + ".emulator.json")
    return Path("batchpipe-emulator.json")


@contextmanager
def _state_locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` + ``.lock`` for the block (one `--emulate` process
    at a time loads, uses and saves the emulator's state).

    Each process loads the state when it starts and saves it when it ends: two at once
    would each save their own view over the other's, and the batches the first one created
    would then answer 404 for good. ``fcntl.flock`` suffices: batchpipe's target is Linux,
    the state sits beside a local SQLite file, and the kernel lets go of the lock when the
    process dies, however it dies (no stale lock file to clean up). A lock busy for longer
    than EMULATE_LOCK_PATIENCE_S is a temporary failure (exit 75), as a busy API would be.
    """
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+b") as handle:
        deadline = time.monotonic() + EMULATE_LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TransientAPIError(
                        f"the built-in emulator's state {path} is in use by another --emulate "
                        f"command (lock {lock_path}) for more than {EMULATE_LOCK_PATIENCE_S:.0f} "
                        "s; try again when it has finished (exit 75)"
                    ) from None
                time.sleep(_LOCK_PAUSE_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def pipeline_context(state: State, *, emulate: bool = False) -> Iterator[Context]:
    """A Context for one command; closes the client and store (and saves emulator state)."""
    settings = settings_for(state)
    store = Store.open(settings.database_url)
    bar = make_progress()
    grace = _orphan_grace()
    saver = None
    held = ExitStack()
    if emulate:
        # Imported only here: nothing on the production path loads the emulator.
        from batchpipe.emulator import (  # noqa: PLC0415
            IN_PROCESS_BASE_URL,
            Emulator,
            EmulatorConfig,
        )

        path = emulator_state_path(settings.database_url)
        try:
            held.enter_context(_state_locked(path))
            emu = (
                Emulator.load(path)
                if path.exists()
                else Emulator(EmulatorConfig(processing_seconds=EMULATE_PROCESSING_SECONDS))
            )
        except BaseException:
            held.close()
            store.close()
            raise
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
        emulated=emulate,
    )
    try:
        yield ctx
    finally:
        if bar is not None:
            bar.close()  # end the bar's line before the command prints its summary
        ctx.close()
        with held:  # saved before the lock is let go
            if saver is not None:
                saver()
        store.close()
