"""The Store's whole API, each test on a SQLite file and on a real PostgreSQL database."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batchpipe.db import ItemRow, JobNameTaken, ScratchKeys, Store, upgrade
from batchpipe.db import items as items_module
from batchpipe.db.connect import describe_error
from batchpipe.db.schema import attempts, jobs
from batchpipe.errors import StoreError, StoreUnreachable
from batchpipe.models import BatchStatus, ItemStatus, JobStatus, ResultRecord, ResultType

P, S = ItemStatus.PENDING, ItemStatus.SUBMITTED


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    upgrade(db_url)  # Store.open migrates only SQLite files by itself
    s = Store.open(db_url)
    yield s
    s.close()


def new_job(store: Store, name: str = "j1", token: str = "0123456789") -> int:
    return store.create_job(name=name, token=token, spec={"model": "m"}, input_fingerprint="fp").id


def cid(row: int, attempt: int = 1) -> str:
    return f"0123456789-{row}-{attempt}"


def with_items(store: Store, n: int) -> int:
    job = new_job(store)
    store.insert_items(job, ((i, f"k{i}", P, None) for i in range(n)))
    return job


def plan(store: Store, job: int, rows: list[int], attempt: int = 1) -> int:
    batch = store.plan_batch(
        job, round=attempt, items=[(r, cid(r, attempt), attempt) for r in rows], request_bytes=99
    )
    return batch.id


def succeeded(row: int, attempt: int = 1, **kw: object) -> ResultRecord:
    fields: dict[str, object] = {"response_text": f"answer {row}", "input_tokens": 10}
    fields.update(kw)
    return ResultRecord(
        row_index=row,
        custom_id=cid(row, attempt),
        status=ItemStatus.SUCCEEDED,
        result_type=ResultType.SUCCEEDED,
        attempt=attempt,
        **fields,  # type: ignore[arg-type]
    )


def errored(row: int, error_type: str, status: ItemStatus, attempt: int = 1) -> ResultRecord:
    return ResultRecord(
        row_index=row,
        custom_id=cid(row, attempt),
        status=status,
        result_type=ResultType.ERRORED,
        attempt=attempt,
        error_type=error_type,
        error_message="boom",
        cost_usd=0.0,  # not billed: collect's refine prices every failure so
    )


def by_row(store: Store, job: int) -> dict[int, ItemRow]:
    return {i.row_index: i for i in store.iter_items(job)}


# ------------------------------------------------------------------ jobs


def test_create_get_list_jobs(store: Store) -> None:
    a = store.create_job(name="a", token="aaaaaaaaaa", spec={"x": [1, 2]}, input_fingerprint=None)
    b = store.create_job(name="b", token="bbbbbbbbbb", spec={}, input_fingerprint="f")
    assert a.status is JobStatus.RUNNING
    assert a.spec == {"x": [1, 2]}
    assert a.created_at.tzinfo is not None
    assert a.created_at.utcoffset() == timedelta(0)
    assert abs(a.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert store.get_job(a.id) == a
    assert store.get_job(str(b.id)) == b
    assert store.get_job("b") == b
    assert store.get_job("nope") is None
    assert store.get_job(9999) is None
    assert [j.name for j in store.list_jobs()] == ["b", "a"]
    store.update_job(a.id, status=JobStatus.DONE)
    assert [j.name for j in store.list_jobs([JobStatus.DONE])] == ["a"]
    with pytest.raises(JobNameTaken, match="'a' already exists"):
        store.create_job(name="a", token="cccccccccc", spec={}, input_fingerprint=None)
    assert isinstance(JobNameTaken("x"), StoreError)


def test_update_job_compare_and_set(store: Store) -> None:
    job = new_job(store)
    before = store.get_job(job)
    assert before is not None
    assert store.update_job(job, expected_status=JobStatus.RUNNING, status=JobStatus.DONE)
    # A second worker that still believes the job is running loses.
    assert not store.update_job(job, expected_status=JobStatus.RUNNING, status=JobStatus.FAILED)
    assert store.update_job(
        job, expected_status=[JobStatus.DONE, JobStatus.FAILED], row_count=5, error="e"
    )
    after = store.get_job(job)
    assert after is not None
    assert (after.status, after.row_count, after.error) == (JobStatus.DONE, 5, "e")
    assert after.updated_at >= before.updated_at
    assert not store.update_job(12345, status=JobStatus.DONE)
    with pytest.raises(ValueError, match="nonsense"):
        store.update_job(job, nonsense=1)


# ------------------------------------------------------------------ leases


def test_leases(store: Store) -> None:
    job = new_job(store)
    assert store.acquire_lease(job, "w1", 60)
    assert store.acquire_lease(job, "w1", 60)  # re-entrant for its owner
    assert not store.acquire_lease(job, "w2", 60)
    assert store.renew_lease(job, "w1", 60)
    assert not store.renew_lease(job, "w2", 60)
    store.release_lease(job, "w2")  # not the owner: nothing happens
    assert not store.acquire_lease(job, "w2", 60)
    store.release_lease(job, "w1")
    row = store.get_job(job)
    assert row is not None
    assert (row.lease_owner, row.lease_until) == (None, None)
    assert store.acquire_lease(job, "w2", 60)
    row = store.get_job(job)
    assert row is not None
    assert row.lease_owner == "w2"
    assert row.lease_until is not None
    assert row.lease_until > datetime.now(UTC) + timedelta(seconds=50)


def test_expired_lease_is_taken_over(store: Store) -> None:
    job = new_job(store)
    assert store.acquire_lease(job, "w1", 30)
    assert not store.acquire_lease(job, "w2", 30)
    store.clock = lambda: datetime.now(UTC) + timedelta(seconds=31)
    assert store.acquire_lease(job, "w2", 30)
    # The old owner notices it lost the job when it tries to renew.
    assert not store.renew_lease(job, "w1", 30)
    assert store.renew_lease(job, "w2", 30)


def test_two_engines_race_for_one_lease(db_url: str) -> None:
    upgrade(db_url)
    setup = Store.open(db_url)
    job = new_job(setup)
    setup.close()
    stores = [Store.open(db_url) for _ in range(2)]
    barrier = threading.Barrier(len(stores))
    results: dict[str, bool] = {}

    def contend(store: Store, owner: str) -> None:
        barrier.wait()
        results[owner] = store.acquire_lease(job, owner, 60)

    threads = [threading.Thread(target=contend, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, True]
    winner = next(o for o, won in results.items() if won)
    row = stores[0].get_job(job)
    assert row is not None
    assert row.lease_owner == winner
    for s in stores:
        s.close()


# ------------------------------------------------------------------ items


def test_insert_many_items_and_iterate_in_pages(store: Store) -> None:
    job = new_job(store)
    n = 20_000
    consumed = 0

    def rows() -> Iterator[tuple[int, str, ItemStatus, str | None]]:
        nonlocal consumed
        for i in reversed(range(n)):  # insert order must not matter for read order
            consumed += 1
            yield i, f"key-{i}", ItemStatus.INVALID if i % 1000 == 7 else P, None
        assert consumed == n

    assert store.insert_items(job, rows()) == n
    got = [item.row_index for item in store.iter_items(job, page=777)]
    assert got == list(range(n))
    assert [i.row_index for i in store.iter_items(job, start=19_990, page=3)] == list(
        range(19_990, n)
    )
    invalid = list(store.iter_items(job, statuses=[ItemStatus.INVALID], page=4))
    assert [i.row_index for i in invalid] == [i for i in range(n) if i % 1000 == 7]
    counts = store.count_items(job)
    assert counts[P] == n - 20
    assert counts[ItemStatus.INVALID] == 20
    assert counts[ItemStatus.SUCCEEDED] == 0


def test_iter_pending_pages_through_pending_rows_only(store: Store) -> None:
    job = with_items(store, 9)
    sent = plan(store, job, [1, 2])
    cut = succeeded(2, stop_reason="max_tokens")
    cut.status = P  # a truncated answer going round again
    store.apply_results(job, sent, [cut])
    store.apply_results(job, plan(store, job, [4]), [succeeded(4)])
    got = list(store.iter_pending(job, page=2))
    assert [p.row_index for p in got] == [0, 2, 3, 5, 6, 7, 8]
    assert got[1] == (2, 1, "max_tokens")
    assert {(p.attempts, p.stop_reason) for p in got if p.row_index != 2} == {(0, None)}


def test_iter_pending_knows_runs_of_new_rows_without_reading_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = new_job(store)
    rows = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15]  # a gap: 11 to 13 are not items
    store.insert_items(job, [(i, str(i), P, None) for i in rows])
    sent = plan(store, job, [5])
    store.apply_results(job, sent, [errored(5, "overloaded_error", P)])  # sent once already
    got = list(store.iter_pending(job, page=3))
    assert [p.row_index for p in got] == rows
    assert [(p.attempts, p.stop_reason) for p in got] == [(1 if i == 5 else 0, None) for i in rows]
    # Windows of three row indexes: 0-2 and 6-8 are known by a count alone; 3-5 holds a row
    # sent before, 9-11 a gap, so those are read, and reading goes on from the last row read.
    reads: list[object] = []
    read = items_module._fetch_raw

    def fetch(conn: sa.Connection, stmt: sa.Select[Any]) -> list[tuple[Any, ...]]:
        reads.append(stmt)
        return read(conn, stmt)

    monkeypatch.setattr(items_module, "_fetch_raw", fetch)
    assert list(store.iter_pending(job, page=3)) == got
    assert len(reads) == 3  # from 3 (3, 4, 5), from 9 (9, 10, 14), from 15 (15, the end)


def test_insert_items_is_all_or_nothing(store: Store) -> None:
    job = new_job(store)

    def rows() -> Iterator[tuple[int, str, ItemStatus, str | None]]:
        yield from ((i, str(i), P, None) for i in range(15_000))
        yield 3, "again", P, None  # duplicate primary key in the second chunk

    with pytest.raises(sa.exc.IntegrityError):
        store.insert_items(job, rows())
    assert list(store.iter_items(job)) == []


def _orphan_item_refused(store: Store) -> bool:
    """Whether a plain write of an item for a job that does not exist is refused."""
    try:
        with store._write() as conn:
            conn.execute(
                sa.insert(items_module.items).values(
                    job_id=999, row_index=0, row_key="k", status=P.value, attempts=0
                )
            )
    except sa.exc.IntegrityError:
        return True
    return False


def test_foreign_keys_are_checked_again_after_the_bulk_writes_that_skip_them(
    store: Store,
) -> None:
    # The insert and the claim skip SQLite's per-row foreign key lookups; the pooled
    # connection they ran on checks them again afterwards, whether they committed or not.
    job = with_items(store, 5)
    assert _orphan_item_refused(store)
    plan(store, job, [0, 1])
    assert _orphan_item_refused(store)
    with pytest.raises(StoreError, match="only 0 of 2 items were pending"):
        plan(store, job, [0, 1])  # already claimed: rolled back
    assert _orphan_item_refused(store)
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_items(job, [(0, "again", P, None)])
    assert _orphan_item_refused(store)
    assert [i.status for i in store.iter_items(job)] == [ItemStatus.SUBMITTED] * 2 + [P] * 3


def test_find_duplicate_keys(store: Store) -> None:
    job = new_job(store)
    keys = ["a", "b", "a", "c", "b", "a", "d", "a", "a", "a", "a"]
    store.insert_items(job, ((i, k, P, None) for i, k in enumerate(keys)))
    assert store.find_duplicate_keys(job) == [("a", [0, 2, 5, 7, 8]), ("b", [1, 4])]
    assert store.find_duplicate_keys(job, limit=1) == [("a", [0, 2, 5, 7, 8])]
    other = new_job(store, "j2", "abcdefabcd")
    store.insert_items(other, [(0, "x", P, None), (1, "y", P, None)])
    assert store.find_duplicate_keys(other) == []


def test_scratch_keys_find_what_the_store_finds_and_leave_no_file(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_dir))
    keys = ["a", "b", "a", "c", "b", "a", "d", "a", "a", "a", "a"]
    job = new_job(store)
    store.insert_items(job, ((i, k, P, None) for i, k in enumerate(keys)))
    with ScratchKeys() as scratch:
        scratch.add(enumerate(keys[:4]))  # added in pieces, as estimate adds each chunk
        scratch.add((i, k) for i, k in enumerate(keys) if i >= 4)
        assert list(scratch_dir.iterdir())  # the keys are on disk, not in memory
        assert scratch.duplicates() == store.find_duplicate_keys(job)
        assert scratch.duplicates(limit=1) == store.find_duplicate_keys(job, limit=1)
    assert list(scratch_dir.iterdir()) == []
    with ScratchKeys() as scratch:
        scratch.add([(0, "x"), (1, "y")])
        assert scratch.duplicates() == []
    with ScratchKeys() as scratch:
        scratch.add([(0, "a"), (1, "b")])
        scratch.add([(2, "c")])
        assert scratch.duplicates() == []  # in ascending order: no key can repeat
        assert not scratch._indexed  # so no query was run
        scratch.add([(3, "c"), (4, "d")])  # a repeat next to itself, across two adds
        assert scratch.duplicates() == [("c", [2, 3])]


# ------------------------------------------------------------------ batches


def test_plan_batch_claims_items_and_records_intent(store: Store) -> None:
    job = with_items(store, 5)
    batch = store.plan_batch(
        job, round=1, items=[(1, cid(1), 1), (3, cid(3), 1)], request_bytes=1234
    )
    assert batch.status is BatchStatus.PLANNED
    assert (batch.request_count, batch.request_bytes, batch.round) == (2, 1234, 1)
    assert (batch.first_custom_id, batch.last_custom_id) == (cid(1), cid(3))
    assert batch.api_batch_id is None
    assert batch.intent_at.tzinfo is not None
    items = by_row(store, job)
    assert (items[1].status, items[1].custom_id) == (S, cid(1))
    assert (items[1].batch_id, items[1].attempts) == (batch.id, 1)
    assert items[0].status is P


def test_plan_batch_is_atomic(store: Store) -> None:
    job = with_items(store, 5)
    plan(store, job, [2])
    before = by_row(store, job)
    with pytest.raises(StoreError, match="only 2 of 3 items were pending"):
        plan(store, job, [0, 2, 4])
    assert by_row(store, job) == before
    assert len(store.list_batches(job)) == 1


def test_plan_batch_claims_a_run_of_rows_by_range(store: Store) -> None:
    job = with_items(store, 10)
    plan(store, job, [1])
    plan(store, job, [5])
    batch = store.get_batch(plan(store, job, [2, 3, 4, 6, 7]))
    assert batch is not None
    items = by_row(store, job)
    # Rows already submitted (1, 5) inside or beside the range keep their batch and id.
    assert [items[r].batch_id for r in (2, 3, 4, 6, 7)] == [batch.id] * 5
    assert [items[r].custom_id for r in (2, 3, 4, 6, 7)] == [cid(r) for r in (2, 3, 4, 6, 7)]
    assert items[5].batch_id != batch.id
    assert items[5].custom_id == cid(5)
    assert [items[r].status for r in (0, 8, 9)] == [P, P, P]


def test_plan_batch_by_range_keeps_each_rows_attempt(store: Store) -> None:
    job = with_items(store, 3)
    first = plan(store, job, [0, 1, 2])
    store.apply_results(job, first, [succeeded(0)])
    store.apply_results(
        job,
        first,
        [
            ResultRecord(
                row_index=r,
                custom_id=cid(r),
                status=P,
                result_type=ResultType.ERRORED,
                attempt=1,
                error_type="overloaded_error",
            )
            for r in (1, 2)
        ],
    )
    plan(store, job, [1, 2], attempt=2)
    items = by_row(store, job)
    assert [(items[r].custom_id, items[r].attempts) for r in (1, 2)] == [
        (cid(1, 2), 2),
        (cid(2, 2), 2),
    ]


def test_plan_batch_by_range_refuses_a_row_at_another_attempt(store: Store) -> None:
    job = with_items(store, 4)
    first = plan(store, job, [1])
    back = errored(1, "overloaded_error", P)  # row 1 is pending again, at attempt 1
    store.apply_results(job, first, [back])
    before = by_row(store, job)
    # Rows 0-3 planned as all first attempts: row 1's would repeat its custom_id.
    with pytest.raises(StoreError, match="only 3 of 4 items were pending"):
        plan(store, job, [0, 1, 2, 3])
    assert by_row(store, job) == before
    assert len(store.list_batches(job)) == 1


def test_plan_batch_refuses_a_row_planned_twice(store: Store) -> None:
    job = with_items(store, 5)
    before = by_row(store, job)
    with pytest.raises(StoreError):
        plan(store, job, [1, 2, 2, 4])  # rows 1-4 in count, but row 3 was never planned
    assert by_row(store, job) == before
    assert store.list_batches(job) == []


def test_mark_created_update_and_list_batches(store: Store) -> None:
    job = with_items(store, 4)
    b1, b2 = plan(store, job, [0, 1]), plan(store, job, [2, 3])
    created = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert store.mark_batch_created(
        b1, api_batch_id="msgbatch_1", created_at=created, expires_at=created + timedelta(days=1)
    )
    assert not store.mark_batch_created(
        b1, api_batch_id="msgbatch_x", created_at=created, expires_at=created
    )
    with pytest.raises(StoreError, match="adopt it twice"):
        store.mark_batch_created(
            b2, api_batch_id="msgbatch_1", created_at=created, expires_at=created
        )
    row = store.get_batch(b1)
    assert row is not None
    assert (row.status, row.api_batch_id, row.created_at) == (
        BatchStatus.IN_PROGRESS,
        "msgbatch_1",
        created,
    )
    counts = {"processing": 0, "succeeded": 2}
    assert store.update_batch(
        b1, expected_status=BatchStatus.IN_PROGRESS, status=BatchStatus.ENDED, api_counts=counts
    )
    assert not store.update_batch(
        b1, expected_status=BatchStatus.IN_PROGRESS, status=BatchStatus.CANCELING
    )
    row = store.get_batch(b1)
    assert row is not None
    assert (row.status, row.api_counts) == (BatchStatus.ENDED, counts)
    assert [b.id for b in store.list_batches(job)] == [b1, b2]
    assert [b.id for b in store.list_batches(job, [BatchStatus.PLANNED])] == [b2]
    assert store.known_api_batch_ids() == {"msgbatch_1"}
    assert store.get_batch(999) is None
    with pytest.raises(ValueError, match="naive"):
        store.update_batch(b1, ended_at=datetime(2024, 1, 1))


def test_release_batch_items(store: Store) -> None:
    job = with_items(store, 3)
    first = plan(store, job, [0, 1])
    store.apply_results(job, first, [errored(0, "overloaded_error", P)])
    store.requeue_batch_leftovers(first)  # row 1 was never mentioned
    retry = plan(store, job, [0, 1], attempt=2)
    assert store.release_batch_items(retry) == 2
    items = by_row(store, job)
    for row in (0, 1):
        item = items[row]
        assert item.status is P
        assert item.attempts == 1
        assert (item.custom_id, item.batch_id) == (None, None)
    batch = store.get_batch(retry)
    assert batch is not None
    assert batch.status is BatchStatus.REJECTED
    with pytest.raises(StoreError, match="not planned"):
        store.release_batch_items(retry)


def test_iter_batch_items_reads_one_batch_in_row_order(store: Store) -> None:
    job = with_items(store, 7)
    first = plan(store, job, [5, 0, 3])
    second = plan(store, job, [1, 6])
    store.apply_results(job, first, [succeeded(3)])
    # Pages of 2 force the keyset pagination across pages.
    assert [i.row_index for i in store.iter_batch_items(first, page=2)] == [0, 3, 5]
    assert [i.row_index for i in store.iter_batch_items(second, page=2)] == [1, 6]
    submitted = store.iter_batch_items(first, statuses={S}, page=2)
    assert [(i.row_index, i.custom_id) for i in submitted] == [(0, cid(0)), (5, cid(5))]
    assert list(store.iter_batch_items(second + 1000)) == []


# ------------------------------------------------------------------ results


def test_apply_results_is_idempotent(store: Store) -> None:
    job = with_items(store, 4)
    batch = plan(store, job, [0, 1, 2, 3])
    updates = [
        succeeded(0, model="claude", output_tokens=5, cache_read_input_tokens=3),
        errored(1, "invalid_request_error", ItemStatus.ERRORED),
        errored(2, "overloaded_error", P),  # transient: back to pending
    ]
    assert store.apply_results(job, batch, updates) == 3
    assert store.apply_results(job, batch, updates) == 0
    items = by_row(store, job)
    ok, bad, again, untouched = (items[i] for i in range(4))
    assert (ok.status, ok.response_text, ok.model) == (
        ItemStatus.SUCCEEDED,
        "answer 0",
        "claude",
    )
    assert ok.batch_id == batch
    assert (bad.status, bad.error_type) == (
        ItemStatus.ERRORED,
        "invalid_request_error",
    )
    assert (again.status, again.attempts, again.batch_id) == (P, 1, None)
    assert untouched.status is S
    # A line for an id the item no longer carries (a stale file) changes nothing.
    assert store.apply_results(job, batch, [succeeded(3, attempt=7)]) == 0

    # The transient row goes out again and succeeds on attempt 2.
    retry = plan(store, job, [2], attempt=2)
    assert store.apply_results(job, retry, [succeeded(2, attempt=2)]) == 1
    assert store.requeue_batch_leftovers(batch) == 1  # row 3 never came back
    assert by_row(store, job)[3].status is P

    with store._engine.connect() as conn:
        history = conn.execute(
            sa.select(attempts.c.row_index, attempts.c.attempt, attempts.c.result_type)
            .where(attempts.c.job_id == job)
            .order_by(attempts.c.row_index, attempts.c.attempt)
        ).all()
    # Successes stay on their items (history.py): the history holds the other attempts.
    assert [tuple(h) for h in history] == [(1, 1, "errored"), (2, 1, "errored")]


def history_of(store: Store, job: int) -> list[tuple[int, int, str, str | None, int | None]]:
    with store._engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                attempts.c.row_index,
                attempts.c.attempt,
                attempts.c.custom_id,
                attempts.c.result_type,
                attempts.c.input_tokens,
            )
            .where(attempts.c.job_id == job)
            .order_by(attempts.c.row_index, attempts.c.attempt)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_a_succeeded_answer_sent_again_is_kept_in_the_history(store: Store) -> None:
    job = with_items(store, 3)
    batch = plan(store, job, [0, 1, 2])
    arrived = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    store.clock = lambda: arrived
    store.apply_results(job, batch, [succeeded(0), succeeded(1), succeeded(2)])
    assert history_of(store, job) == []
    # `retry` of succeeded rows: their answers go into the history before being cleared,
    # recorded at the time they arrived, not the time of the retry.
    store.clock = lambda: arrived + timedelta(days=3)
    assert store.requeue_items(job, statuses=[ItemStatus.SUCCEEDED]) == 3
    expected = [(r, 1, cid(r), "succeeded", 10) for r in range(3)]
    assert history_of(store, job) == expected
    with store._engine.connect() as conn:
        recorded = conn.execute(sa.select(attempts.c.recorded_at).distinct()).scalars().all()
    assert recorded == [arrived]
    # A re-run whose request changed does the same for the rows it sends again.
    retry = plan(store, job, [0, 1, 2], attempt=2)
    store.apply_results(job, retry, [succeeded(r, attempt=2) for r in range(3)])
    changed, unchanged, invalid = store.rerun_items(
        job, [(0, True, None), (1, False, None), (2, True, None)], spec={"model": "m"}
    )
    assert (changed, unchanged, invalid) == (2, 1, 0)
    assert history_of(store, job) == [
        *expected[:1],
        (0, 2, cid(0, 2), "succeeded", 10),
        *expected[1:],
        (2, 2, cid(2, 2), "succeeded", 10),
    ]
    assert store.requeue_items(job, statuses=[ItemStatus.SUCCEEDED]) == 1  # row 1
    assert len(history_of(store, job)) == 6


def test_rerun_items_requeues_renders_invalid_and_leaves_rows_in_flight(store: Store) -> None:
    """The re-run decides per row: changed rows go back to pending (an invalid one too: it
    renders now), rows the new settings cannot render become invalid with their message
    (an answer they had goes to the history), and a row in flight is left alone."""
    job = new_job(store)
    store.insert_items(
        job,
        [
            (0, "a", P, None),
            (1, "b", ItemStatus.INVALID, "bad"),
            (2, "c", P, None),
            (3, "d", P, None),
            (4, "e", ItemStatus.INVALID, "still bad"),
        ],
    )
    answered = plan(store, job, [3])
    store.apply_results(job, answered, [succeeded(3, cost_usd=0.25)])
    sent = plan(store, job, [2])
    rows = [(0, True, None), (1, True, None), (2, True, None), (3, False, "new"),
            (4, False, "still bad")]  # fmt: skip
    assert store.rerun_items(job, rows, spec={"model": "m"}) == (2, 0, 2)
    items = by_row(store, job)
    assert [items[r].status for r in range(5)] == [P, P, S, ItemStatus.INVALID, ItemStatus.INVALID]
    assert (items[1].error_message, items[1].attempts) == (None, 0)
    assert items[2].batch_id == sent
    assert (items[3].error_message, items[3].response_text, items[3].custom_id) == (
        "new",
        None,
        None,
    )
    assert (items[3].cost_usd, items[3].attempts) == (0.25, 1)  # paid is paid
    assert history_of(store, job) == [(3, 1, cid(3), "succeeded", 10)]
    assert items[4].error_message == "still bad"
    job_row = store.get_job(job)
    assert job_row is not None
    assert (job_row.invalid_count, job_row.status) == (2, JobStatus.RUNNING)


def test_a_result_value_of_an_unexpected_type_is_stored_as_text(store: Store) -> None:
    """A results line off the API's schema (a number where the message belongs) is kept in
    its string form on both databases; PostgreSQL's binary COPY refuses it, so the chunk
    goes again in the text format."""
    job = with_items(store, 3)
    batch = plan(store, job, [0, 1, 2])
    odd = errored(1, "invalid_request_error", ItemStatus.ERRORED)
    odd.error_message = 404  # type: ignore[assignment]
    assert store.apply_results(job, batch, [succeeded(0), odd, succeeded(2)]) == 3
    rows = by_row(store, job)
    assert rows[1].error_message == "404"
    assert (rows[0].response_text, rows[2].response_text) == ("answer 0", "answer 2")
    assert store.count_items(job)[ItemStatus.SUCCEEDED] == 2


def test_insert_items_refuses_a_row_index_past_the_column(store: Store) -> None:
    """PostgreSQL's binary COPY would wrap an int4 past 2**31 where text was refused."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite integers are 64-bit")
    job = new_job(store)
    with pytest.raises(StoreError, match="row index 2147483648 is out of range"):
        store.insert_items(job, [(0, "a", P, None), (2**31, "b", P, None)])
    assert store.count_items(job)[P] == 0


