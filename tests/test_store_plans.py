"""Query plans of the Store's per-row statements on PostgreSQL.

A claim or a result updates one item per statement, 100,000 statements a batch. If the
planner serves one of them from the ``(job_id, status)`` index instead of the primary key,
each statement walks every item of the job in that status, and a 100,000-item submit spends
ten minutes of server CPU (measured: bench/bench_pipeline.py --db postgres). A freshly loaded
table has no statistics, which is exactly when the first claim runs, so ``insert_items``
analyzes the table after its COPY (``db/bulk.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from batchpipe.db import Store, upgrade
from batchpipe.db.batches import _BULK_APPLY_FINAL, _BULK_APPLY_TRANSIENT, _BULK_CLAIM
from batchpipe.db.bulk import BulkStatement
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
