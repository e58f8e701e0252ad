"""A user's `run`/`submit` against a cron `tick` on the same database: who holds the job.

A job is recorded before its rows are validated. A `tick` that took it in that gap used to
validate the whole input while holding the lease (minutes at a million rows), and the user's
command failed with JobLocked (exit 75) right after starting. The job is now born leased to
its creator, and `run`/`submit` keep that lease until they end; a tick only validates a job
whose creator's lease lapsed (it died).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_rows
from pydantic import SecretStr

from batchpipe import db, pipeline
from batchpipe.client import BatchClient
from batchpipe.config import Settings
from batchpipe.db import Store
from batchpipe.emulator import EmulatorServer
from batchpipe.models import JobSpec, JobStatus
from batchpipe.pipeline.ingest import open_job


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    db.upgrade(db_url)
    with Store.open(db_url) as opened:
        yield opened


def context(
    store: Store, server: EmulatorServer, owner: str, ttl: float = 300.0
) -> pipeline.Context:
    settings = Settings(database_url="sqlite://", api_key=SecretStr("sk-test-key"))
    return pipeline.Context(
        store=store,
        client_factory=lambda: BatchClient(settings, base_url=server.url, max_retries=0),
        owner=owner,
        sleep=lambda s: time.sleep(min(s, 0.05)),
        lease_ttl_seconds=ttl,
    )


def spec(tmp_path: Path, rows: int = 5) -> JobSpec:
    write_rows(tmp_path / "in.jsonl", rows)
    return JobSpec(
        input=str(tmp_path / "in.jsonl"), prompt="Classify: {{ body }}",
        model="claude-haiku-4-5", max_tokens=16, id_column="doc_id",
        output=str(tmp_path / "out.parquet"), poll_interval=0.05,
    )  # fmt: skip


def test_a_tick_leaves_a_job_just_recorded_to_the_command_that_records_it(
    store: Store, emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    user = context(store, emulator_server, "user-host:1:a")
    cron = context(store, emulator_server, "cron-host:2:b")
    job = open_job(user, "j", spec(tmp_path))  # recorded, rows not validated yet

    report = pipeline.tick(cron)
    # Before: the tick took the job, validated its input under the lease, and the user's
    # command, arriving for the lease, failed with JobLocked.
    assert [j.name for j in report.locked] == ["j"]
    assert report.advanced == []
    assert report.failed == []
    fresh = store.get_job(job.id)
    assert fresh is not None
    assert not fresh.ingested
    assert fresh.row_count == 0

    with user.keeping_leases():
        job = pipeline.prepare(user, "j", spec(tmp_path))
        # Between validating and running, the command keeps the job too.
        assert [j.name for j in pipeline.tick(cron).locked] == ["j"]
        job = pipeline.run(user, job)
    assert job.status == JobStatus.DONE
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 5
    after = store.get_job(job.id)
    assert after is not None
    assert after.lease_owner is None


def test_a_tick_validates_a_job_whose_creator_lease_lapsed(
    store: Store, emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    # The creator ran on another host and died: its lease is only known to be stale once
    # it expires (on this host a dead pid is noticed at once: test_unvalidated_jobs).
    creator = context(store, emulator_server, "elsewhere:1:a", ttl=0.05)
    job = open_job(creator, "j", spec(tmp_path, rows=3))
    time.sleep(0.1)

    report = pipeline.tick(context(store, emulator_server, "cron-host:2:b"))
    assert [j.name for j in report.advanced] == ["j"], report
    fresh = store.get_job(job.id)
    assert fresh is not None
    assert fresh.ingested
    assert fresh.row_count == 3
