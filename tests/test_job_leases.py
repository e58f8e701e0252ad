"""A user's `run`/`submit` against a cron `tick` on the same database: who holds the job.

A job is recorded before its rows are validated. A `tick` that took it in that gap used to
validate the whole input while holding the lease (minutes at a million rows), and the user's
command failed with JobLocked (exit 75) right after starting. The job is now born leased to
its creator, and `run`/`submit` keep that lease until they end; a tick only validates a job
whose creator's lease lapsed (it died).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
from batchpipe.errors import JobLocked
from batchpipe.models import JobSpec, JobStatus
from batchpipe.pipeline.context import default_owner
from batchpipe.pipeline.ingest import open_job
from batchpipe.procs import pid_home, this_host


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


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_a_dead_holder_whose_pid_is_ours_to_judge_is_taken_over_at_once(
    store: Store, emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    job = open_job(context(store, emulator_server, "creator:1:a"), "j", spec(tmp_path))
    store.release_lease(job.id, "creator:1:a")
    assert store.acquire_lease(job.id, f"{pid_home()}:{_dead_pid()}:dead", 300)
    assert context(store, emulator_server, default_owner()).try_lease(job)


@pytest.mark.parametrize(
    "home",
    [
        pytest.param(lambda: f"{this_host()}/00000000", id="same-host-other-pid-namespace"),
        pytest.param(this_host, id="same-host-name-no-scope"),
    ],
)
def test_a_holder_on_a_host_of_the_same_name_is_left_until_its_lease_runs_out(
    store: Store,
    emulator_server: EmulatorServer,
    tmp_path: Path,
    home: Callable[[], str],
) -> None:
    """A container sharing the host name (host networking) numbers its processes apart: a
    pid alive there may be unused here. Taking its lease over had two processes work one
    job; now only the lease's end frees the job, and the refusal says when."""
    job = open_job(context(store, emulator_server, "creator:1:a"), "j", spec(tmp_path))
    store.release_lease(job.id, "creator:1:a")
    holder = f"{home()}:{_dead_pid()}:live"
    assert store.acquire_lease(job.id, holder, 300)
    ctx = context(store, emulator_server, default_owner())
    assert not ctx.try_lease(job)
    with pytest.raises(JobLocked) as refused, ctx.lease(job):
        pass
    held = store.get_job(job.id)
    assert held is not None
    assert held.lease_owner == holder
    assert held.lease_until is not None
    assert f"({holder})" in str(refused.value)
    assert f"the job is free from {held.lease_until:%Y-%m-%d %H:%M:%S} UTC" in str(refused.value)
