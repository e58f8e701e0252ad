"""Spend, truncation and breakdowns of a job's items; re-queueing the rows whose request changed.

The read side of cost control and reports (`status`, `report`, the budget guard): a few
aggregate queries, each one short transaction. The write side of "re-run what changed":
re-queues by row index, in chunks, all in one transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from batchpipe.db.base import StoreBase, status_values
from batchpipe.db.bulk import BulkStatement
from batchpipe.db.history import ARCHIVE_ROWS
from batchpipe.db.rows import RESULT_FIELDS
from batchpipe.db.schema import batches, items, jobs
from batchpipe.models import BatchStatus, ItemStatus, JobStatus

_CHUNK = 5_000


class LedgerMixin(StoreBase):
    """Store methods for costs, truncation, breakdowns and changed-request re-queues."""

    def cost_total(self, job_id: int) -> tuple[float, int]:
        """``(dollars paid so far, rows with a price)`` over the job's items.

        The budget guard's check before each batch: only the cost. ``job_totals`` sums it
        with the tokens and truncated answers where all are shown.
        """
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(items.c.cost_usd), 0.0), sa.func.count(items.c.cost_usd)
        ).where(items.c.job_id == job_id)
        with self._begin() as conn:
            total, priced = conn.execute(stmt).one()
        return float(total), int(priced)

    def unsettled_batches(self, job_id: int) -> tuple[int, int]:
        """``(requests, request bytes)`` in batches sent but not yet collected."""
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(batches.c.request_count), 0),
            sa.func.coalesce(sa.func.sum(batches.c.request_bytes), 0),
        ).where(
            batches.c.job_id == job_id, batches.c.status.in_(status_values(BatchStatus.unsettled()))
        )
        with self._begin() as conn:
            count, nbytes = conn.execute(stmt).one()
        return int(count), int(nbytes)

    def status_breakdown(self, job_id: int) -> list[tuple[str, str | None, int]]:
        """``(status, error_type, rows)`` for every combination present, largest first."""
        stmt = (
            sa.select(items.c.status, items.c.error_type, sa.func.count().label("n"))
            .where(items.c.job_id == job_id)
            .group_by(items.c.status, items.c.error_type)
            .order_by(sa.desc("n"), items.c.status)
        )
        with self._begin() as conn:
            return [(s, e, int(n)) for s, e, n in conn.execute(stmt)]

    def attempts_histogram(self, job_id: int) -> dict[int, int]:
        """How many rows took 0, 1, 2 … attempts."""
        stmt = (
            sa.select(items.c.attempts, sa.func.count())
            .where(items.c.job_id == job_id)
            .group_by(items.c.attempts)
            .order_by(items.c.attempts)
        )
        with self._begin() as conn:
            return {int(a): int(n) for a, n in conn.execute(stmt)}

    def rerun_items(
        self,
        job_id: int,
        rows: Iterable[tuple[int, bool, str | None]],
        *,
        spec: Mapping[str, Any],
    ) -> tuple[int, int, int]:
        """Adopt a re-run's settings in one transaction; returns ``(changed, unchanged,
        invalid)``.

        ``rows`` yields ``(row_index, changed?, problem)`` for every row of the job. Changed
        rows (invalid ones among them: never sent, they render now) go back to pending with
        their results cleared; a row with a ``problem`` (the new settings cannot render it)
        becomes ``invalid`` with that message, its results cleared; unchanged ones are only
        counted. Then the job takes ``spec`` and its count of invalid rows, and, if any row
        changed, the status ``running`` (with its error and ``exported_at`` cleared: the
        output no longer holds every answer).

        All of it commits together or not at all: if ``rows`` raises half way (a row that
        does not render) or the process dies, no answer is lost, no invalid row is queued
        and the job keeps its old settings, so the same command can simply be run again.
        ``rows`` is pulled lazily in chunks, so memory does not grow with the job. Attempts
        keep counting (custom_ids must never repeat) and ``cost_usd`` keeps what was already
        paid. Rows in flight are left alone.
        """
        now = self.clock()
        source = iter(rows)
        changed = unchanged = invalid = marked = 0
        with self._write() as conn:
            shared = {"p_job": job_id, "p_now": now}
            while chunk := list(itertools.islice(source, _CHUNK)):
                requeue = [(row,) for row, differs, problem in chunk if differs and not problem]
                refused = [(row, problem) for row, _, problem in chunk if problem is not None]
                unchanged += len(chunk) - len(requeue) - len(refused)
                invalid += len(refused)
                # A succeeded answer about to be cleared goes into the history first.
                archive = requeue + [(row,) for row, _ in refused]
                ARCHIVE_ROWS[self.dialect].execute(conn, archive, shared)
                # Counted by what the statement changed: a row in flight that was passed
                # in as changed is left alone and not counted.
                changed += _REQUEUE.execute(conn, requeue, shared)
                if refused:
                    # Counts only rows whose state this changes (not an invalid row that
                    # keeps its message): the output must then be written again.
                    marked += _MARK_INVALID.execute(conn, refused, shared)
            # Every row's request is now what ``spec`` renders (or is sent again with it).
            values: dict[str, Any] = {
                "spec": dict(spec),
                "request_spec": None,
                "invalid_count": invalid,
                "updated_at": now,
            }
            if changed or marked:
                values.update(status=JobStatus.RUNNING.value, error=None, exported_at=None)
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(values))
        return changed, unchanged, invalid


def _reset_statement(status: ItemStatus, *extra: Any, **values: Any) -> sa.Update:
    """UPDATE of one row of a re-run (never one in flight) to ``status``: results cleared,
    out of any batch, ``values`` set, where ``extra`` holds too."""
    reset: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    reset.update(
        status=status.value,
        custom_id=None,
        batch_id=None,
        updated_at=sa.bindparam("p_now", type_=items.c.updated_at.type),
        **values,
    )
    return (
        sa.update(items)
        .where(
            items.c.job_id == sa.bindparam("p_job"),
            items.c.row_index == sa.bindparam("p_row"),
            items.c.status != ItemStatus.SUBMITTED.value,
            *extra,
        )
        .values(reset)
    )


def _requeue_statement() -> sa.Update:
    """UPDATE for one changed row of a re-run: pending again (an invalid row too: the
    re-run found that it renders now)."""
    return _reset_statement(ItemStatus.PENDING)


def _mark_invalid_statement() -> sa.Update:
    """UPDATE for a row a re-run's settings cannot render: invalid with their message (never
    sent as they stand); only where that changes the row."""
    message = sa.bindparam("p_message", type_=items.c.error_message.type)
    changes = sa.or_(
        items.c.status != ItemStatus.INVALID.value,
        items.c.error_message.is_distinct_from(message),
    )
    return _reset_statement(ItemStatus.INVALID, changes, error_message=message)


# Driver-level executemany of (row_index,) tuples, as the pipeline's other bulk writes
# (db/bulk.py); p_job and p_now are shared by the whole call.
_REQUEUE = BulkStatement(_requeue_statement(), ("p_row",))
_MARK_INVALID = BulkStatement(_mark_invalid_statement(), ("p_row", "p_message"))