def test_apply_results_counts_a_repeated_line_once_and_adds_up_costs(store: Store) -> None:
    job = with_items(store, 2)
    first = plan(store, job, [0, 1])
    line = errored(0, "overloaded_error", P)  # not billed (cost 0): adds nothing
    # The same line twice in one call (a file read twice in one chunk) applies once.
    assert store.apply_results(job, first, [line, line, succeeded(1, cost_usd=0.25)]) == 2
    retry = plan(store, job, [0], attempt=2)
    assert store.apply_results(job, retry, [succeeded(0, attempt=2, cost_usd=0.5)]) == 1
    items = by_row(store, job)
    assert (items[0].status, items[0].attempts) == (ItemStatus.SUCCEEDED, 2)
    assert items[0].cost_usd == 0.5
    assert (items[1].batch_id, items[1].cost_usd) == (first, 0.25)
    priced = ResultRecord(**{**asdict(succeeded(1)), "cost_usd": 0.25})
    assert store.apply_results(job, first, [priced]) == 0  # already applied: no second charge
    assert by_row(store, job)[1].cost_usd == 0.25


def test_plain_successes_are_stored_as_their_records_would_be(store: Store) -> None:
    """collect hands the commonest lines over as tuples (outcome.plain_reader), the others
    as records, in one call: both land the same on each database, once per custom_id."""
    job = with_items(store, 4)
    batch = plan(store, job, [0, 1, 2, 3])
    as_record = succeeded(0, stop_reason="end_turn", model="m", output_tokens=2, cost_usd=0.5)
    plain = [
        (1, cid(1), 1, "answer 1", "end_turn", "m", 10, 2, None, None, 0.5),
        (2, cid(2), 1, "", "max_tokens", None, 7, 50, 3, 4, None),  # unpriced: cost stays
        (1, cid(1), 1, "again", "end_turn", "m", 10, 2, None, None, 0.5),  # repeated: once
    ]
    # Row 2 as a record too: the tuple came first, so it counts and the record does not.
    lines = [as_record, errored(2, "overloaded_error", P), errored(3, "overloaded_error", P)]
    assert store.apply_results(job, batch, lines, plain) == 4
    items = by_row(store, job)
    fields = ("status", "response_text", "stop_reason", "model", "input_tokens")
    fields += ("output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    fields += ("error_type", "error_message", "cost_usd", "attempts", "batch_id")
    values = {r: tuple(getattr(items[r], f) for f in fields) for r in range(4)}
    S = ItemStatus.SUCCEEDED
    assert values[1] == (
        S,
        "answer 1",
        "end_turn",
        "m",
        10,
        2,
        None,
        None,
        None,
        None,
        0.5,
        1,
        batch,
    )
    assert values[0] == (S, "answer 0", *values[1][2:])
    assert values[2] == (S, "", "max_tokens", None, 7, 50, 3, 4, None, None, None, 1, batch)
    assert (items[3].status, items[3].batch_id) == (P, None)  # transient: back to pending
    assert store.apply_results(job, batch, [], plain) == 0  # applied already: nothing changes
    assert by_row(store, job)[1].cost_usd == 0.5


def test_a_row_with_an_unpriced_attempt_has_no_cost(store: Store) -> None:
    """cost_usd sums every billed attempt: one the price table could not price (an unknown
    model) makes the row's cost unknown (null) for good, whatever came before or after it;
    attempts the API does not bill (errored, expired) add 0. Each kind of statement
    (kept success, plain tuple, final, transient; one COPY on PostgreSQL) is exercised."""
    job = with_items(store, 8)
    first = plan(store, job, list(range(7)))
    cut_priced = succeeded(1, cost_usd=0.25, stop_reason="max_tokens")
    cut_priced.status = P  # a truncated answer, paid for and sent again
    cut_unpriced = succeeded(2, stop_reason="max_tokens")
    cut_unpriced.status = P
    schema_miss = succeeded(5, error_type="invalid_output", error_message="no label")
    schema_miss.status = ItemStatus.INVALID_OUTPUT  # billed, unpriced, final
    store.apply_results(
        job,
        first,
        [
            errored(0, "overloaded_error", P),  # free, sent again
            cut_priced,
            cut_unpriced,
            errored(3, "overloaded_error", P),
            schema_miss,
            errored(6, "invalid_request_error", ItemStatus.ERRORED),  # free, final
        ],
        [(4, cid(4), 1, "answer 4", "end_turn", "m", 10, 2, None, None, None)],  # unpriced
    )
    second = plan(store, job, [0, 1, 2, 3], attempt=2)
    store.apply_results(
        job,
        second,
        [
            succeeded(1, attempt=2),  # unpriced after a priced attempt
            errored(2, "overloaded_error", P, attempt=2),  # free after an unpriced one
            succeeded(3, attempt=2, cost_usd=0.5),  # priced after a free one
        ],
        # The tester's case: unpriced after a free attempt (was 0.0, read as free).
        [(0, cid(0, 2), 2, "answer 0", "end_turn", "m", 10, 2, None, None, None)],
    )
    third = plan(store, job, [2], attempt=3)
    store.apply_results(job, third, [succeeded(2, attempt=3, cost_usd=0.5)])
    items = by_row(store, job)
    assert {r: items[r].cost_usd for r in range(8)} == {
        0: None,
        1: None,
        2: None,
        3: 0.5,
        4: None,
        5: None,
        6: 0.0,
        7: None,  # never sent: nothing billed, nothing unknown
    }
    assert items[5].status is ItemStatus.INVALID_OUTPUT
    # The totals say so too: 5 rows of unknown cost, not $0.50 as if the rest were free.
    totals = store.job_totals(job)
    assert (totals.cost_usd, totals.priced, totals.unpriced) == (0.5, 2, 5)
    assert store.count_items_and_usage(job)[2] is None


def test_a_row_claimed_by_an_older_batchpipe_takes_its_first_price(store: Store) -> None:
    """Rows claimed before their cost started at 0 on the first claim (an upgrade while a
    batch was out) have none: their first attempt's price is their cost, not unknown."""
    job = with_items(store, 3)
    batch = plan(store, job, [0, 1, 2])
    with store._engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET cost_usd = NULL"))
    store.apply_results(
        job,
        batch,
        [succeeded(0, cost_usd=0.25), errored(1, "overloaded_error", ItemStatus.ERRORED)],
        [(2, cid(2), 1, "answer 2", "end_turn", "m", 10, 2, None, None, 0.5)],
    )
    items = by_row(store, job)
    assert [items[r].cost_usd for r in range(3)] == [0.25, 0.0, 0.5]
    assert store.job_totals(job).unpriced == 0


def test_the_first_of_repeated_lines_wins_and_a_success_keeps_what_it_carries(
    store: Store,
) -> None:
    job = with_items(store, 3)
    batch = plan(store, job, [0, 1, 2])
    odd = succeeded(2)
    odd.error_type, odd.error_message = "note", "kept as sent"
    lines = [errored(0, "invalid_request_error", ItemStatus.ERRORED), succeeded(0)]
    assert store.apply_results(job, batch, [*lines, succeeded(1), succeeded(1), odd]) == 3
    items = by_row(store, job)
    assert (items[0].status, items[0].error_type) == (ItemStatus.ERRORED, "invalid_request_error")
    assert (items[1].status, items[1].response_text) == (ItemStatus.SUCCEEDED, "answer 1")
    assert (items[2].status, items[2].error_type, items[2].error_message) == (
        ItemStatus.SUCCEEDED,
        "note",
        "kept as sent",
    )


def test_insert_items_keeps_a_pending_rows_message(store: Store) -> None:
    job = new_job(store)
    store.insert_items(job, [(0, "a", P, None), (1, "b", P, "note")])
    items = by_row(store, job)
    assert [(items[i].status, items[i].error_message) for i in (0, 1)] == [
        (P, None),
        (P, "note"),
    ]


def test_requeue_items_by_error_type(store: Store) -> None:
    job = with_items(store, 4)
    batch = plan(store, job, [0, 1, 2, 3])
    store.apply_results(
        job,
        batch,
        [
            succeeded(0),
            errored(1, "invalid_request_error", ItemStatus.ERRORED),
            errored(2, "overloaded_error", ItemStatus.ERRORED),
            errored(3, "overloaded_error", ItemStatus.ERRORED),
        ],
    )
    n = store.requeue_items(job, statuses=[ItemStatus.ERRORED], error_types=["overloaded_error"])
    assert n == 2
    items = by_row(store, job)
    assert [items[i].status for i in range(4)] == [
        ItemStatus.SUCCEEDED,
        ItemStatus.ERRORED,
        P,
        P,
    ]
    # The attempt stays counted: the next one is attempt 2, under a custom_id not yet used.
    assert (items[2].attempts, items[2].error_type, items[2].custom_id) == (1, None, None)
    assert store.requeue_items(job, statuses=[ItemStatus.ERRORED]) == 1
    assert by_row(store, job)[1].attempts == 1
    sent = plan(store, job, [1, 2, 3], attempt=2)
    assert {i.custom_id for i in store.iter_batch_items(sent)} == {cid(r, 2) for r in (1, 2, 3)}
    with pytest.raises(ValueError, match="submitted"):
        store.requeue_items(job, statuses=[ItemStatus.SUBMITTED])


def test_export_rows_order_join_and_usage(store: Store) -> None:
    job = with_items(store, 5)
    batch = plan(store, job, [1, 3])
    store.mark_batch_created(
        batch, api_batch_id="msgbatch_9", created_at=datetime.now(UTC), expires_at=datetime.now(UTC)
    )
    store.apply_results(
        job,
        batch,
        [
            succeeded(1, output_tokens=7, model="m1", cache_creation_input_tokens=2),
            succeeded(3, output_tokens=1, cache_read_input_tokens=4),
        ],
    )
    rows = list(store.export_rows(job, page=2))
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == (0, None, "pending", None, None, None, None, None, None, 0, None, None, None)
    assert rows[1] == (
        1, cid(1), "succeeded", "answer 1", None, 10, 7, None, None, 1, batch, "m1", None
    )  # fmt: skip
    assert rows[3][10] == batch
    assert [(b.id, b.api_batch_id) for b in store.list_batches(job)] == [(batch, "msgbatch_9")]
    counts, usage, _ = store.count_items_and_usage(job)
    assert usage == {
        "input_tokens": 20,
        "output_tokens": 8,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 4,
    }
    assert counts == store.count_items(job)
    assert (counts[ItemStatus.SUCCEEDED], counts[P]) == (2, 3)
    empty = new_job(store, "empty", "ffffffffff")
    assert store.count_items_and_usage(empty) == (
        dict.fromkeys(ItemStatus, 0),
        dict.fromkeys(items_module.TOKEN_FIELDS, 0),
        0.0,
    )
    assert list(store.export_rows(empty)) == []


def test_job_totals_sum_tokens_cost_and_truncated_answers_in_one_pass(store: Store) -> None:
    job = with_items(store, 6)
    batch = plan(store, job, [0, 1, 2, 3])
    store.apply_results(
        job,
        batch,
        [
            succeeded(0, output_tokens=5, cost_usd=0.25, stop_reason="max_tokens"),
            succeeded(1, output_tokens=7, cost_usd=0.5, cache_read_input_tokens=3),
            succeeded(2, stop_reason="end_turn"),  # no price: an unknown model
            errored(3, "invalid_request_error", ItemStatus.ERRORED),
        ],
    )
    totals = store.job_totals(job)
    assert totals.usage == {
        "input_tokens": 30,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }
    assert totals.usage == store.count_items_and_usage(job)[1]
    # The unpriced success counts in neither sum; the errored line was free ($0, priced).
    assert (totals.cost_usd, totals.priced) == store.cost_total(job) == (0.75, 3)
    assert totals.unpriced == 1
    assert totals.truncated == 1
    # Over status groups, the same: unknown (None) while a row's cost is.
    assert store.count_items_and_usage(job)[2] is None
    without_unknown = new_job(store, "priced", "fedcba9876")
    store.insert_items(without_unknown, ((i, f"k{i}", P, None) for i in range(2)))
    sent = plan(store, without_unknown, [0, 1])
    priced = [succeeded(0, cost_usd=0.25), succeeded(1, cost_usd=0.5)]
    store.apply_results(without_unknown, sent, priced)
    assert store.count_items_and_usage(without_unknown)[2] == 0.75
    empty = store.job_totals(new_job(store, "empty", "ffffffffff"))
    assert (empty.cost_usd, empty.priced, empty.unpriced, empty.truncated) == (0.0, 0, 0, 0)


def test_bulk_paths_use_executemany(store: Store) -> None:
    """One round trip per chunk, not per row: count the statements the driver sees."""
    job = new_job(store)
    calls: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        calls.append((statement.split()[0].upper(), executemany))

    sa.event.listen(store._engine, "before_cursor_execute", record)
    try:
        store.insert_items(job, ((i, str(i), P, None) for i in range(2_500)))
        inserts = [c for c in calls if c[0] == "INSERT"]
        # SQLite: one executemany. Postgres: one COPY, which bypasses SQLAlchemy's events.
        if store.dialect == "postgresql":
            assert inserts == []
        else:
            assert inserts == [("INSERT", True)], inserts
        assert sum(store.count_items(job).values()) == 2_500
        calls.clear()
        # A run of consecutive pending rows is claimed by one UPDATE over its range ...
        batch = plan(store, job, list(range(2_000)))
        assert [c for c in calls if c[0] == "UPDATE"] == [("UPDATE", False)]
        calls.clear()
        # ... rows with other pending rows between them, by one executemany.
        plan(store, job, list(range(2_000, 2_500, 2)))
        assert [c for c in calls if c[0] == "UPDATE"] == [("UPDATE", True)]
        calls.clear()
        assert store.apply_results(job, batch, [succeeded(i) for i in range(2_000)]) == 2_000
        if store.dialect == "postgresql":
            # COPY into a temporary table and one UPDATE … FROM, on the driver's cursor.
            assert [c for c in calls if c[0] in {"UPDATE", "INSERT"}] == []
        else:
            assert [c for c in calls if c[0] == "UPDATE"] == [("UPDATE", True)]
            assert len([c for c in calls if c[0] == "INSERT"]) <= 5
    finally:
        sa.event.remove(store._engine, "before_cursor_execute", record)


def test_timestamps_come_back_aware_utc(store: Store) -> None:
    job = with_items(store, 1)
    batch = plan(store, job, [0])
    when = datetime(2024, 6, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=5)))
    store.mark_batch_created(batch, api_batch_id="b", created_at=when, expires_at=when)
    row = store.get_batch(batch)
    assert row is not None
    assert row.created_at == when
    assert row.created_at is not None
    assert row.created_at.utcoffset() == timedelta(0)


