"""What every part of the Store shares: the engine, the clock, transactions, value cleaning.

The Store is split by table into mixins (``jobs.py``, ``items.py``, ``batches.py``) so each
file keeps one job; they all build on :class:`StoreBase`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from batchpipe.db.connect import BEGIN_IMMEDIATE, describe_error, locked, mask_url, unavailable
from batchpipe.db.schema import batches, items
from batchpipe.errors import StoreBusy, StoreError, StoreUnreachable

E = TypeVar("E", bound=Enum)


class JobNameTaken(StoreError):
    """``create_job`` was given a name another job already has."""


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def plain(value: Any) -> Any:
    """Enums as their stored string value; everything else unchanged."""
    return value.value if isinstance(value, Enum) else value


def status_values(statuses: E | Collection[E]) -> list[str]:
    """One status or a collection of them, as the strings stored in the database."""
    if isinstance(statuses, Enum):
        return [str(statuses.value)]
    return [str(s.value) for s in statuses]


def batch_members(
    conn: sa.Connection, batch_id: int, statuses: Collection[str] | None = None
) -> sa.ColumnElement[bool]:
    """WHERE clause for the items of one batch (optionally only those in ``statuses``).

    There is no index on ``items.batch_id`` (every claim and result would update it), so the
    batch's job and row span, read here, make it a range of the items' primary key.
    """
    span = conn.execute(
        sa.select(batches.c.job_id, batches.c.first_row, batches.c.last_row).where(
            batches.c.id == batch_id
        )
    ).first()
    if span is None:
        return sa.false()
    job_id, first, last = span
    where = sa.and_(items.c.job_id == job_id, items.c.batch_id == batch_id)
    if first is not None and last is not None:
        where = sa.and_(where, items.c.row_index.between(first, last))
    if statuses is not None:
        where = sa.and_(where, items.c.status.in_(list(statuses)))
    return where


class StoreBase:
    """The engine plus helpers; see :class:`batchpipe.db.store.Store` for the public API."""

    def __init__(self, engine: Engine, url: str) -> None:
        self._engine = engine
        self._url = url
        # Injected in tests that need to move time (lease expiry); always aware UTC.
        self.clock: Callable[[], datetime] = utcnow
        # This thread's open write transaction on SQLite, if any (see _write).
        self._writing = threading.local()

    @property
    def url(self) -> str:
        """The database URL, password masked (safe for messages)."""
        return mask_url(self._url)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """One transaction that only reads: committed on success, rolled back on any exception.

        On SQLite it begins deferred, so readers never wait for a writer (WAL). A transaction
        that writes must use :meth:`_write` instead. Errors are translated as in
        :meth:`_translated`.
        """
        with self._translated(), self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _write(self, *, foreign_keys: bool = True) -> Iterator[sa.Connection]:
        """One transaction that writes: committed on success, rolled back on any exception.

        On SQLite it begins IMMEDIATE, taking the file's write lock up front (waiting on the
        busy timeout for another process's writer). A deferred transaction that reads first
        holds a snapshot, and SQLite cannot upgrade that snapshot to a write once another
        connection has written since: it fails at once with "database is locked", busy
        timeout or not. Several workers on one file (overlapping cron ticks) hit that.

        A write made on the same thread while this one is open (the lease heartbeat called
        from the rows ``insert_items`` pulls) joins it on SQLite: a second connection would
        wait for the lock this thread holds, a deadlock the busy timeout ends as a failure.
        Joined, the renewal commits with the transaction; no other process can write the
        file before then anyway. PostgreSQL locks rows, not the database, so there each write
        keeps its own transaction and a renewal is seen by other workers at once.

        ``foreign_keys=False``: SQLite does not check foreign keys in this transaction (a
        joined one keeps its own setting). Only for the bulk writes whose every reference is
        right by construction: a job's items and batches point at the job (jobs are never
        deleted), and a claim points its items at the batch row inserted in the same
        transaction. The check was a lookup per row: bench/store_floor.py at 100,000 items
        ran 457 M instructions more with it for the claim, 130 M for the insert
        (callgrind); through the Store, a million items' claim took 2.7 s of CPU with it and
        2.2 s without. PostgreSQL always checks, and runs the same code in the tests.
        """
        joined: sa.Connection | None = getattr(self._writing, "conn", None)
        if joined is not None:
            yield joined
            return
        if self.dialect != "sqlite":
            with self._translated(), self._engine.begin() as conn:
                yield conn
            return
        with self._translated(), self._engine.connect() as conn:
            conn.execution_options(**{BEGIN_IMMEDIATE: True})
            if not foreign_keys:
                _sqlite_foreign_keys(conn, on=False)  # a no-op inside a transaction: before it
            try:
                with conn.begin():
                    self._writing.conn = conn
                    try:
                        yield conn
                    finally:
                        self._writing.conn = None
            finally:
                if not foreign_keys:
                    _sqlite_foreign_keys(conn, on=True)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Driver errors as batchpipe's: lost connections and lock timeouts become StoreError
        with the masked URL (exit 75 where trying again later can help); integrity errors
        pass through so callers can translate the ones they expect."""
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            reason = describe_error(exc, self._url)
            if unavailable(exc):
                # Rolled back, so nothing is half-written: the same command resumes.
                raise StoreUnreachable(
                    f"lost the connection to database {self.url}: {reason}; the work so far "
                    "is saved: run the command again when the server is back (exit 75)"
                ) from exc
            if locked(exc):
                raise StoreBusy(
                    f"database {self.url}: another worker is writing to it and kept it locked "
                    f"({reason}); the work so far is saved: try again later (exit 75)"
                ) from exc
            raise StoreError(f"database {self.url}: {reason}") from exc
        except sa.exc.StatementError as exc:
            # A value our own types refused (e.g. a naive datetime): the caller's bug, shown
            # as the plain ValueError rather than wrapped in SQLAlchemy's statement dump.
            if isinstance(exc.orig, ValueError) and not isinstance(exc, sa.exc.DBAPIError):
                raise exc.orig from None
            raise

    def _cas_update(
        self,
        table: sa.Table,
        row_id: int,
        expected: Enum | Collection[Enum] | None,
        fields: Mapping[str, Any],
        *,
        touch: bool,
    ) -> bool:
        """``UPDATE table SET fields WHERE id = :id [AND status IN (:expected)]``.

        Returns whether a row changed, so two workers racing on the same transition see
        exactly one success.
        """
        unknown = set(fields) - set(table.c.keys())
        if unknown or "id" in fields:
            bad = sorted(unknown | ({"id"} & set(fields)))
            raise ValueError(f"cannot update {table.name}.{', '.join(bad)}")
        values = {name: plain(value) for name, value in fields.items()}
        if touch:
            values.setdefault("updated_at", self.clock())
        if not values:
            raise ValueError(f"update of {table.name} {row_id} without fields")
        stmt = sa.update(table).where(table.c.id == row_id).values(values)
        if expected is not None:
            stmt = stmt.where(table.c.status.in_(status_values(expected)))
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1


def _sqlite_foreign_keys(conn: sa.Connection, *, on: bool) -> None:
    """Turn SQLite's foreign key checks on or off for ``conn``, outside any transaction.

    Through the driver, as SQLAlchemy would begin a transaction first. A connection whose
    checks cannot be turned back on (it broke) is discarded, never handed out again without
    them; what its transaction did stands or was rolled back as it would have been.
    """
    try:
        conn.connection.driver_connection.execute(  # type: ignore[union-attr]
            f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}"
        )
    except sqlite3.Error:
        if not on:
            raise
        conn.invalidate()
