"""End to end: dataset in, joined output out, through the official SDK against the emulator.

Every test here runs the real pipeline with a real `BatchClient` (the anthropic SDK over
loopback HTTP) against the emulator, and a real database (SQLite file, and PostgreSQL where
the test takes `db_url`).
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from structlog.testing import capture_logs

from batchpipe import db, pipeline
from batchpipe.client import BatchClient
from batchpipe.config import Settings
from batchpipe.db import Store
from batchpipe.emulator import Emulator, EmulatorConfig, EmulatorServer
from batchpipe.emulator.responder import approx_tokens, expected_text
from batchpipe.errors import (
    BatchpipeError,
    InputChangedError,
    OutputNotWritable,
    PreflightFailed,
    StoreError,
    UsageError,
)
from batchpipe.models import RESULT_COLUMNS, ItemStatus, JobSpec, JobStatus

PROMPT = "Classify the sentiment of: {{ body }}"


def write_docs(path: Path, n: int) -> list[dict[str, Any]]:
    """n rows with an id, a body and a numeric column, as JSONL or Parquet by extension."""
    rows = [
        {
            "doc_id": f"d{i:05d}",
            "body": f"review {i}: the product was {'good' if i % 3 else 'bad'}",
            "stars": i % 5,
        }
        for i in range(n)
    ]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    else:
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return rows


def request_params(spec: JobSpec, row: dict[str, Any]) -> dict[str, Any]:
    """The params batchpipe sends for a row (what the emulator's answer derives from)."""
    return {
        "model": spec.model,
        "max_tokens": spec.max_tokens,
        "messages": [{"role": "user", "content": spec.prompt.replace("{{ body }}", row["body"])}],
    }


def attempt_history(db_url: str) -> dict[int, list[tuple[int, str | None]]]:
    """Every row's attempts as (attempt, error_type), read from the store's history table."""
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("select row_index, attempt, error_type from attempts")).all()
    engine.dispose()
    history: dict[int, list[tuple[int, str | None]]] = {}
    for row_index, attempt, error_type in rows:
        history.setdefault(row_index, []).append((attempt, error_type))
    return history


class Harness:
    """A store, an emulator served over loopback, and contexts wired to both."""

    def __init__(self, db_url: str, server: EmulatorServer, emulator: Emulator) -> None:
        self.db_url = db_url
        self.server = server
        self.emulator = emulator
        db.upgrade(db_url)  # as `batchpipe db upgrade` would; only SQLite files self-migrate
        self.store = Store.open(db_url)
        self.settings = Settings(database_url=db_url, api_key=SecretStr("sk-test-key"))

    @classmethod
    @contextmanager
    def serving(cls, db_url: str, *, seed: int, processing_seconds: float) -> Iterator[Harness]:
        """A harness over a fresh emulator served on a free loopback port."""
        emu = Emulator(EmulatorConfig(seed=seed, processing_seconds=processing_seconds))
        with EmulatorServer(emu, host="127.0.0.1", port=0) as server:
            harness = cls(db_url, server, emu)
            try:
                yield harness
            finally:
                harness.store.close()

    def context(self) -> pipeline.Context:
        return pipeline.Context(
            store=self.store,
            client_factory=lambda: BatchClient(
                self.settings, base_url=self.server.url, max_retries=3
            ),
            sleep=lambda s: __import__("time").sleep(min(s, 0.05)),
            orphan_grace_seconds=0.0,
        )

    def run(self, spec: JobSpec, name: str = "job") -> Any:
        ctx = self.context()
        try:
            job = pipeline.prepare(ctx, name, spec)
            return pipeline.run(ctx, job)
        finally:
            ctx.close()


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    with Harness.serving(db_url, seed=7, processing_seconds=0.2) as h:
        yield h


