"""Crash consistency: real `batchpipe` processes killed with SIGKILL, then run again.

The emulator runs in the test process over loopback; its counters tell whether anything
was created or paid for twice. Failpoints (BATCHPIPE_FAILPOINT) stop a process at one
exact step; the chaos test kills at seeded random moments instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import batchpipe_argv, job_args, run_batchpipe, write_rows

from batchpipe.db import Store
from batchpipe.emulator import Emulator
from batchpipe.models import BatchStatus, ItemStatus

ROWS = 100
PER_BATCH = 20


def _final_counts(db_url: str, name: str) -> dict[ItemStatus, int]:
    with Store.open(db_url) as store:
        job = store.get_job(name)
        assert job is not None
        return {k: v for k, v in store.count_items(job.id).items() if v}


@pytest.fixture
def fast_emulator(emulator: Emulator) -> Emulator:
    emulator.configure(processing_seconds=0.3, seed=3)
    return emulator


@pytest.mark.parametrize(
    "point", ["after_insert_items", "after_intent", "after_create", "after_mark_created"]
)
def test_crash_at_each_submit_step_never_creates_twice(
    fast_emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path, point: str
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    killed = run_batchpipe(
        sqlite_url, {**cli_env, "BATCHPIPE_FAILPOINT": point}, "submit", *job_args(src, "j")
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    created_before = fast_emulator.stats()["batches_created"]
    assert created_before == (0 if point in {"after_insert_items", "after_intent"} else 1)

    # No grace period: whatever recovery finds at the API it must adopt, not resend.
    done = run_batchpipe(
        sqlite_url, {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "0"}, "run", *job_args(src, "j")
    )
    assert done.returncode == 0, done.stderr
    assert _final_counts(sqlite_url, "j") == {ItemStatus.SUCCEEDED: ROWS}
    stats = fast_emulator.stats()
    assert stats["batches_created"] == ROWS // PER_BATCH
    assert stats["requests_received"] == ROWS
    assert stats["duplicate_successes"] == 0
    if point == "after_create":
        assert '"batch.orphan_adopted"' in done.stderr


def test_crash_mid_download_resumes_without_duplicates(
    fast_emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, 12_000)  # more than one apply chunk (5 000) in one batch
    args = [*job_args(src, "big"), "--max-batch-requests", "12000"]
    assert run_batchpipe(sqlite_url, cli_env, "submit", *args).returncode == 0
    time.sleep(0.5)
    killed = run_batchpipe(sqlite_url, {**cli_env, "BATCHPIPE_FAILPOINT": "mid_collect"}, "tick")
    assert killed.returncode == -signal.SIGKILL
    partial = _final_counts(sqlite_url, "big")
    assert 0 < partial.get(ItemStatus.SUCCEEDED, 0) < 12_000  # some lines were stored
    assert run_batchpipe(sqlite_url, cli_env, "run", *args).returncode == 0
    assert _final_counts(sqlite_url, "big") == {ItemStatus.SUCCEEDED: 12_000}
    assert fast_emulator.stats()["requests_received"] == 12_000


def _job_state(db: Path) -> tuple[object, ...] | None:
    """The job's status, its batches' statuses and its rows by status (None before the
    job exists): what a process changes as it works."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            job = conn.execute("SELECT id, status FROM jobs").fetchone()
        except sqlite3.DatabaseError:
            return None  # the schema is not there yet, or the file is still being made
        if job is None:
            return None
        batches = conn.execute(
            "SELECT status FROM batches WHERE job_id = ? ORDER BY id", (job[0],)
        ).fetchall()
        rows = conn.execute(
            "SELECT status, count(*) FROM items WHERE job_id = ? GROUP BY status ORDER BY status",
            (job[0],),
        ).fetchall()
    return job[1], tuple(batches), tuple(rows)


def _export(path: Path) -> list[dict[str, object]]:
    # custom_id and batch_id carry a job's random token and the API's ids: they differ
    # between any two runs; every other column must match.
    rows = pq.read_table(path).to_pylist()
    return [{k: v for k, v in r.items() if k not in {"custom_id", "batch_id"}} for r in rows]


