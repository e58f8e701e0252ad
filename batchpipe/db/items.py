"""Items: bulk insert, paged reads, counts, retries and the export join.

Everything here scales with the dataset (a million rows is normal), so writes are
``executemany`` of one Core statement per chunk, and reads are keyset-paginated
(``row_index > :last … LIMIT :page``), each page in its own short transaction: memory stays
flat and no cursor or snapshot is held open while the caller works.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from batchpipe.db.base import StoreBase, batch_members, status_values
from batchpipe.db.bulk import BulkStatement, copy_rows, driver_value
from batchpipe.db.duplicates import select_duplicate_keys
from batchpipe.db.history import archive_succeeded
from batchpipe.db.rows import RESULT_FIELDS, ItemRow, JobTotals, PendingItem
from batchpipe.db.schema import attempts, items
from batchpipe.errors import StoreError
from batchpipe.models import TRUNCATED_STOP_REASON, ItemStatus

INSERT_CHUNK = 10_000
INT4_MAX = 2**31 - 1
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# What export_rows yields, in this order.
EXPORT_FIELDS: tuple[str, ...] = (
    "row_index",
    "custom_id",
    "status",
    "response_text",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "error_type",
    "error_message",
    "attempts",
    "batch_id",
    "model",
    "cost_usd",
)
# Rows sent whose cost is unknown: null once sent means an attempt the price table could
# not price (a first claim sets it to 0, see batches._STARTED_COST); never sent, it is null
# and nothing was billed.
UNPRICED = sa.func.count(sa.case((sa.and_(items.c.cost_usd.is_(None), items.c.attempts > 0), 1)))
_ITEM_COLUMNS = [items.c[f] for f in ItemRow.__dataclass_fields__]
# insert_items: one tuple per row in this order, updated_at shared by the whole call.
_INSERT_COLUMNS = ("job_id", "row_index", "row_key", "status", "error_message", "attempts")
_INSERT = BulkStatement(
    sa.insert(items).values(
        {c: sa.bindparam(c) for c in _INSERT_COLUMNS}
        | {"updated_at": sa.bindparam("p_now", type_=items.c.updated_at.type)}
    ),
    _INSERT_COLUMNS,
)
PENDING = ItemStatus.PENDING.value
# A status (enum or its string) to the stored string: a lookup, not ItemStatus(...) per row
# (0.26 s per million items inserted).
_STATUS_VALUES: dict[str, str] = {s.value: s.value for s in ItemStatus}


def _status_value(status: str) -> str:
    """The stored string of a status given as the enum or its string; ValueError if unknown."""
    return _STATUS_VALUES.get(status) or ItemStatus(status).value


def _insert_pending(job_id: int) -> BulkStatement:
    """INSERT of a pending item on SQLite binding only what varies from row to row.

    Rows are ``(row_index, row_key, updated_at)``, the time already in the driver's form;
    the job, status and attempts are literals of the statement. Binding seven values a row,
    four of them the same for every row, cost 0.8 s of SQLite's CPU per million rows
    inserted, a fifth of the insert.
    """
    stmt = (
        sa.insert(items)
        .inline()
        .values(
            job_id=sa.literal_column(str(int(job_id))),
            status=sa.literal_column(f"'{PENDING}'"),
            attempts=sa.literal_column("0"),
            row_index=sa.bindparam("row_index"),
            row_key=sa.bindparam("row_key"),
            updated_at=sa.bindparam("updated_at"),
        )
    )
    return BulkStatement(stmt, ("row_index", "row_key", "updated_at"))


def _copied_items(
    job_id: int, source: Iterable[tuple[Any, ...]], now: datetime
) -> Iterator[tuple[Any, ...]]:
    """insert_items' rows as the COPY of _INSERT_COLUMNS + updated_at takes them."""
    for i, key, status, error in source:
        # row_index is an int4: the binary COPY would wrap what the text form refuses.
        if not 0 <= i <= INT4_MAX:
            raise StoreError(f"row index {i} is out of range (0 to {INT4_MAX})")
        yield job_id, i, key, _status_value(status), error, 0, now


