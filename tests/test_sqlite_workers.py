"""Many workers at once on one SQLite file: overlapping `submit`, `run` and `tick` processes.

The README's cron example promises that overlapping ticks are safe on the default SQLite
state file. Real processes race here against one emulator server: the `submit` and `run` a
user starts must end 0 (a tick must never lock them out of the job they are creating), each
tick 0 or 75 ("try again later", a job was busy), never 1; no row may be lost, and the
emulator must have received each request once (its counters against the batches the
database recorded).
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from conftest import batchpipe_argv, job_args

from batchpipe.db import Store
from batchpipe.emulator import Emulator
from batchpipe.models import ItemStatus, JobStatus

# name: (command, rows, requests per batch): many batches, so many collects.
JOBS = {
    "alpha": ("submit", 120, 20),
    "beta": ("submit", 120, 20),
    "gamma": ("run", 120, 20),
}
TICKERS = 3
DEADLINE_S = 60.0
# One more writer takes the file's write lock for 5 ms in every 10 (the workers' own writes
# are short and rarely meet by chance): the workers' transactions keep finding the lock held,
# and each must wait for it, never fail.
HOLD_S, GAP_S = 0.005, 0.005


@dataclass
class Ran:
    """One finished process: what it was (``tick``, ``submit alpha`` …) and how it ended."""

    what: str
    result: subprocess.CompletedProcess[str]

    def problem(self) -> str | None:
        """Why this exit is wrong: a user's command must succeed, a tick may also say 75."""
        allowed = (0, 75) if self.what == "tick" else (0,)
        if self.result.returncode in allowed:
            return None
        return f"{self.what} exited {self.result.returncode}: {self.result.stderr.strip()[-600:]}"


def _ticker(argv: list[str], env: dict[str, str], stop: threading.Event, runs: list[Ran]) -> None:
    """`batchpipe tick` over and over, as overlapping cron runs would, only faster."""
    while not stop.is_set():
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        runs.append(Ran("tick", done))


def _hog(path: str, stop: threading.Event) -> None:
    """Take the write lock for HOLD_S every GAP_S until told to stop."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(HOLD_S)
            conn.execute("ROLLBACK")
            time.sleep(GAP_S)
    finally:
        conn.close()


def _failures(runs: list[Ran]) -> list[str]:
    return [p for p in (r.problem() for r in runs) if p is not None]


@pytest.mark.slow
def test_overlapping_workers_on_one_sqlite_file(
    sqlite_url: str, emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    emulator.configure(processing_seconds=0.5, seed=3)
    for name, (_, rows, _) in JOBS.items():
        # Different prompts per job: the emulator counts a prompt billed twice as a duplicate.
        lines = (orjson.dumps({"doc_id": f"d{i}", "body": f"{name} {i}"}) for i in range(rows))
        (tmp_path / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    env = {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "600"}

    def start(name: str) -> subprocess.Popen[str]:
        command, _, per_batch = JOBS[name]
        src, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.parquet"
        argv = batchpipe_argv(sqlite_url, command, *job_args(src, name, out, per_batch))
        return subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    with Store.open(sqlite_url):
        pass  # a migrated file before the hog opens it
    stop = threading.Event()
    runs: list[Ran] = []
    threads = [
        threading.Thread(target=_ticker, args=(batchpipe_argv(sqlite_url, "tick"), env, stop, runs))
        for _ in range(TICKERS)
    ]
    threads.append(threading.Thread(target=_hog, args=(sqlite_url.split(":///", 1)[1], stop)))
    started = {name: start(name) for name in JOBS}
    for t in threads:
        t.start()
    try:
        for name, proc in started.items():
            out, err = proc.communicate(timeout=DEADLINE_S)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            runs.append(Ran(f"{JOBS[name][0]} {name}", done))
        deadline = time.monotonic() + DEADLINE_S
        with Store.open(sqlite_url) as store:
            while time.monotonic() < deadline and not _failures(runs):
                jobs = [store.get_job(n) for n in JOBS]
                if all(j is not None and j.status.is_terminal() for j in jobs):
                    break
                time.sleep(0.2)
    finally:
        stop.set()
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
        for t in threads:
            t.join(timeout=DEADLINE_S)

    assert _failures(runs) == []
    requests_recorded = batches_recorded = 0
    with Store.open(sqlite_url) as store:
        for name, (_, rows, per_batch) in JOBS.items():
            job = store.get_job(name)
            assert job is not None
            assert job.status == JobStatus.DONE, (name, job.status, job.error)
            counts = {k: v for k, v in store.count_items(job.id).items() if v}
            assert counts == {ItemStatus.SUCCEEDED: rows}, name
            sent = [b for b in store.list_batches(job.id) if b.api_batch_id is not None]
            assert len(sent) == rows // per_batch, name
            requests_recorded += sum(b.request_count for b in sent)
            batches_recorded += len(sent)
    stats = emulator.stats()
    assert stats["requests_received"] == requests_recorded == sum(r for _, r, _ in JOBS.values())
    assert stats["batches_created"] == batches_recorded
    assert stats["duplicate_successes"] == 0
