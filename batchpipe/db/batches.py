"""Batches: the submit intent, the API's confirmation, results applied to items.

The intent is written before the API is called (``plan_batch``), so a crash between create
and store leaves a ``planned`` batch to recover instead of a double submission. Applying
results is idempotent: an item changes only while it is ``submitted`` under that exact
custom_id, and the attempts history (every attempt but a final success: ``history.py``) is
keyed by (job, row, attempt) with ON CONFLICT DO NOTHING, so re-reading a results file
changes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from batchpipe.db.base import StoreBase, batch_members, status_values
from batchpipe.db.bulk import BulkStatement, driver_value
from batchpipe.db.pg_apply import apply_by_copy
from batchpipe.db.rows import RESULT_FIELDS, BatchRow
from batchpipe.db.schema import attempts, batches
from batchpipe.db.schema import items as item_table
from batchpipe.errors import StoreError
from batchpipe.models import BatchStatus, ItemStatus, PlainSuccess, ResultRecord

SUBMITTED = ItemStatus.SUBMITTED.value
PENDING = ItemStatus.PENDING.value
SUCCEEDED = ItemStatus.SUCCEEDED.value

# Bound parameter names are prefixed so they never clash with the columns being SET
# (SQLAlchemy reserves a column's own name for its SET value in executemany).
_ITEM_KEY = sa.and_(
    item_table.c.job_id == sa.bindparam("p_job_id"),
    item_table.c.row_index == sa.bindparam("p_row_index"),
)

# An item's cost_usd is the sum of its attempts' prices, and null once one of them could
# not be priced (an unknown model): unknown, never a partial sum that reads as the whole.
# So "nothing billed yet" must not be null too: an item's first claim sets it to 0 (a row
# never sent keeps null, as it exports). Later claims leave it as the attempts made it.
_STARTED_COST = sa.case(
    (item_table.c.attempts == 0, sa.literal_column("0.0")), else_=item_table.c.cost_usd
)


def _added_cost(cost: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The item's cost after an attempt priced ``cost`` (bound per line): SQL's null
    arithmetic does the rest, as an unpriced attempt (null) makes the sum null for good and
    a free one adds 0. An item at its first attempt counts from 0 even when null: one an
    older batchpipe claimed before the claim started its cost (an upgrade with a batch out).
    """
    before = sa.case(
        (item_table.c.attempts <= 1, sa.func.coalesce(item_table.c.cost_usd, 0.0)),
        else_=item_table.c.cost_usd,
    )
    return before + cost


# plan_batch: claim pending items for a new batch.
_CLAIM = (
    sa.update(item_table)
    .where(_ITEM_KEY, item_table.c.status == PENDING)
    .values(
        status=SUBMITTED,
        custom_id=sa.bindparam("p_custom_id"),
        attempts=sa.bindparam("p_attempt"),
        batch_id=sa.bindparam("p_batch_id"),
        cost_usd=_STARTED_COST,
        updated_at=sa.bindparam("p_now", type_=item_table.c.updated_at.type),
    )
)


def _apply_statement(*, transient: bool) -> sa.Update:
    """UPDATE for one result line; a transient failure also leaves its batch (pending again)."""
    values: dict[str, Any] = {
        f: sa.bindparam(f"p_{f}", type_=item_table.c[f].type) for f in RESULT_FIELDS
    }
    values["status"] = sa.bindparam("p_status")
    # Each attempt's price adds to what the row has cost; an unpriced one (null) makes it
    # unknown. An explicit CAST: PostgreSQL must know the parameter's type.
    values["cost_usd"] = _added_cost(
        sa.cast(sa.bindparam("p_cost_usd"), item_table.c.cost_usd.type)
    )
    values["updated_at"] = sa.bindparam("p_now", type_=item_table.c.updated_at.type)
    if transient:
        values["batch_id"] = None
    return (
        sa.update(item_table)
        .where(
            _ITEM_KEY,
            item_table.c.custom_id == sa.bindparam("p_custom_id"),
            item_table.c.status == SUBMITTED,
        )
        .values(values)
    )


_APPLY_FINAL = _apply_statement(transient=False)
_APPLY_TRANSIENT = _apply_statement(transient=True)