@pytest.mark.slow
def test_chaos_random_sigkills_until_done(
    fast_emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Kill `batchpipe run` at random moments, restart it, until the job is done."""
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    reference = tmp_path / "reference.parquet"
    ref_db = f"sqlite:///{tmp_path / 'ref.db'}"
    assert run_batchpipe(ref_db, cli_env, "run", *job_args(src, "ref", reference)).returncode == 0
    # The chaos run sends the very same prompts: start the counters over, so a duplicate
    # means one paid twice within the chaos run.
    fast_emulator.reset()
    # Batches that take a while and some slow calls keep every run busy long enough for the
    # kills to land mid-work, however loaded the machine is.
    fast_emulator.configure(processing_seconds=4.0, slow_rate=0.3, slow_seconds=0.2)

    chaos_file = tmp_path / "chaos.db"
    chaos_db = f"sqlite:///{chaos_file}"
    out = tmp_path / "chaos.parquet"
    # A create still on the wire when its process died may land a moment later: a short
    # grace keeps the restart from sending it again.
    env = {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "2"}
    rng = random.Random(20240601)
    kills = landed = 0
    deadline = time.monotonic() + 90
    # Each process is killed at a random moment after it has changed the job's state (its
    # status, batches or rows), so past start-up and mid-work, until three kills landed
    # while the job was not done.
    while landed < 3 and kills < 12 and time.monotonic() < deadline:
        before = _job_state(chaos_file)
        proc = subprocess.Popen(
            batchpipe_argv(chaos_db, "run", *job_args(src, "chaos", out)),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        changed_by = time.monotonic() + 15
        while _job_state(chaos_file) == before and proc.poll() is None:
            if time.monotonic() > changed_by:
                break
            time.sleep(0.05)
        # Somewhere in the next stretch of work: a create, a download, a wait, an apply.
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # it finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped, so the next process sees the lease holder is dead
        kills += 1
        after = _job_state(chaos_file)
        landed += after != before and after is not None and after[0] != "done"
    final = run_batchpipe(chaos_db, env, "run", *job_args(src, "chaos", out))
    assert final.returncode == 0, final.stderr
    assert landed >= 3, f"only {landed} of {kills} kills landed mid-work"

    assert _final_counts(chaos_db, "chaos") == {ItemStatus.SUCCEEDED: ROWS}
    assert _export(out) == _export(reference)
    after = fast_emulator.stats()
    assert after["duplicate_successes"] == 0
    assert after["requests_received"] == ROWS
    with Store.open(chaos_db) as store:
        job = store.get_job("chaos")
        assert job is not None
        assert not store.list_batches(job.id, {BatchStatus.PLANNED, BatchStatus.IN_PROGRESS})


@pytest.mark.parametrize("point", ["before_requeue", "after_requeue"])
def test_retry_killed_midway_leaves_a_job_the_same_commands_finish(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path, point: str
) -> None:
    """`retry` writes twice (the job, its rows); a kill between the two once left a `done`
    job with pending rows that `run`, `tick` and `retry` all passed by, for good."""
    emulator.configure(processing_seconds=0, errored_rate=0.3, seed=3)
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    out = tmp_path / "out.jsonl"
    args = [*job_args(src, "j", out), "--max-attempts", "1", "--max-failed", "100%"]
    first = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert first.returncode == 0, first.stderr
    failed = sum('"result_status":"errored"' in line for line in out.read_text().splitlines())
    assert failed > 0

    emulator.configure(errored_rate=0.0)
    killed = run_batchpipe(sqlite_url, {**cli_env, "BATCHPIPE_FAILPOINT": point}, "retry", "j")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The user runs the interrupted command again, then the job's command.
    again = run_batchpipe(sqlite_url, cli_env, "retry", "j")
    assert again.returncode == 0, again.stderr
    done = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert done.returncode == 0, done.stderr

    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [f"d{i:05d}" for i in range(ROWS)]
    assert {r["result_status"] for r in rows} == {"succeeded"}
    assert _final_counts(sqlite_url, "j") == {ItemStatus.SUCCEEDED: ROWS}
    assert emulator.stats()["requests_received"] == ROWS + failed  # each failed row once more
