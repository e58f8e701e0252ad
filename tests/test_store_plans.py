"""Query plans of the Store's per-row statements on PostgreSQL.

A claim or a result updates one item per statement, 100,000 statements a batch. If the
planner serves one of them from anything but the primary key (a sequential scan, or in
revisions before 0006 the ``(job_id, status)`` index), each statement walks the job's items,
and a 100,000-item submit spends ten minutes of server CPU (measured: bench/bench_pipeline.py
--db postgres). A freshly loaded table has no statistics, which is exactly when the first
claim runs, so ``insert_items`` analyzes the table after its COPY (``db/bulk.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from batchpipe.db import Store, pg_apply, upgrade
from batchpipe.db.base import batch_members
from batchpipe.db.batches import _BULK_APPLY_FINAL, _BULK_APPLY_TRANSIENT, _BULK_CLAIM
from batchpipe.db.bulk import BulkStatement
from batchpipe.db.schema import items
from batchpipe.models import ItemStatus


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    upgrade(postgres_url)
    store = Store.open(postgres_url)
    yield store
    store.close()


def _generic_plan(store: Store, statement: BulkStatement) -> str:
    """EXPLAIN of the statement's generic plan (what a prepared statement settles on)."""
    sql, _, _ = statement._compile(store._engine.dialect)
    count = iter(range(1, 1000))
    numbered = re.sub("%s", lambda _: f"${next(count)}", sql)
    nparams = next(count) - 1
    with store._engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(f"PREPARE per_row AS {numbered}")
        nulls = ", ".join(["NULL"] * nparams)
        plan = conn.exec_driver_sql(f"EXPLAIN EXECUTE per_row({nulls})").scalars().all()
        conn.exec_driver_sql("DEALLOCATE per_row")
        conn.rollback()
    return "\n".join(plan)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "statement",
    [_BULK_CLAIM, _BULK_APPLY_FINAL, _BULK_APPLY_TRANSIENT],
    ids=["claim", "apply_final", "apply_transient"],
)
def test_per_row_updates_use_the_primary_key(pg_store: Store, statement: BulkStatement) -> None:
    job = pg_store.create_job(name="j", token="0123456789", spec={}, input_fingerprint="fp").id
    pending = ItemStatus.PENDING
    pg_store.insert_items(job, ((i, str(i), pending, None) for i in range(5_000)))
    plan = _generic_plan(pg_store, statement)
    assert "pk_items" in plan, plan
    assert "ix_items_job_id_status" not in plan, plan


def _captured(store: Store, action: Callable[[], object]) -> list[tuple[str, Any]]:
    """The UPDATE and SELECT statements (with their parameters) that ``action`` runs on items."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if "items" in sql and sql.lstrip().upper().startswith(("UPDATE", "SELECT")):
            seen.append((sql, params))

    sa.event.listen(store._engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(store._engine, "before_cursor_execute", record)
    return seen


def _plan_of(store: Store, sql: str, params: Any) -> str:
    with store._engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            cur.execute(f"EXPLAIN {sql}", params)
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
    return plan


@pytest.mark.postgres
def test_a_batchs_items_are_read_by_its_row_span(pg_store: Store) -> None:
    """With statistics taken while everything was pending, 'submitted' looks rare to the
    planner; a batch's members must still come from the primary-key range of its rows, not
    from a walk over the job's items."""
    job = pg_store.create_job(name="j", token="0123456789", spec={}, input_fingerprint="fp").id
    pg_store.insert_items(job, ((i, str(i), ItemStatus.PENDING, None) for i in range(40_000)))
    batches = [
        pg_store.plan_batch(
            job,
            round=1,
            items=[(r, f"0123456789-{r}-1", 1) for r in range(first, first + 5_000)],
            request_bytes=1,
        ).id
        for first in range(0, 40_000, 5_000)
    ]
    target = batches[3]
    # The UPDATE that requeue_batch_leftovers runs, and the predicate that iter_batch_items
    # and release_batch_items read a batch's items by.
    update = _captured(pg_store, lambda: pg_store.requeue_batch_leftovers(target))
    with pg_store._begin() as conn:
        members = batch_members(conn, target, [ItemStatus.SUBMITTED.value])
        select = sa.select(items.c.row_index).where(members)
        sql = str(select.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    assert len(update) == 1
    for statement, params in [*update, (sql, None)]:
        plan = _plan_of(pg_store, statement, params)
        assert "pk_items" in plan, plan
        assert "ix_items_job_id_status" not in plan, plan


@pytest.mark.postgres
def test_result_lines_are_applied_through_the_primary_key(pg_store: Store) -> None:
    """The apply's UPDATE … FROM joins a chunk of lines to their items. Statistics taken
    while every item was pending say no item is submitted; a plan that believed them walked
    every item of the job once per line (87 s for 100,000 lines, bench/bench_pipeline.py)."""
    job = pg_store.create_job(name="j", token="0123456789", spec={}, input_fingerprint="fp").id
    n = 40_000
    pg_store.insert_items(job, ((i, str(i), ItemStatus.PENDING, None) for i in range(n)))
    batch = pg_store.plan_batch(
        job, round=1, items=[(r, f"0123456789-{r}-1", 1) for r in range(n)], request_bytes=1
    ).id
    lines = [
        (i, f"0123456789-{i}-1", "succeeded", "x", None, None, 1, 1, None, None, None, None,
         0.1, False, 1, "succeeded")
        for i in range(5_000)
    ]  # fmt: skip
    assert len(lines[0]) == len(pg_apply.COLUMNS)
    with pg_store._engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            cur.execute(pg_apply._CREATE)
            with cur.copy(pg_apply._COPY_BINARY) as copy:
                copy.set_types(pg_apply._BINARY_TYPES)
                for line in lines:
                    copy.write_row(line)
            cur.execute(
                f"EXPLAIN {pg_apply._UPDATE}", {"job_id": job, "batch_id": batch, "now": None}
            )
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
    assert "Seq Scan on items" not in plan, plan
