"""Many workers at once: overlapping `batchpipe tick` processes on one PostgreSQL database.

Four real processes race on a job of many batches. The job lease (compare-and-set on the job
row) must let exactly one of them submit and never lose an update; the emulator's counters
show any request sent twice.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import batchpipe_argv, write_rows

from batchpipe import db
from batchpipe.db import Store
from batchpipe.emulator import Emulator
from batchpipe.models import BatchStatus, ItemStatus, JobStatus

ROWS = 600
PER_BATCH = 25
WORKERS = 4


def _worker(argv: list[str], env: dict[str, str], stop: threading.Event, codes: list[int]) -> None:
    """Tick over and over (as overlapping cron runs would, only faster) until told to stop."""
    while not stop.is_set():
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        codes.append(done.returncode)
        if done.returncode not in (0, 75):  # 75: busy or the API is down; try again
            stop.set()
            raise AssertionError(done.stderr)


@pytest.mark.slow
@pytest.mark.postgres
def test_four_tick_workers_never_submit_twice(
    postgres_url: str, emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    emulator.configure(processing_seconds=0.5, seed=5, http_429_rate=0.05, http_500_rate=0.05)
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    db.upgrade(postgres_url)
    env = {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "2"}
    # Ingest only (no step), so the workers race for the very first submission too.
    submit = subprocess.run(
        batchpipe_argv(
            postgres_url, "submit", str(src), "--job", "many",
            "--prompt", "Classify: {{ body }}", "--model", "claude-haiku-4-5",
            "--max-tokens", "16", "--id-column", "doc_id",
            "--max-batch-requests", str(PER_BATCH),
        ),
        env={**env, "BATCHPIPE_FAILPOINT": "after_intent"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    # Killed right after recording the first intent: the workers inherit an orphan too.
    assert submit.returncode == -9, submit.stderr

    stop = threading.Event()
    codes: list[int] = []
    argv = batchpipe_argv(postgres_url, "tick", "--job", "many")
    workers = [
        threading.Thread(target=_worker, args=(argv, env, stop, codes)) for _ in range(WORKERS)
    ]
    for w in workers:
        w.start()
    try:
        with Store.open(postgres_url) as store:
            deadline = time.monotonic() + 150
            while not stop.is_set() and time.monotonic() < deadline:
                job = store.get_job("many")
                if job is not None and job.status.is_terminal():
                    break
                time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert set(codes) <= {0, 75}
    assert 75 in codes  # the workers really overlapped: some found the job busy

    with Store.open(postgres_url) as store:
        job = store.get_job("many")
        assert job is not None
        assert job.status == JobStatus.DONE
        counts = {k: v for k, v in store.count_items(job.id).items() if v}
        assert counts == {ItemStatus.SUCCEEDED: ROWS}
        collected = store.list_batches(job.id, {BatchStatus.COLLECTED})
    stats = emulator.stats()
    assert stats["requests_received"] == ROWS  # no row submitted twice
    assert stats["batches_created"] == len(collected) == ROWS // PER_BATCH
    assert stats["duplicate_successes"] == 0