def test_cancel_pending_and_delete_items(store: Store) -> None:
    job = with_items(store, 4)
    plan(store, job, [1])
    assert store.cancel_pending(job) == 3
    statuses = [i.status for i in store.iter_items(job)]
    assert statuses == [ItemStatus.CANCELED, S, ItemStatus.CANCELED, ItemStatus.CANCELED]
    with pytest.raises(StoreError, match="already submitted"):
        store.delete_items(job)
    fresh = new_job(store, "fresh", "eeeeeeeeee")
    store.insert_items(fresh, [(0, "a", P, None), (1, "a", P, None)])
    assert store.delete_items(fresh) == 2
    assert list(store.iter_items(fresh)) == []
    assert len(list(store.iter_items(job))) == 4  # other jobs untouched


@pytest.mark.postgres
def test_a_connection_lost_between_calls_is_replaced(postgres_url: str) -> None:
    """A server restart or failover between two store calls: the pool's ping notices the
    dead connection and the next call runs on a new one."""
    upgrade(postgres_url)
    with Store.open(postgres_url) as store:
        job = new_job(store)
        _terminate_other_backends(postgres_url)
        assert store.get_job(job) is not None


@pytest.mark.postgres
def test_a_connection_lost_in_a_transaction_is_try_later(postgres_url: str) -> None:
    """The connection dies under a statement: rolled back, and exit 75 (cron and Airflow
    run the command again), not 1 (terminal)."""
    upgrade(postgres_url)
    with Store.open(postgres_url) as store:
        job = new_job(store)
        with pytest.raises(StoreUnreachable, match="lost the connection to database") as err:
            _update_then_lose_the_connection(store, job)
        assert err.value.exit_code == 75
        assert "run the command again when the server is back" in str(err.value)
        fresh = store.get_job(job)  # on a new connection
        assert fresh is not None
        assert fresh.error is None  # nothing half-written


