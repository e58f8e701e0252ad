"""Spend, truncation and breakdowns of a job's items; re-queueing the rows whose request changed.

The read side of cost control and reports (`status`, `report`, the budget guard): a few
aggregate queries, each one short transaction. The write side of "re-run what changed":
bulk request-hash updates and re-queues, in chunks, by row index.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from batchpipe.db.base import StoreBase, status_values
from batchpipe.db.rows import RESULT_FIELDS
from batchpipe.db.schema import batches, items
from batchpipe.models import BatchStatus, ItemStatus

_CHUNK = 5_000
# Batches whose requests may still be billed: sent (or maybe sent) and not yet collected.
_UNSETTLED = (
    BatchStatus.PLANNED,
    BatchStatus.IN_PROGRESS,
    BatchStatus.CANCELING,
    BatchStatus.ENDED,
)


class LedgerMixin(StoreBase):
    """Store methods for costs, truncation, breakdowns and changed-request re-queues."""

    def cost_total(self, job_id: int) -> tuple[float, int]:
        """``(dollars paid so far, rows with a price)`` over the job's items."""
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(items.c.cost_usd), 0.0), sa.func.count(items.c.cost_usd)
        ).where(items.c.job_id == job_id)
        with self._begin() as conn:
            total, priced = conn.execute(stmt).one()
        return float(total), int(priced)

    def count_truncated(self, job_id: int) -> int:
        """Items whose latest answer stopped at max_tokens."""
        stmt = (
            sa.select(sa.func.count())
            .select_from(items)
            .where(items.c.job_id == job_id, items.c.stop_reason == "max_tokens")
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def unsettled_batches(self, job_id: int) -> tuple[int, int]:
        """``(requests, request bytes)`` in batches sent but not yet collected."""
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(batches.c.request_count), 0),
            sa.func.coalesce(sa.func.sum(batches.c.request_bytes), 0),
        ).where(batches.c.job_id == job_id, batches.c.status.in_(status_values(_UNSETTLED)))
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

    def requeue_changed(self, job_id: int, rows: Iterable[tuple[int, str]]) -> int:
        """Send ``(row_index, new request hash)`` rows again: pending, results cleared.

        Attempts keep counting (custom_ids must never repeat) and ``cost_usd`` keeps what was
        already paid. Rows in flight or invalid are left alone. Returns how many changed.
        """
        values: dict[str, Any] = {f: None for f in RESULT_FIELDS}
        values.update(
            status=ItemStatus.PENDING.value,
            custom_id=None,
            batch_id=None,
            request_hash=sa.bindparam("p_hash"),
            updated_at=sa.bindparam("p_now", type_=items.c.updated_at.type),
        )
        stmt = (
            sa.update(items)
            .where(
                items.c.job_id == sa.bindparam("p_job"),
                items.c.row_index == sa.bindparam("p_row"),
                # Two inequalities, not NOT IN: executemany cannot expand a list parameter.
                items.c.status != ItemStatus.SUBMITTED.value,
                items.c.status != ItemStatus.INVALID.value,
            )
            .values(values)
        )
        return self._executemany(stmt, job_id, rows)

    def set_request_hashes(self, job_id: int, rows: Iterable[tuple[int, str]]) -> int:
        """Record ``(row_index, request hash)`` for rows whose request did not change."""
        stmt = (
            sa.update(items)
            .where(
                items.c.job_id == sa.bindparam("p_job"),
                items.c.row_index == sa.bindparam("p_row"),
            )
            .values(request_hash=sa.bindparam("p_hash"))
        )
        return self._executemany(stmt, job_id, rows)

    def _executemany(self, stmt: sa.Update, job_id: int, rows: Iterable[tuple[int, str]]) -> int:
        now = self.clock()
        source = iter(rows)
        total = 0
        with self._begin() as conn:
            while chunk := list(itertools.islice(source, _CHUNK)):
                params = [
                    {"p_job": job_id, "p_row": r, "p_hash": h, "p_now": now} for r, h in chunk
                ]
                total += int(conn.execute(stmt, params).rowcount)
        return total
