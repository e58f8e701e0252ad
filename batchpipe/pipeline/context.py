"""What every pipeline step needs: the store, the API client, the clock, the job lease.

Steps never print. They report progress through a `Progress` sink (the CLI draws bars on a
TTY) and log one canonical structlog line per step.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from batchpipe.db import JobRow, Store
from batchpipe.errors import JobLocked, UsageError
from batchpipe.log import get_logger
from batchpipe.models import ItemStatus, JobSpec
from batchpipe.procs import pid_gone, pid_home

if TYPE_CHECKING:
    # Only a type here: importing the SDK costs ~2 s of CPU, which commands that never
    # call the API (status, jobs, export, ingest) should not pay.
    from batchpipe.client import BatchClient

log = get_logger(__name__)

LEASE_TTL_SECONDS = 300.0
# A planned batch with no matching batch at the API is only re-created once the intent is
# this old: a create that was still on the wire when its process died may yet appear. It
# must outlast the client's request timeout (config.Settings.request_timeout, 600 s): a
# create that timed out on our side may still be accepted by the API until then.
DEFAULT_ORPHAN_GRACE_SECONDS = 660.0


class Progress(Protocol):
    """Where long steps report progress. The CLI renders it; tests and cron ignore it."""

    def start(self, task: str, total: int | None = None) -> None:
        """A step with `total` units of work begins."""

    def advance(self, n: int = 1) -> None:
        """`n` more units are done."""

    def finish(self) -> None:
        """The current step is over."""

    def update(self, task: str, done: int, total: int | None = None, detail: str = "") -> None:
        """Show `task` at `done` of `total` at once, with a `detail` (a poll's state)."""


class NullProgress:
    """Progress that goes nowhere (not a TTY, tests, library use)."""

    def start(self, task: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass

    def update(self, task: str, done: int, total: int | None = None, detail: str = "") -> None:
        pass


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def default_owner() -> str:
    """A lease owner id: where the pid is meaningful (:func:`~batchpipe.procs.pid_home`),
    the pid and a nonce (the pid lets a restart spot a dead holder)."""
    return f"{pid_home()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def failpoint(name: str) -> None:
    """Die like `kill -9` here when BATCHPIPE_FAILPOINT names this point (crash tests only).

    The crash-consistency tests use this to stop a real process at an exact step (e.g. right
    after the API accepted a batch, before its id is stored) instead of hoping a random
    SIGKILL lands there.
    """
    if os.environ.get("BATCHPIPE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _holder_is_dead(owner: str) -> bool:
    """True when the lease holder's pid is one of ours (same host, boot and PID namespace)
    and its process is gone. Anywhere else its lease runs out instead."""
    home, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if home != pid_home() or not pid_text.isdigit():
        return False
    return pid_gone(int(pid_text))


@dataclass
class Context:
    """The pipeline's dependencies. Build one per process (the CLI does)."""

    store: Store
    client_factory: Callable[[], BatchClient]
    owner: str = field(default_factory=default_owner)
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    progress: Progress = field(default_factory=NullProgress)
    orphan_grace_seconds: float = DEFAULT_ORPHAN_GRACE_SECONDS
    lease_ttl_seconds: float = LEASE_TTL_SECONDS
    # The client talks to the built-in emulator (--emulate): only emulated jobs are its own.
    emulated: bool = False
    _client: BatchClient | None = None
    _renewed: dict[int, float] = field(default_factory=dict)
    # Jobs whose lease `lease()` keeps past its block, inside `keeping_leases()`.
    _kept: set[int] | None = None
    # The items by status and the dollars paid of the job this context last finished,
    # counted as it finished (see pipeline.runner.finished_totals): the end of `run` shows
    # them without walking the job's rows once more.
    finished_totals: dict[int, tuple[dict[ItemStatus, int], float | None]] = field(
        default_factory=dict
    )

    @property
    def client(self) -> BatchClient:
        """The API client, created on first use (ingest and export never need one)."""
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def close(self) -> None:
        """Close the client (the store belongs to the caller)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ leases

    def try_lease(self, job: JobRow) -> bool:
        """Take the job's lease; break it first if its holder died on this host."""
        if self.store.acquire_lease(job.id, self.owner, self.lease_ttl_seconds):
            self._renewed[job.id] = time.monotonic()
            return True
        current = self.store.get_job(job.id)
        if current and current.lease_owner and _holder_is_dead(current.lease_owner):
            log.warning("lease.taken_over", job_id=job.id, dead_owner=current.lease_owner)
            self.store.release_lease(job.id, current.lease_owner)
            if self.store.acquire_lease(job.id, self.owner, self.lease_ttl_seconds):
                self._renewed[job.id] = time.monotonic()
                return True
        return False

    @contextmanager
    def lease(self, job: JobRow) -> Iterator[None]:
        """Hold the job's lease for the block, or raise JobLocked."""
        if not self.try_lease(job):
            current = self.store.get_job(job.id)
            holder = f" ({current.lease_owner})" if current and current.lease_owner else ""
            # A holder elsewhere that died is only known dead when its lease runs out: say when.
            until = current.lease_until if current else None
            free = (
                f"; if that process is gone, the job is free from {until:%Y-%m-%d %H:%M:%S} UTC"
                if until is not None
                else ""
            )
            raise JobLocked(
                f"job {job.id} ({job.name}) is being worked on by another process{holder}; "
                "try again when it is done, or stop it first (a `batchpipe run` stops with "
                f"Ctrl-C and resumes later){free}"
            )
        try:
            yield
        finally:
            if self._kept is not None:
                self._kept.add(job.id)
            else:
                self.store.release_lease(job.id, self.owner)
                self._renewed.pop(job.id, None)

    @contextmanager
    def keeping_leases(self) -> Iterator[None]:
        """Keep every lease :meth:`lease` takes in the block until the block ends.

        For a command made of several leased steps (`run` is prepare, then run): between
        them a cron `tick` would take the job and the command would fail with JobLocked.
        """
        outer, self._kept = self._kept, set()
        try:
            yield
        finally:
            kept, self._kept = self._kept, outer
            for job_id in kept:
                if outer is not None:
                    outer.add(job_id)
                    continue
                self.store.release_lease(job_id, self.owner)
                self._renewed.pop(job_id, None)

    def heartbeat(self, job_id: int) -> None:
        """Renew the lease during long work; raise JobLocked if another process took it."""
        last = self._renewed.get(job_id)
        if last is None or time.monotonic() - last < self.lease_ttl_seconds / 4:
            return
        if not self.store.renew_lease(job_id, self.owner, self.lease_ttl_seconds):
            raise JobLocked(f"job {job_id}: lost the lease to another process; stopping")
        self._renewed[job_id] = time.monotonic()

    def pause(self, job_id: int, seconds: float) -> None:
        """Sleep between polls while keeping the lease: a 5-minute idle wait is as long as
        the lease, so the wait is cut into slices with a renewal before each."""
        slice_ = max(self.lease_ttl_seconds / 4, 0.01)
        left = seconds
        while True:
            self.heartbeat(job_id)
            if left <= 0:
                return
            self.sleep(min(slice_, left))
            left -= slice_


def check_same_api(ctx: Context, job: JobRow) -> None:
    """UsageError unless ``job`` was sent where this command's client talks: the built-in
    emulator (``--emulate``) or the API. An emulated job's answers are stand-ins; a real
    job's batches are not at the emulator (each would look deleted and stop the job)."""
    if job.emulated == ctx.emulated:
        return
    if job.emulated:
        raise UsageError(
            f"job {job.id} ({job.name}) was run on the built-in emulator (--emulate): its "
            "answers are stand-ins, not the model's. Add --emulate to go on with it; for "
            "real answers, give the real run another --job name (or its own -o, or --db)"
        )
    raise UsageError(
        f"job {job.id} ({job.name}) was sent to the API: the built-in emulator has none of its "
        "batches. Run it without --emulate"
    )


def api_now(ctx: Context) -> datetime:
    """The API's clock now (``BatchClient.api_now``), or ours until the API has answered.

    For times the API stamped (``created_at``, ``expires_at``): a host clock that is off
    would move expiry warnings and the orphan search window by as much.
    """
    return ctx.client.api_now() or ctx.clock()


def api_clock_skew(ctx: Context) -> timedelta:
    """How far the API's clock is ahead of ours (negative: behind); zero until it answered."""
    seen = ctx.client.api_now()
    return seen - ctx.clock() if seen is not None else timedelta(0)


def reload_job(ctx: Context, job: JobRow) -> JobRow:
    """The job's row as the store has it now (another step or worker may have moved it)."""
    fresh = ctx.store.get_job(job.id)
    assert fresh is not None  # jobs are never deleted
    return fresh


def job_spec(job: JobRow) -> JobSpec:
    """The JobSpec stored with a job."""
    return JobSpec.model_validate(job.spec)


def bind(job: JobRow, logger: Any = None, **extra: Any) -> Any:
    """`logger` (default: this module's) bound to the job's id and name."""
    return (logger or log).bind(job_id=job.id, job=job.name, **extra)