@pytest.mark.postgres
def test_a_statement_error_on_a_live_connection_stays_terminal(postgres_url: str) -> None:
    """A statement timeout (like a full disk or a deadlock) has a SQLSTATE: not 'the server
    is gone', so not exit 75 with 'run again when the server is back'."""
    upgrade(postgres_url)
    with Store.open(postgres_url) as store:
        with pytest.raises(StoreError, match="canceling statement due to statement timeout") as err:
            _time_out_a_statement(store)
        assert not isinstance(err.value, StoreUnreachable)
        assert err.value.exit_code == 1
        assert store.list_jobs() == []  # the connection is fine


@pytest.mark.postgres
def test_a_database_error_names_the_cause_without_quoting_sql(postgres_url: str) -> None:
    """PostgreSQL quotes the statement it stopped at ("LINE 1: SELECT …" and a caret line);
    the user's one-line message keeps the cause and leaves the SQL out."""
    engine = sa.create_engine(postgres_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as err, engine.connect() as conn:
            conn.execute(sa.text("SELECT CAST('not a number' AS integer) AS secret_column"))
    finally:
        engine.dispose()
    assert "LINE 1: SELECT" in str(err.value.orig)  # what the driver says
    message = describe_error(err.value, postgres_url)
    assert 'invalid input syntax for type integer: "not a number"' in message
    assert "LINE" not in message
    assert "secret_column" not in message
    assert "^" not in message


def _time_out_a_statement(store: Store) -> None:
    with store._begin() as conn:
        conn.execute(sa.text("SET LOCAL statement_timeout = 10"))
        conn.execute(sa.text("SELECT pg_sleep(1)"))


def _update_then_lose_the_connection(store: Store, job: int) -> None:
    with store._begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id == job).values(error="half"))
        conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))


def _terminate_other_backends(url: str) -> None:
    """Kill every other connection to the test database, as a server restart would."""
    admin = sa.create_engine(url)
    with admin.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    admin.dispose()