def spec_for(tmp_path: Path, src: Path, **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "input": str(src),
        "prompt": PROMPT,
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "id_column": "doc_id",
        "output": str(tmp_path / "out.parquet"),
        "poll_interval": 0.05,
        "max_batch_requests": 2_000,
    }
    values.update(overrides)
    return JobSpec(**values)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_ten_thousand_rows_round_trip_in_order(harness: Harness, tmp_path: Path, fmt: str) -> None:
    src = tmp_path / f"docs.{fmt}"
    rows = write_docs(src, 10_000)
    spec = spec_for(tmp_path, src)
    job = harness.run(spec)

    assert job.status == "done"
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == len(rows)
    assert out.column_names == ["doc_id", "body", "stars", *RESULT_COLUMNS]
    table = out.to_pylist()
    assert [r["doc_id"] for r in table] == [r["doc_id"] for r in rows]
    for got, row in zip(table, rows, strict=True):
        assert got["result_status"] == "succeeded"
        assert got["response_text"] == expected_text(request_params(spec, row))
        assert got["attempts"] == 1
        assert got["stars"] == row["stars"]
    batches = {r["batch_id"] for r in table}
    assert len(batches) >= 5
    assert harness.emulator.stats()["batches_created"] == len(batches)
    assert harness.emulator.stats()["duplicate_successes"] == 0


def test_transient_failures_are_resubmitted_fatal_ones_never(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 600)
    harness.emulator.configure(errored_rate=0.2, expired_rate=0.1, invalid_rate=0.05)
    spec = spec_for(tmp_path, src, max_attempts=6, max_batch_requests=250)
    job = harness.run(spec)

    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    fatal = [r for r in table if r["error_type"] == "invalid_request_error"]
    assert fatal, "the emulator should have produced some invalid_request_error results"
    assert all(r["result_status"] == "errored" for r in fatal)
    # No row was ever sent again after a fatal error: its fatal attempt is its last one.
    history = attempt_history(harness.db_url)
    for row_index, attempts in history.items():
        fatal_at = [n for n, error in attempts if error == "invalid_request_error"]
        if fatal_at:
            assert fatal_at == [max(n for n, _ in attempts)], (row_index, attempts)
    first_try_fatal = [i for i, a in history.items() if (1, "invalid_request_error") in a]
    assert first_try_fatal
    assert all(table[i]["attempts"] == 1 for i in first_try_fatal)
    retried_ok = [r for r in table if r["attempts"] > 1 and r["result_status"] == "succeeded"]
    assert len(retried_ok) > 50
    for r in table:
        # Anything that did not succeed either failed fatally or used up every attempt.
        if r["result_status"] != "succeeded" and r["error_type"] != "invalid_request_error":
            assert r["attempts"] == 6, r
    assert job.status == "done"
    assert harness.emulator.stats()["duplicate_successes"] == 0


def test_max_attempts_is_honoured(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 50)
    harness.emulator.configure(expired_rate=1.0)
    spec = spec_for(tmp_path, src, max_attempts=2)
    harness.run(spec)

    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in table} == {"expired"}
    assert {r["attempts"] for r in table} == {2}
    assert harness.emulator.stats()["requests_received"] == 100


def test_each_collected_batch_logs_its_failures_by_type(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 200)
    harness.emulator.configure(errored_rate=0.2, expired_rate=0.1, invalid_rate=0.05)
    with capture_logs() as logs:
        harness.run(spec_for(tmp_path, src, max_attempts=1))
    collected = [e for e in logs if e["event"] == "batch.collected"]
    failures: Counter[str] = Counter()
    for event in collected:
        failures.update(event["failures"])
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    # One attempt each: every failed row is one failed line, under its error (or result) type.
    expected = Counter(r["error_type"] or r["result_status"] for r in table)
    del expected["succeeded"]
    assert failures == expected
    assert {"expired", "invalid_request_error"} <= failures.keys()


def test_thinking_is_left_out_of_the_answer(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    rows = write_docs(src, 30)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    spec = spec_for(tmp_path, src, max_tokens=2048, params={"thinking": thinking})
    harness.run(spec)
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in table} == {"succeeded"}
    for row, got in zip(rows, table, strict=True):
        plain = expected_text(request_params(spec, row))  # the answer, without the thinking
        assert got["response_text"] == plain
        # The thinking was paid for: more output tokens than the answer alone.
        assert got["output_tokens"] > approx_tokens(plain)