# The hot statements as driver-level executemany of tuples (see db/bulk.py): the
# SQLAlchemy path spent more time building and processing parameters than SQLite writing.
_CLAIM_ROW = ("p_row_index", "p_custom_id", "p_attempt")
_BULK_CLAIM = BulkStatement(_CLAIM, _CLAIM_ROW)
_APPLY_ROW = ("p_row_index", "p_custom_id", "p_status", *(f"p_{f}" for f in RESULT_FIELDS))
_APPLY_ROW += ("p_cost_usd",)
_result_values = operator.attrgetter(*RESULT_FIELDS)
_BULK_APPLY_FINAL = BulkStatement(_APPLY_FINAL, _APPLY_ROW)
_BULK_APPLY_TRANSIENT = BulkStatement(_APPLY_TRANSIENT, _APPLY_ROW)


def _succeeded_statement() -> BulkStatement:
    """SQLite's UPDATE for the commonest line, a success that is kept.

    Only what varies is bound, in the order of :data:`_SUCCEEDED_ROW`, so apply_results'
    tuple goes to the driver as it is: the general statement bound 16 values a line, four
    of them the same for every line, through a reshaped copy of each tuple. The status and
    the cleared error are literals; the cost is added as in the general statement (an
    unpriced answer, of an unknown model, makes it null), with one parameter.
    """
    cost = sa.bindparam("p_cost_usd", type_=item_table.c.cost_usd.type)
    values: list[tuple[sa.Column[Any], Any]] = [
        (item_table.c.status, sa.literal_column(f"'{ItemStatus.SUCCEEDED.value}'")),
        *((item_table.c[f], sa.bindparam(f"p_{f}")) for f in _KEPT_FIELDS),
        (item_table.c.error_type, sa.null()),
        (item_table.c.error_message, sa.null()),
        (item_table.c.cost_usd, _added_cost(cost)),
        (item_table.c.updated_at, sa.bindparam("p_now")),
    ]
    stmt = (
        sa.update(item_table)
        .where(
            _ITEM_KEY,
            item_table.c.custom_id == sa.bindparam("p_custom_id"),
            item_table.c.status == sa.literal_column(f"'{SUBMITTED}'"),
        )
        .ordered_values(*values)
    )
    return BulkStatement(stmt, _SUCCEEDED_ROW)


# A kept success writes these result fields (the error ones are cleared).
_KEPT_FIELDS = tuple(f for f in RESULT_FIELDS if not f.startswith("error_"))
_kept_values = operator.attrgetter(*_KEPT_FIELDS)
_SUCCEEDED_ROW = (
    *(f"p_{f}" for f in _KEPT_FIELDS), "p_cost_usd", "p_now", "p_job_id", "p_row_index",
    "p_custom_id",
)  # fmt: skip
_BULK_APPLY_SUCCEEDED = _succeeded_statement()
_HISTORY_ROW = (
    "row_index", "attempt", "custom_id", "result_type", "error_type", "error_message",
    "input_tokens", "output_tokens",
)  # fmt: skip
_HISTORY_VALUES = {c: sa.bindparam(c) for c in (*_HISTORY_ROW, "job_id", "batch_id")} | {
    "recorded_at": sa.bindparam("p_now", type_=attempts.c.recorded_at.type)
}
_HISTORY_KEYS = [attempts.c.job_id, attempts.c.row_index, attempts.c.attempt]
_BULK_HISTORY = {
    "postgresql": BulkStatement(
        postgresql.insert(attempts)
        .values(_HISTORY_VALUES)
        .on_conflict_do_nothing(index_elements=_HISTORY_KEYS),
        _HISTORY_ROW,
    ),
    "sqlite": BulkStatement(
        sqlite.insert(attempts)
        .values(_HISTORY_VALUES)
        .on_conflict_do_nothing(index_elements=_HISTORY_KEYS),
        _HISTORY_ROW,
    ),
}


