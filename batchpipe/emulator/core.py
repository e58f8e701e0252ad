"""``Emulator``: the state behind one emulated Message Batches API, its clock and its knobs.

One lock guards all state, so the threaded HTTP server, in-process clients and test code
can use the same emulator at once. The clock is real time plus an offset that ``advance``
moves forward, so tests jump over the 24 h expiry or the 29-day archive instantly while a
plain ``batchpipe emulator`` still ends batches after ``processing_seconds`` of real time.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import orjson

from batchpipe.emulator.settings import EmulatorConfig
from batchpipe.emulator.store import BatchStore
from batchpipe.emulator.wsgi import EmulatorApp

IN_PROCESS_BASE_URL = "http://emulator.local"


class Emulator:
    """A stateful, thread-safe emulator of the Message Batches API (see the package docs)."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        _store: BatchStore | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._store = _store if _store is not None else BatchStore(config or EmulatorConfig())
        # Fault draws come from one seeded stream, so the same calls in the same order
        # meet the same faults on a replay.
        self.rng = random.Random(self._store.config.seed)
        self.wsgi_app = EmulatorApp(self)

    @property
    def config(self) -> EmulatorConfig:
        """The knobs in force (a copy; change them with ``configure``)."""
        with self._lock:
            return self._store.config.model_copy(deep=True)

    def now(self) -> float:
        """The emulator clock, in epoch seconds."""
        return self._clock() + self._store.clock_offset

    @contextmanager
    def locked(self) -> Iterator[BatchStore]:
        """Hold the lock and use the store (for the WSGI app; keep the block short)."""
        with self._lock:
            yield self._store

    def http_client(self, **kwargs: Any) -> httpx2.Client:
        """An httpx2 client that calls this emulator in-process, for ``Anthropic(http_client=...)``.

        Pass ``base_url="http://emulator.local"`` (``IN_PROCESS_BASE_URL``) to the SDK too.
        """
        transport = httpx2.WSGITransport(app=self.wsgi_app)
        return httpx2.Client(transport=transport, base_url=IN_PROCESS_BASE_URL, **kwargs)

    def advance(self, seconds: float) -> float:
        """Move the emulator clock forward; return the new time (epoch seconds)."""
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        with self._lock:
            self._store.clock_offset += seconds
            return self.now()

    def configure(self, **knobs: Any) -> EmulatorConfig:
        """Change knobs at runtime (validated); a new ``seed`` restarts the fault stream."""
        with self._lock:
            merged = {**self._store.config.model_dump(), **knobs}
            config = EmulatorConfig.model_validate(merged)
            if config.seed != self._store.config.seed:
                self.rng = random.Random(config.seed)
            self._store.config = config
            return config.model_copy(deep=True)

    def reset(self) -> None:
        """Forget all batches and counters and restart the fault stream (knobs stay)."""
        with self._lock:
            self._store.reset()
            self.rng = random.Random(self._store.config.seed)

    def stats(self) -> dict[str, Any]:
        """Counters: batches_created, requests_received, results_<type>, duplicate_successes
        (distinct params billed as succeeded more than once), batches (live), http_requests,
        calls (per endpoint) and faults (per kind)."""
        with self._lock:
            return self._store.stats(self.now())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a snapshot atomically (temp file + rename), for use by another process."""
        target = Path(path)
        with self._lock:
            data = orjson.dumps(self._store.snapshot())
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> Emulator:
        """Rebuild an emulator from ``save``'s snapshot (the prompt cache starts cold)."""
        data = orjson.loads(Path(path).read_bytes())
        return cls(clock=clock, _store=BatchStore.from_snapshot(data))