class ItemsMixin(StoreBase):
    """Store methods for the ``items`` table."""

    def insert_items(self, job_id: int, rows: Iterable[tuple[Any, ...]]) -> int:
        """Insert ``(row_index, row_key, status, error_message)`` rows; returns how many.

        The iterable is pulled lazily in chunks of INSERT_CHUNK, each sent as one executemany,
        all inside one transaction: a failure half way (a duplicate row_index, a dead
        connection) leaves no items at all, so ingest can simply run again.
        """
        now = self.clock()
        total = 0
        source = iter(rows)
        # No foreign key checks (SQLite): every item points at this job, and jobs are never
        # deleted.
        with self._write(foreign_keys=False) as conn:
            if self.dialect == "postgresql":
                # Plain tuples straight to a binary COPY: see db/bulk.py.
                shaped = _copied_items(job_id, source, now)
                return copy_rows(conn, items, (*_INSERT_COLUMNS, "updated_at"), shaped)
            pending_stmt = _insert_pending(job_id)
            now_value = driver_value(items.c.updated_at.type, conn.dialect, now)
            while chunk := list(itertools.islice(source, INSERT_CHUNK)):
                pending: list[tuple[Any, ...]] = []
                others: list[tuple[Any, ...]] = []
                for i, key, status, error in chunk:
                    if status == PENDING and error is None:
                        pending.append((i, key, now_value))
                    else:
                        others.append((job_id, i, key, _status_value(status), error, 0))
                total += pending_stmt.execute(conn, pending)
                total += _INSERT.execute(conn, others, {"p_now": now})
        return total

    def find_duplicate_keys(self, job_id: int, limit: int = 20) -> list[tuple[str, list[int]]]:
        """Row keys used by more than one row, each with its first few row indexes."""
        with self._begin() as conn:
            return select_duplicate_keys(conn, items, items.c.job_id == job_id, limit=limit)

    def iter_items(
        self,
        job_id: int,
        *,
        statuses: Collection[ItemStatus] | None = None,
        start: int = 0,
        page: int = 10_000,
    ) -> Iterator[ItemRow]:
        """Items with ``row_index >= start`` in row order, optionally only some statuses."""
        base = sa.select(*_ITEM_COLUMNS).where(items.c.job_id == job_id)
        if statuses is not None:
            base = base.where(items.c.status.in_(status_values(statuses)))
        for row in self._keyset(base, start, page):
            yield ItemRow.from_tuple(row)

    def iter_pending(self, job_id: int, *, page: int = 10_000) -> Iterator[PendingItem]:
        """The job's pending items in row order, as the few fields submit needs.

        Each next ``page`` of row indexes is first counted: when every one of them is a
        pending item never sent and never cut short (all of a new job's rows), the items
        are known without reading them, ``(row_index, 0, None)``. Otherwise the next
        ``page`` pending items are read. Counting a page costs SQLite a fifth of reading it
        (0.15 s against 0.74 s for a million items).
        """
        if page < 1:
            raise ValueError("page must be at least 1")
        key = items.c.row_index
        pending = [items.c.job_id == job_id, items.c.status == ItemStatus.PENDING.value]
        fresh = sa.select(sa.func.count()).where(
            *pending, items.c.attempts == 0, items.c.stop_reason.is_(None)
        )
        read = (
            sa.select(key, items.c.attempts, items.c.stop_reason)
            .where(*pending)
            .order_by(key)
            .limit(page)
        )
        start = 0
        while True:
            end = start + page - 1
            with self._begin() as conn:
                # Row indexes are unique within a job: page of them in the window means all.
                known = conn.execute(fresh.where(key.between(start, end))).scalar_one() == page
                rows = [] if known else _fetch_raw(conn, read.where(key >= start))
            if known:
                yield from (PendingItem(i, 0, None) for i in range(start, end + 1))
                start = end + 1
                continue
            yield from map(PendingItem._make, rows)
            if len(rows) < page:
                return
            start = rows[-1][0] + 1

    def iter_batch_items(
        self,
        batch_id: int,
        *,
        statuses: Collection[ItemStatus] | None = None,
        page: int = 10_000,
    ) -> Iterator[ItemRow]:
        """The items of one batch in row order, optionally only some statuses.

        Read by the batch's row span (:func:`batch_members`), so reading one batch of a big
        job does not scan the job's other rows.
        """
        wanted = None if statuses is None else status_values(statuses)
        with self._begin() as conn:
            members = batch_members(conn, batch_id, wanted)
        base = sa.select(*_ITEM_COLUMNS).where(members)
        for row in self._keyset(base, 0, page):
            yield ItemRow.from_tuple(row)

    def count_items(self, job_id: int) -> dict[ItemStatus, int]:
        """How many items are in each status (every status present, zeros included)."""
        return self._tally(job_id, ())[0]

    def count_pending(self, job_id: int) -> int:
        """How many items wait to be sent: half the cost of :meth:`count_items` (no grouping),
        for submit, which asks on every poll."""
        stmt = sa.select(sa.func.count()).where(
            items.c.job_id == job_id, items.c.status == ItemStatus.PENDING.value
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def count_items_and_usage(
        self, job_id: int
    ) -> tuple[dict[ItemStatus, int], dict[str, int], float | None]:
        """:meth:`count_items`, the token sums (input, output, both cache kinds) and the
        dollars paid (:meth:`cost_total`'s, or None when a row's cost is unknown:
        :data:`UNPRICED`) in one scan: the end of a job logs them and ``run`` shows the
        counts and cost. Each walk over a million items costs SQLite 0.2-0.5 s; the sums add
        a third of that to one walk."""
        return self._tally(job_id, TOKEN_FIELDS, cost=True)

    def _tally(
        self, job_id: int, sums: tuple[str, ...], *, cost: bool = False
    ) -> tuple[dict[ItemStatus, int], dict[str, int], float | None]:
        """Items per status (zeros included), the totals of the columns ``sums``, and with
        ``cost`` the sum of ``cost_usd``, None if any row's is unknown (else 0.0)."""
        paid: tuple[sa.ColumnElement[Any], ...] = ()
        if cost:
            paid = (sa.func.coalesce(sa.func.sum(items.c.cost_usd), 0.0), UNPRICED)
        stmt = (
            sa.select(
                items.c.status,
                sa.func.count(),
                *(sa.func.coalesce(sa.func.sum(items.c[f]), 0) for f in sums),
                *paid,
            )
            .where(items.c.job_id == job_id)
            .group_by(items.c.status)
        )
        counts = dict.fromkeys(ItemStatus, 0)
        totals = dict.fromkeys(sums, 0)
        dollars = 0.0
        unknown = 0
        with self._begin() as conn:
            for status, count, *values in conn.execute(stmt):
                counts[ItemStatus(status)] = int(count)
                for field, n in zip(sums, values[: len(sums)], strict=True):
                    totals[field] += int(n)
                if cost:
                    dollars += float(values[-2])
                    unknown += int(values[-1])
        return counts, totals, None if unknown else dollars

    def job_totals(self, job_id: int) -> JobTotals:
        """Tokens, cost and truncated answers over the job's items, in one scan.

        ``status`` and the end of ``run`` show all of them: one pass over a million items
        instead of three (0.15 s of SQLite CPU each).
        """
        stmt = sa.select(
            *(sa.func.coalesce(sa.func.sum(items.c[f]), 0) for f in TOKEN_FIELDS),
            sa.func.coalesce(sa.func.sum(items.c.cost_usd), 0.0),
            sa.func.count(items.c.cost_usd),
            sa.func.count(sa.case((items.c.stop_reason == TRUNCATED_STOP_REASON, 1))),
            UNPRICED,
        ).where(items.c.job_id == job_id)
        with self._begin() as conn:
            *tokens, cost, priced, truncated, unpriced = conn.execute(stmt).one()
        usage = {f: int(n) for f, n in zip(TOKEN_FIELDS, tokens, strict=True)}
        return JobTotals(usage, float(cost), int(priced), int(truncated), int(unpriced))

    def requeue_items(
        self,
        job_id: int,
        *,
        statuses: Collection[ItemStatus],
        error_types: Collection[str] | None = None,
    ) -> int:
        """Put final items back to pending for another try (``batchpipe retry``).

        Only final statuses other than ``invalid`` qualify: requeueing a submitted item would
        orphan its in-flight request, and invalid rows are never sent. Result fields are
        cleared; attempts are kept, so the next attempt gets a custom_id never used before
        (a stale line of an old batch can then never match it) and its history row never
        collides with an earlier one. Returns the count requeued.
        """
        wanted = {ItemStatus(s) for s in statuses}
        refused = {s for s in wanted if not s.is_terminal() or s is ItemStatus.INVALID}
        if refused:
            raise ValueError(f"cannot requeue items that are {', '.join(sorted(refused))}")
        values: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
        values.update(
            status=ItemStatus.PENDING.value, custom_id=None, batch_id=None, updated_at=self.clock()
        )
        stmt = (
            sa.update(items)
            .where(items.c.job_id == job_id, items.c.status.in_(status_values(wanted)))
            .values(values)
        )
        if error_types is not None:
            stmt = stmt.where(items.c.error_type.in_(list(error_types)))
        with self._write() as conn:
            if ItemStatus.SUCCEEDED in wanted and error_types is None:
                # Their answers are about to be cleared: keep them in the history.
                archive = archive_succeeded(self.dialect, items.c.job_id == job_id)
                conn.execute(archive, {"p_now": values["updated_at"]})
            return int(conn.execute(stmt).rowcount)

    def cancel_pending(self, job_id: int) -> int:
        """The job is being canceled: its pending items become canceled (never sent).

        Submitted items are left alone; their batch's results say how each one ended.
        """
        stmt = (
            sa.update(items)
            .where(items.c.job_id == job_id, items.c.status == ItemStatus.PENDING.value)
            .values(status=ItemStatus.CANCELED.value, updated_at=self.clock())
        )
        with self._write() as conn:
            return int(conn.execute(stmt).rowcount)

    def delete_items(self, job_id: int) -> int:
        """Remove every item (and attempt) of a job, e.g. after ingest found duplicate keys.

        Refuses while any item is in a batch: those rows are the record of what was sent.
        """
        with self._write() as conn:
            sent = conn.execute(
                sa.select(sa.func.count())
                .select_from(items)
                .where(items.c.job_id == job_id, items.c.batch_id.is_not(None))
            ).scalar_one()
            if sent:
                raise StoreError(f"job {job_id}: {sent} items were already submitted; not deleting")
            conn.execute(sa.delete(attempts).where(attempts.c.job_id == job_id))
            return int(conn.execute(sa.delete(items).where(items.c.job_id == job_id)).rowcount)

    def export_rows(self, job_id: int, *, page: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """The output's item columns, in row order, as tuples of :data:`EXPORT_FIELDS`.

        ``status`` is the stored string; ``batch_id`` is our id of the item's last batch
        (None while pending or never sent): ``list_batches`` has its API id. A join to
        ``batches`` here cost 0.3 s of SQLite CPU per million rows for a handful of batches.
        """
        for rows in self.export_pages(job_id, page=page):
            yield from rows

    def export_pages(self, job_id: int, *, page: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        """:meth:`export_rows` a page (a list of up to ``page`` tuples, none empty) at a time,
        for a caller that works on whole pages."""
        base = sa.select(*(items.c[f] for f in EXPORT_FIELDS)).where(items.c.job_id == job_id)
        return self._keyset_pages(base, 0, page)

    def _keyset(self, base: sa.Select[Any], start: int, page: int) -> Iterator[tuple[Any, ...]]:
        """Page through ``base`` by ``items.row_index`` (which it must select).

        Rows come back as the driver's plain tuples: SQLAlchemy's Row objects and result
        processing cost ~10 µs a row, the largest part of reading a million items (every
        selected column here is a plain int, float or string on every dialect). Each page's
        statement is compiled with its values inline (ints and our own status strings,
        quoted by SQLAlchemy), so it runs on the raw cursor of the transaction's connection.
        """
        for rows in self._keyset_pages(base, start, page):
            yield from rows

    def _keyset_pages(
        self, base: sa.Select[Any], start: int, page: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        """:meth:`_keyset` a page at a time (a list of up to ``page`` tuples)."""
        if page < 1:
            raise ValueError("page must be at least 1")
        key = items.c.row_index
        at = next(i for i, c in enumerate(base.selected_columns) if c is key)
        stmt = base.order_by(key).limit(page)
        where = key >= start
        while True:
            with self._begin() as conn:
                rows = _fetch_raw(conn, stmt.where(where))
            if rows:
                yield rows
            if len(rows) < page:
                return
            where = key > rows[-1][at]


def _fetch_raw(conn: sa.Connection, stmt: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """All rows of ``stmt`` (no parameters left) as the driver returns them."""
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()