def test_rerun_of_a_finished_job_sends_nothing(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.parquet"
    write_docs(src, 300)
    spec = spec_for(tmp_path, src)
    harness.run(spec)
    first = (tmp_path / "out.parquet").read_bytes()
    created = harness.emulator.stats()["batches_created"]

    harness.run(spec)
    assert harness.emulator.stats()["batches_created"] == created
    assert pq.read_table(tmp_path / "out.parquet").equals(pq.read_table(pa.BufferReader(first)))


def test_same_name_with_different_settings_is_refused(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 20)
    harness.run(spec_for(tmp_path, src))
    with pytest.raises(UsageError, match="different max_tokens"):
        harness.run(spec_for(tmp_path, src, max_tokens=5))


def test_retry_sends_failed_rows_again_with_new_custom_ids(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 40)
    harness.emulator.configure(invalid_rate=1.0)  # e.g. a credit or quota problem, later fixed
    job = harness.run(spec_for(tmp_path, src))
    first = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["error_type"] for r in first} == {"invalid_request_error"}

    harness.emulator.configure(invalid_rate=0.0)
    ctx = harness.context()
    count = pipeline.retry(
        ctx, job, statuses={ItemStatus.ERRORED}, error_types=["invalid_request_error"]
    )
    assert count == 40
    pipeline.run(ctx, job)
    ctx.close()

    second = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in second} == {"succeeded"}
    assert {r["attempts"] for r in second} == {2}
    old_ids = {r["custom_id"] for r in first}
    assert not old_ids & {r["custom_id"] for r in second}


def test_retry_and_resume_refuse_an_output_that_can_no_longer_be_written(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 10)
    harness.emulator.configure(invalid_rate=1.0)
    job = harness.run(spec_for(tmp_path, src, output=str(tmp_path / "exports" / "out.parquet")))
    shutil.rmtree(tmp_path / "exports")
    (tmp_path / "exports").write_text("a file where the folder was")
    ctx = harness.context()
    with pytest.raises(OutputNotWritable, match="exports"):
        pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED})
    assert ctx.store.count_items(job.id)[ItemStatus.ERRORED] == 10  # nothing requeued
    ctx.store.update_job(job.id, status=JobStatus.FAILED)
    with pytest.raises(OutputNotWritable, match="exports"):
        pipeline.resume(ctx, job)
    assert ctx.store.get_job(job.id).status == JobStatus.FAILED  # type: ignore[union-attr]
    ctx.close()


def test_export_refuses_an_input_that_changed(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 10)
    job = harness.run(spec_for(tmp_path, src, output=None))
    with src.open("ab") as fh:
        fh.write(orjson.dumps({"doc_id": "new", "body": "late row", "stars": 1}) + b"\n")
    ctx = harness.context()
    with pytest.raises(InputChangedError, match="changed since the job was ingested"):
        pipeline.export(ctx, job, str(tmp_path / "late.parquet"))
    assert not (tmp_path / "late.parquet").exists()


def test_a_job_fingerprinted_by_an_older_or_newer_batchpipe(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 10)
    job = harness.run(spec_for(tmp_path, src, output=None))
    ctx = harness.context()
    assert job.input_fingerprint is not None
    assert job.input_fingerprint.startswith("sha256:")
    # Recorded before the switch to sha256: still the same input, so the export goes on.
    data = src.read_bytes()
    older = f"blake2b:{hashlib.blake2b(data, digest_size=20).hexdigest()}:{len(data)}"
    ctx.store.update_job(job.id, input_fingerprint=older)
    job = ctx.store.get_job(job.id)
    pipeline.export(ctx, job, str(tmp_path / "old.parquet"))
    assert pq.read_table(tmp_path / "old.parquet").num_rows == 10
    # An algorithm from a later version: say so rather than call the input changed.
    ctx.store.update_job(job.id, input_fingerprint="sha3000:abc:1")
    job = ctx.store.get_job(job.id)
    with pytest.raises(StoreError, match=r"recorded by a newer version\?\); upgrade"):
        pipeline.export(ctx, job, str(tmp_path / "new.parquet"))
    assert not (tmp_path / "new.parquet").exists()
    ctx.close()