def _claim_range(
    conn: sa.Connection,
    job_id: int,
    batch_id: int,
    items: Sequence[tuple[int, str, int]],
    now: datetime,
) -> int | None:
    """Claim ``items`` with one UPDATE over their row range, when that is exactly them.

    A first round's batch is a run of consecutive pending rows, so one statement can claim
    it (the custom_id computed in SQL) instead of one UPDATE per row: per-row claims were
    the single largest cost of submitting a million rows on SQLite (1.9 of 5.6 CPU seconds
    of submit at 100,000 rows). Applies only when every custom_id is ours
    (``{prefix}-{row}-{attempt}``, attempt = stored attempts + 1) and the range holds no
    other pending row; returns None to fall back to per-row claims otherwise. The rows
    claimed are read back and compared with ``items`` (unless they are the whole range at
    one attempt, where the UPDATE's row count is proof): a concurrent change raises
    StoreError (and the transaction rolls back) rather than claim a different set.
    """
    first_row, first_id, first_attempt = items[0]
    suffix = f"-{first_row}-{first_attempt}"
    if not first_id.endswith(suffix):
        return None
    prefix = first_id[: -len(suffix)]
    rows = [row for row, _, _ in items]
    if rows != sorted(rows) or any(
        cid != f"{prefix}-{row}-{attempt}" for row, cid, attempt in items
    ):
        return None
    in_range = sa.and_(
        item_table.c.job_id == job_id,
        item_table.c.row_index.between(rows[0], rows[-1]),
        item_table.c.status == PENDING,
    )
    next_attempt = item_table.c.attempts + 1
    claim = (
        sa.update(item_table)
        .where(in_range)
        .values(
            status=SUBMITTED,
            custom_id=prefix
            + "-"
            + sa.cast(item_table.c.row_index, sa.String)
            + "-"
            + sa.cast(next_attempt, sa.String),
            attempts=next_attempt,
            batch_id=batch_id,
            cost_usd=_STARTED_COST,
            updated_at=now,
        )
    )
    attempts_planned = {attempt for _, _, attempt in items}
    if rows == list(range(rows[0], rows[0] + len(rows))) and len(attempts_planned) == 1:
        # Every row of the range, all at one attempt (a first round): the UPDATE's own
        # count proves the claim, no count before it and no read-back (1 s of CPU at 1M rows).
        count = conn.execute(
            claim.where(item_table.c.attempts == attempts_planned.pop() - 1)
        ).rowcount
        if count != len(items):
            raise StoreError(
                f"job {job_id}: only {count} of {len(items)} items were pending when "
                "planning a batch; another process may be submitting this job"
            )
        return count
    pending = conn.execute(sa.select(sa.func.count()).where(in_range)).scalar_one()
    if pending != len(items):
        return None
    conn.execute(claim)
    claimed = conn.execute(
        sa.select(item_table.c.row_index, item_table.c.attempts)
        .where(batch_members(conn, batch_id))
        .order_by(item_table.c.row_index)
    ).all()
    expected = [(row, attempt) for row, _, attempt in items]
    if len(claimed) != len(expected) or any(
        tuple(got) != want for got, want in zip(claimed, expected, strict=True)
    ):
        # Raising inside the caller's transaction rolls the claim back.
        raise StoreError(
            f"job {job_id}: the rows claimed for a batch are not the {len(items)} planned; "
            "another process may be submitting this job"
        )
    return len(items)


# Batches whose results came back (or were lost to archiving): any later send is a later round.
_ENDED = status_values({BatchStatus.ENDED, BatchStatus.COLLECTED, BatchStatus.ARCHIVED})


