"""The Store: every read and write of batchpipe's state, on SQLite or PostgreSQL.

Opening checks the schema revision before anything else touches the database: a missing or
blank SQLite file is migrated on the spot (the zero-setup default), anything else that is not
at head is refused with the command that fixes it. The per-table methods live in the mixins.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from batchpipe.db.batches import BatchesMixin
from batchpipe.db.connect import (
    create_engine,
    describe_error,
    locked,
    mask_url,
    sqlite_path,
    unavailable,
)
from batchpipe.db.items import ItemsMixin
from batchpipe.db.jobs import JobsMixin
from batchpipe.db.ledger import LedgerMixin
from batchpipe.db.migrate import head_revision, newer_schema, revision_of, upgrade
from batchpipe.errors import StoreBusy, StoreError, StoreUnreachable, UsageError

# How long Store.open keeps retrying a SQLite file that is locked in a way SQLite does not
# wait out itself (see _inspect), and the pause between tries.
_LOCKED_PATIENCE_S = 10.0
_LOCKED_PAUSE_S = 0.05


class Store(JobsMixin, ItemsMixin, BatchesMixin, LedgerMixin):
    """batchpipe's state database. Thread-safe (one engine, pooled connections)."""

    @classmethod
    def open(cls, url: str, *, auto_migrate: bool = True) -> Store:
        """Connect to ``url`` and make sure its schema is the one this code needs.

        Raises StoreError (with the password masked) when the database is unreachable or
        not at the head revision.
        """
        path = sqlite_path(url)
        blank_file = path is not None and (not path.exists() or path.stat().st_size == 0)
        if path is not None and not path.parent.is_dir():
            # A setting to fix (--db, BATCHPIPE_DATABASE_URL), as a malformed URL is: exit 2.
            raise UsageError(
                f"database {mask_url(url)}: directory {path.parent} does not exist; create it "
                "or point --db (BATCHPIPE_DATABASE_URL) at a file in an existing folder"
            )
        engine = create_engine(url)
        try:
            current, has_tables = _inspect(engine)
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            if unavailable(exc):
                raise StoreUnreachable(
                    f"cannot reach database {mask_url(url)}: {describe_error(exc, url)}; "
                    "try again when the server is up (exit 75)"
                ) from None
            if locked(exc):
                raise StoreBusy(
                    f"cannot open database {mask_url(url)}: another worker kept it locked "
                    f"({describe_error(exc, url)}); try again later (exit 75)"
                ) from None
            raise StoreError(
                f"cannot open database {mask_url(url)}: {describe_error(exc, url)}"
            ) from None
        head = head_revision()
        if current != head:
            # A file with no tables at all is as blank as a missing one (e.g. `touch`ed).
            if auto_migrate and path is not None and (blank_file or not has_tables):
                try:
                    upgrade(url)
                except StoreError:
                    # Another process may have migrated the same new file first; if so,
                    # its work is ours too.
                    if _revision_or_none(engine) != head:
                        engine.dispose()
                        raise
                except BaseException:
                    engine.dispose()
                    raise
            else:
                engine.dispose()
                newer = newer_schema(url, current) if current is not None else None
                raise newer or StoreError(
                    f"database {mask_url(url)} is at revision {current or 'none (empty)'}, "
                    f"batchpipe needs {head}: run `batchpipe db upgrade`"
                )
        return cls(engine, url)

    def close(self) -> None:
        """Close every pooled connection. The Store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _inspect(engine: sa.Engine) -> tuple[str | None, bool]:
    """The database's revision, and whether it has any tables at all.

    A SQLite file that another process is turning into WAL this moment refuses the first
    look with "database is locked" whatever the busy timeout (SQLite does not wait for that
    lock: seen with six workers opening one new file under load), so that is retried.
    """
    # A deadline, not a count of pauses: a lock SQLite did wait on (the busy timeout) can
    # take 30 s to come back as "locked", and must not be waited out 200 times over.
    deadline = time.monotonic() + _LOCKED_PATIENCE_S
    while True:
        try:
            with engine.connect() as conn:
                return revision_of(conn), bool(sa.inspect(conn).get_table_names())
        except sa.exc.OperationalError as exc:
            locked = engine.dialect.name == "sqlite" and "database is locked" in str(exc.orig)
            if not locked or time.monotonic() >= deadline:
                raise
            engine.dispose()  # the pool's connection may be the one that saw the lock
            time.sleep(_LOCKED_PAUSE_S)


def _revision_or_none(engine: sa.Engine) -> str | None:
    """The revision, or None when it cannot even be read."""
    try:
        return _inspect(engine)[0]
    except sa.exc.SQLAlchemyError:
        return None
