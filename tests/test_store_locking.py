"""The Store on a SQLite file another process is writing to.

Another connection (a second worker) holds the file's write lock here for a moment. A
Store transaction that writes must wait for it, including one that reads first (SQLite
fails such a transaction at once, whatever the busy timeout, unless it took the lock up
front); one that waited past the busy timeout must come back as a temporary failure (exit
75), not a terminal one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batchpipe import pipeline
from batchpipe.db import Store, sqlite_path
from batchpipe.db.connect import create_engine
from batchpipe.errors import EXIT_TEMPFAIL, StoreBusy
from batchpipe.models import ItemStatus, JobSpec, JobStatus

HOLD_S = 0.3


@dataclass
class Lock:
    """When the other connection let go of the write lock (``time.monotonic()``)."""

    released_at: float | None = None


@contextmanager
def write_lock_held(url: str, seconds: float = HOLD_S) -> Iterator[Lock]:
    """Another connection takes the file's write lock, and lets go after ``seconds``."""
    path = sqlite_path(url)
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    lock = Lock()

    def release() -> None:
        time.sleep(seconds)
        # Stamped before the ROLLBACK: nothing waiting for the lock can get it earlier.
        lock.released_at = time.monotonic()
        conn.execute("ROLLBACK")
        conn.close()

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        yield lock
    finally:
        releaser.join()


def _job_with_batch(store: Store, rows: int = 3) -> tuple[int, int]:
    """A job whose ``rows`` items are all in one created batch: (job id, batch id)."""
    job = store.create_job(name="j", token="tok1", spec={}, input_fingerprint=None)
    store.insert_items(job.id, ((i, f"k{i}", ItemStatus.PENDING, None) for i in range(rows)))
    batch = store.plan_batch(
        job.id,
        round=1,
        items=[(i, f"tok1-{i}-1", 1) for i in range(rows)],
        request_bytes=100,
    )
    now = store.clock()
    assert store.mark_batch_created(
        batch.id, api_batch_id="msgbatch_x", created_at=now, expires_at=now
    )
    return job.id, batch.id


def _delete_items(store: Store) -> Any:
    job = store.create_job(name="fresh", token="tok2", spec={}, input_fingerprint=None)
    store.insert_items(job.id, [(0, "a", ItemStatus.PENDING, None)])
    return lambda: store.delete_items(job.id)


def _requeue_leftovers(store: Store) -> Any:
    _, batch_id = _job_with_batch(store)
    return lambda: store.requeue_batch_leftovers(batch_id)


def _release_batch(store: Store) -> Any:
    job = store.create_job(name="r", token="tok3", spec={}, input_fingerprint=None)
    store.insert_items(job.id, [(0, "a", ItemStatus.PENDING, None)])
    batch = store.plan_batch(job.id, round=1, items=[(0, "tok3-0-1", 1)], request_bytes=10)
    return lambda: store.release_batch_items(batch.id)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [(_delete_items, 1), (_requeue_leftovers, 3), (_release_batch, 1)],
    ids=["delete_items", "requeue_batch_leftovers", "release_batch_items"],
)
def test_a_write_that_reads_first_waits_for_another_writer(
    sqlite_url: str, setup: Callable[[Store], Callable[[], int]], expected: int
) -> None:
    with Store.open(sqlite_url) as store:
        operation = setup(store)
        with write_lock_held(sqlite_url) as lock:
            # Before: "database is locked" at once, exit 1, for every such call.
            assert operation() == expected
            finished = time.monotonic()
        # It waited for the other writer: done only once the lock was let go (timing the
        # whole block instead always passes, its exit waits for the release anyway).
        assert lock.released_at is not None
        assert finished >= lock.released_at


def test_a_lock_held_past_the_busy_timeout_is_a_temporary_failure(sqlite_url: str) -> None:
    Store.open(sqlite_url).close()  # migrated
    engine = create_engine(sqlite_url)

    def short_timeout(dbapi_connection: Any, _record: Any) -> None:
        # A busy timeout of 50 ms instead of 30 s, so the lock below outlasts it.
        dbapi_connection.execute("PRAGMA busy_timeout = 50")

    sa.event.listen(engine, "connect", short_timeout)
    with Store(engine, sqlite_url) as store:
        job = store.create_job(name="j", token="tok1", spec={}, input_fingerprint=None)
        with write_lock_held(sqlite_url), pytest.raises(StoreBusy) as caught:
            store.update_job(job.id, error="x")
        assert caught.value.exit_code == EXIT_TEMPFAIL
        assert "another worker is writing to it" in str(caught.value)
        assert "try again later" in str(caught.value)
        # Rolled back, nothing half-done; once the other writer is gone it goes through.
        assert store.update_job(job.id, error="y")


def test_an_ingest_that_renews_its_lease_mid_insert_does_not_lock_itself_out(
    sqlite_url: str, tmp_path: Path
) -> None:
    # The rows insert_items pulls call the lease heartbeat: a renewal on a second
    # connection waited 30 s for the lock its own insert held, then failed the ingest.
    src = tmp_path / "docs.jsonl"
    rows = 12_000  # more than one insert chunk: the first is written before the renewal
    src.write_text("".join(f'{{"doc_id": "d{i}", "body": "b{i}"}}\n' for i in range(rows)))
    spec = JobSpec(
        input=str(src), prompt="{{ body }}", model="claude-haiku-4-5", max_tokens=8,
        id_column="doc_id",
    )  # fmt: skip

    def no_client() -> Any:
        raise AssertionError("ingest needs no API client")

    with Store.open(sqlite_url) as store:
        # A lease that is due for renewal at every heartbeat.
        ctx = pipeline.Context(store=store, client_factory=no_client, lease_ttl_seconds=0.001)
        started = time.monotonic()
        job = pipeline.prepare(ctx, "big", spec)
        assert time.monotonic() - started < 20
        assert job.status == JobStatus.RUNNING
        assert job.row_count == rows
        assert store.count_items(job.id)[ItemStatus.PENDING] == rows


def test_a_tick_that_meets_a_busy_database_reports_each_job_unavailable(sqlite_url: str) -> None:
    Store.open(sqlite_url).close()  # migrated
    engine = create_engine(sqlite_url)

    def short_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout = 50")

    sa.event.listen(engine, "connect", short_timeout)

    def no_client() -> Any:
        raise AssertionError("no job gets as far as the API")

    with Store(engine, sqlite_url) as store:
        for name, token in (("a", "tok1"), ("b", "tok2")):
            store.create_job(name=name, token=token, spec={}, input_fingerprint=None)
        ctx = pipeline.Context(store=store, client_factory=no_client)
        with write_lock_held(sqlite_url, seconds=2.0):
            # Before: the first job's lease met the lock outside the per-job `try`, and
            # StoreBusy ended the whole tick: no job was reported, the others not tried.
            report = pipeline.tick(ctx)
    assert sorted(job.name for job, _ in report.unavailable) == ["a", "b"]
    assert all("try again later" in why for _, why in report.unavailable)
    assert report.failed == []