class BatchesMixin(StoreBase):
    """Store methods for the ``batches`` table and the result paths into ``items``."""

    def plan_batch(
        self,
        job_id: int,
        *,
        round: int,
        items: Sequence[tuple[int, str, int]],
        request_bytes: int,
    ) -> BatchRow:
        """Record the intent to submit ``items`` (``(row_index, custom_id, attempt)``).

        One transaction: a ``planned`` batch, and every item moved pending → submitted with
        its new custom_id and attempt. If any item was not pending the whole intent is rolled
        back and StoreError raised, so no item can end up in two batches.

        ``round`` (the items' highest attempt) is a floor: the batch's round is also later
        than that of every batch of the job that has ended, so rounds never go backwards in
        ``status``. A retry sends rows whose attempts may be below those another retry took
        further (round 4 after round 6); batches sent together still share a round.
        """
        if not items:
            raise ValueError("plan_batch needs at least one item")
        now = self.clock()
        batch = {
            "job_id": job_id,
            "status": BatchStatus.PLANNED.value,
            "round": round,
            "request_count": len(items),
            "request_bytes": request_bytes,
            "first_custom_id": items[0][1],
            "last_custom_id": items[-1][1],
            "first_row": min(row for row, _, _ in items),
            "last_row": max(row for row, _, _ in items),
            "intent_at": now,
        }
        # No foreign key checks: the batch points at its job, the claims at that batch.
        with self._write(foreign_keys=False) as conn:
            ended = conn.execute(
                sa.select(sa.func.max(batches.c.round)).where(
                    batches.c.job_id == job_id, batches.c.status.in_(_ENDED)
                )
            ).scalar_one()
            batch["round"] = max(round, (ended or 0) + 1)
            batch_id = conn.execute(
                sa.insert(batches).values(batch).returning(batches.c.id)
            ).scalar_one()
            shared = {"p_job_id": job_id, "p_batch_id": batch_id, "p_now": now}
            claimed = _claim_range(conn, job_id, batch_id, items, now)
            if claimed is None:
                claimed = _BULK_CLAIM.execute(conn, list(items), shared)
            if claimed != len(items):
                # Raising inside the block rolls back the batch row and every claim.
                raise StoreError(
                    f"job {job_id}: only {claimed} of {len(items)} items were pending when "
                    "planning a batch; another process may be submitting this job"
                )
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).one()
        return BatchRow.from_row(row)

    def mark_batch_created(
        self, batch_id: int, *, api_batch_id: str, created_at: datetime, expires_at: datetime
    ) -> bool:
        """The API accepted the batch: store its id; planned → in_progress (compare-and-set)."""
        try:
            return self._cas_update(
                batches,
                batch_id,
                BatchStatus.PLANNED,
                {
                    "api_batch_id": api_batch_id,
                    "created_at": created_at,
                    "expires_at": expires_at,
                    "status": BatchStatus.IN_PROGRESS,
                },
                touch=False,
            )
        except sa.exc.IntegrityError:
            raise StoreError(
                f"batch {batch_id}: API batch {api_batch_id} is already recorded for another "
                "batch; refusing to adopt it twice"
            ) from None

    def update_batch(
        self,
        batch_id: int,
        *,
        expected_status: BatchStatus | Collection[BatchStatus] | None = None,
        **fields: Any,
    ) -> bool:
        """Set ``fields``; compare-and-set on status when ``expected_status`` is given."""
        return self._cas_update(batches, batch_id, expected_status, fields, touch=False)

    def get_batch(self, batch_id: int) -> BatchRow | None:
        """One batch by its (local) id."""
        with self._begin() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
        return None if row is None else BatchRow.from_row(row)

    def list_batches(
        self, job_id: int, statuses: Collection[BatchStatus] | None = None
    ) -> list[BatchRow]:
        """The job's batches in id order, optionally only those in ``statuses``."""
        stmt = sa.select(batches).where(batches.c.job_id == job_id).order_by(batches.c.id)
        if statuses is not None:
            stmt = stmt.where(batches.c.status.in_(status_values(statuses)))
        with self._begin() as conn:
            return [BatchRow.from_row(r) for r in conn.execute(stmt)]

    def known_api_batch_ids(self) -> set[str]:
        """Every API batch id already stored, across jobs (so no orphan is adopted twice)."""
        stmt = sa.select(batches.c.api_batch_id).where(batches.c.api_batch_id.is_not(None))
        with self._begin() as conn:
            return set(conn.execute(stmt).scalars())

    def release_batch_items(self, batch_id: int) -> int:
        """The API refused the create: return the batch's items to pending; batch → rejected.

        Undoes plan_batch (attempts - 1, custom_id and batch_id cleared) in one transaction.
        Only a ``planned`` batch can be rejected; anything else raises StoreError.
        """
        now = self.clock()
        with self._write() as conn:
            rejected = conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.status == BatchStatus.PLANNED.value)
                .values(status=BatchStatus.REJECTED.value)
            ).rowcount
            if rejected != 1:
                raise StoreError(f"batch {batch_id} is not planned; cannot mark it rejected")
            released = conn.execute(
                sa.update(item_table)
                .where(batch_members(conn, batch_id, [SUBMITTED]))
                .values(
                    status=PENDING,
                    attempts=sa.func.max(item_table.c.attempts - 1, 0)
                    if self.dialect == "sqlite"
                    else sa.func.greatest(item_table.c.attempts - 1, 0),
                    custom_id=None,
                    batch_id=None,
                    updated_at=now,
                )
            ).rowcount
        return int(released)

    def requeue_batch_leftovers(self, batch_id: int) -> int:
        """Items still submitted in a collected batch (its results omitted them) → pending.

        The attempt counts as used, so attempts stays; the next submission gets a new id.
        """
        with self._write() as conn:
            stmt = (
                sa.update(item_table)
                .where(batch_members(conn, batch_id, [SUBMITTED]))
                .values(status=PENDING, batch_id=None, updated_at=self.clock())
            )
            return int(conn.execute(stmt).rowcount)

    def apply_results(
        self,
        job_id: int,
        batch_id: int,
        updates: Sequence[ResultRecord],
        successes: Sequence[PlainSuccess] = (),
    ) -> int:
        """Apply result lines of one batch; return how many items changed.

        ``updates`` are records as collect completed them; ``successes`` are kept successes
        in :data:`~batchpipe.models.PlainSuccess` form (the commonest line, read
        without a record). Idempotent: an item changes only while submitted under the line's
        custom_id, and the attempts history ignores (job, row, attempt) it already has. A
        transient failure arrives with status pending (the pipeline decided): attempts are
        kept and the item leaves the batch so it can be planned again.
        """
        if not updates and not successes:
            return 0
        now = self.clock()
        on_postgres = self.dialect == "postgresql"
        now_value = driver_value(item_table.c.updated_at.type, self._engine.dialect, now)
        kept: list[tuple[Any, ...]] = []  # SQLite: successes, in _SUCCEEDED_ROW order
        final: list[tuple[Any, ...]] = []
        transient: list[tuple[Any, ...]] = []
        history: list[tuple[Any, ...]] = []
        copied: list[tuple[Any, ...]] = []  # PostgreSQL: one tuple of pg_apply.COLUMNS each
        # A custom_id given more than once counts once: the successes first, then the records
        # in their order (as on PostgreSQL). The statements below run one kind of line after
        # another, not in file order, so repeats must go before them.
        seen: set[str] = set()
        if on_postgres:
            for row_index, custom_id, attempt, *kept_values, cost in successes:
                if custom_id in seen:
                    continue
                seen.add(custom_id)
                # pg_apply.COLUMNS: no error, stays in its batch, the result type succeeded.
                row = (row_index, custom_id, SUCCEEDED, *kept_values, None, None, cost, False)
                copied.append((*row, attempt, SUCCEEDED))
        else:
            # _SUCCEEDED_ROW is PlainSuccess from its response_text on, then the key: one
            # slice and one concatenation a line, not an unpacking into a list and a new
            # tuple (1,241 -> 1,009 ns a line over 100,000 emulator answers; unpacking the
            # slice, as RUF005 would have it, 1,103).
            remember, keep = seen.add, kept.append
            for success in successes:
                custom_id = success[1]
                if custom_id in seen:
                    continue
                remember(custom_id)
                keep(success[3:] + (now_value, job_id, success[0], custom_id))  # noqa: RUF005
        for u in updates:
            status = u.status
            if status is None or status is ItemStatus.SUBMITTED:
                raise ValueError(
                    f"row {u.row_index}: a result leaves its item final or pending, not {status}"
                )
            if u.custom_id in seen:
                continue
            seen.add(u.custom_id)
            leaves = status is ItemStatus.PENDING
            if on_postgres:
                # One tuple straight in pg_apply.COLUMNS order: every line takes this path.
                copied.append(
                    (
                        u.row_index,
                        u.custom_id,
                        status.value,
                        *_result_values(u),
                        u.cost_usd,
                        leaves,
                        u.attempt,
                        u.result_type.value,
                    )
                )
                continue
            if status is ItemStatus.SUCCEEDED and u.error_type is None and u.error_message is None:
                kept.append(
                    (*_kept_values(u), u.cost_usd, now_value, job_id, u.row_index, u.custom_id)
                )
                continue
            # In _APPLY_ROW order: key, status, RESULT_FIELDS, cost.
            row = (u.row_index, u.custom_id, status.value, *_result_values(u), u.cost_usd)
            (transient if leaves else final).append(row)
            if status is not ItemStatus.SUCCEEDED:  # a success stays on its item: history.py
                # In _HISTORY_ROW order; the result type is bound as its string.
                history.append(
                    (
                        u.row_index,
                        u.attempt,
                        u.custom_id,
                        u.result_type.value,
                        u.error_type,
                        u.error_message,
                        u.input_tokens,
                        u.output_tokens,
                    )
                )
        if on_postgres:
            try:
                with self._write() as conn:
                    return apply_by_copy(conn, job_id, batch_id, copied, now)
            except TypeError:
                # A value of another type than the API documents: nothing was committed;
                # the text format stores it as the SQLite path does (see pg_apply).
                with self._write() as conn:
                    return apply_by_copy(conn, job_id, batch_id, copied, now, binary=False)
        changed = 0
        shared = {"p_job_id": job_id, "p_now": now}
        with self._write() as conn:
            changed += _BULK_APPLY_SUCCEEDED.execute(conn, kept)
            if final:
                changed += _BULK_APPLY_FINAL.execute(conn, final, shared)
            if transient:
                changed += _BULK_APPLY_TRANSIENT.execute(conn, transient, shared)
            history_stmt = _BULK_HISTORY.get(self.dialect)
            if history_stmt is None:
                raise StoreError(f"unsupported database dialect {self.dialect!r}")
            history_stmt.execute(
                conn, history, {"job_id": job_id, "batch_id": batch_id, "p_now": now}
            )
        return int(changed)