def test_export_refuses_a_job_with_rows_not_finished(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    job = harness.run(spec_for(tmp_path, src, output=None))
    ctx = harness.context()
    # Not done: refused before anything is read.
    harness.store.update_job(job.id, status=JobStatus.RUNNING)
    running = harness.store.get_job(job.id)
    assert running is not None
    with pytest.raises(UsageError, match=r"is not finished \(0 row"):
        pipeline.export(ctx, running, str(tmp_path / "early.parquet"))
    # Marked done, but a row is pending again (a retry racing the export): the rows are
    # checked as they stream, and the half-written file is removed.
    harness.store.update_job(job.id, status=JobStatus.DONE)
    engine = sa.create_engine(harness.db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE items SET status = 'pending' WHERE job_id = :j AND row_index = 17"),
            {"j": job.id},
        )
    engine.dispose()
    done = harness.store.get_job(job.id)
    assert done is not None
    with pytest.raises(UsageError, match=r"is not finished \(1 row"):
        pipeline.export(ctx, done, str(tmp_path / "late.parquet"))
    assert not list(tmp_path.glob("*late.parquet*"))


def test_a_refused_create_fails_the_run_and_the_same_command_resumes(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    spec = spec_for(tmp_path, src, max_batch_requests=10)
    harness.emulator.configure(fail_next=[400])  # the first create is refused outright
    with pytest.raises(BatchpipeError, match="400 invalid_request_error"):
        harness.run(spec)
    assert not (tmp_path / "out.parquet").exists()
    assert harness.store.get_job("job").status == "failed"

    job = harness.run(spec)  # e.g. after lowering the batch size; here the API recovered
    assert job.status == "done"
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in table} == {"succeeded"}
    assert {r["attempts"] for r in table} == {1}  # a refused create is not an attempt
    assert harness.emulator.stats()["batches_created"] == 3


@pytest.mark.parametrize(
    ("ids", "queried", "repeated"),
    [
        (["a1", "a2", "b", "b0", "c"], False, None),  # in order: no key can repeat
        (["a1", "a2", "a2", "b"], True, "a2"),  # a repeat next to itself
        (["b", "a", "c", "a"], True, "a"),  # out of order: the query finds it
        (["b", "a", "c"], True, None),  # out of order, no repeat
    ],
)
def test_ids_in_ascending_order_skip_the_duplicate_query(
    harness: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ids: list[str],
    queried: bool,
    repeated: str | None,
) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"doc_id": i, "body": "x"}) + b"\n" for i in ids))
    queries: list[int] = []
    find = Store.find_duplicate_keys

    def counted(store: Store, job_id: int, limit: int = 20) -> list[tuple[str, list[int]]]:
        queries.append(job_id)
        return find(store, job_id, limit)

    monkeypatch.setattr(Store, "find_duplicate_keys", counted)
    ctx = harness.context()
    try:
        if repeated is None:
            job = pipeline.prepare(ctx, "job", spec_for(tmp_path, src))
            assert job.row_count == len(ids)
        else:
            with pytest.raises(PreflightFailed, match=f"'{repeated}' in rows"):
                pipeline.prepare(ctx, "job", spec_for(tmp_path, src))
    finally:
        ctx.close()
    assert bool(queries) is queried


def test_finished_totals_are_the_counts_and_cost_of_the_items_as_the_run_ended(
    harness: Harness, tmp_path: Path
) -> None:
    """The end of `run` shows the counts and cost taken as the run finished the job;
    without them (the job finished before this run, or by another worker) it counts."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 300)
    harness.emulator.configure(errored_rate=0.2, expired_rate=0.1)
    ctx = harness.context()
    try:
        job = pipeline.prepare(ctx, "job", spec_for(tmp_path, src, max_attempts=1))
        job = pipeline.run(ctx, job)
        assert job.status == "done"
        counts = harness.store.count_items(job.id)
        assert counts[ItemStatus.ERRORED]
        assert counts[ItemStatus.EXPIRED]
        cost, _ = harness.store.cost_total(job.id)
        assert cost > 0
        stored = (counts, pytest.approx(cost))
        assert ctx.finished_totals == {job.id: stored}
        assert pipeline.finished_totals(ctx, job) == stored  # as the run finished it
        assert ctx.finished_totals == {}
        assert pipeline.finished_totals(ctx, job) == stored  # counted now
        # A run of the finished job finishes nothing: its counts are counted.
        job = pipeline.run(ctx, job)
        assert ctx.finished_totals == {}
        assert pipeline.finished_totals(ctx, job) == stored
    finally:
        ctx.close()
