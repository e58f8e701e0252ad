"""SIGTERM at the moments where code that rightly catches ``Exception`` is running.

The CLI's SIGTERM handler raises ``Interrupted`` wherever the main thread is. Raised inside
an API call (the SDK wraps any Exception into a connection error), inside a template's
render (a failing template is that row's problem) or inside `tick` (one job's failure, go on
to the next), it was once swallowed: the process carried on and exited 0, and a valid row
could be stored as `invalid`. Each test sends SIGTERM at such a moment and checks what a
user sees: exit 130 at once, nothing recorded wrongly, and the same command finishing the
job without paying twice.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import batchpipe_argv, job_args, run_batchpipe, write_rows

from batchpipe.emulator import Emulator

ROWS = 40
SLOW = 6.0  # seconds every API call takes while the signal is sent


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _terminate(proc: subprocess.Popen[str]) -> tuple[int, str, float]:
    """SIGTERM ``proc``; its exit code, stderr and seconds it took to exit."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr, time.monotonic() - sent


def _calls(emulator: Emulator, endpoint: str) -> int:
    return int(emulator.stats()["calls"].get(endpoint, 0))


def test_sigterm_during_a_create_exits_130_and_the_rerun_adopts_the_batch(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    out = tmp_path / "out.jsonl"
    args = job_args(src, "j", out, per_batch=ROWS)
    emulator.configure(processing_seconds=0, slow_rate=1.0, slow_seconds=SLOW)
    proc = subprocess.Popen(
        batchpipe_argv(sqlite_url, "run", *args), env=cli_env, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: _calls(emulator, "create") == 1, "the create call")
    code, stderr, took = _terminate(proc)

    assert code == 130, stderr
    assert "run the same command again to resume" in stderr
    assert took < SLOW - 1, f"exited {took:.1f} s after SIGTERM: it waited for the call"
    assert '"job.api_unavailable"' not in stderr  # the signal is not an unavailable API

    # The create was on the wire: it lands at the API all the same, and the same command
    # must adopt that batch rather than pay for the rows again.
    _wait_for(lambda: emulator.stats()["batches_created"] == 1, "the create to land")
    emulator.configure(slow_rate=0.0)
    done = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert done.returncode == 0, done.stderr
    stats = emulator.stats()
    assert stats["batches_created"] == 1
    assert stats["requests_received"] == ROWS
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [f"d{i:05d}" for i in range(ROWS)]
    assert {r["result_status"] for r in rows} == {"succeeded"}


def test_sigterm_during_tick_exits_130_without_going_on_to_the_next_job(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=0)
    for name in ("first", "second"):
        submitted = run_batchpipe(sqlite_url, cli_env, "submit", *job_args(src, name))
        assert submitted.returncode == 0, submitted.stderr
    emulator.configure(slow_rate=1.0, slow_seconds=SLOW)
    polls = _calls(emulator, "retrieve")
    proc = subprocess.Popen(
        batchpipe_argv(sqlite_url, "tick"), env=cli_env, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: _calls(emulator, "retrieve") > polls, "tick's first poll")
    code, stderr, took = _terminate(proc)

    assert code == 130, stderr
    assert "run the same command again to resume" in stderr
    assert took < SLOW - 1, f"exited {took:.1f} s after SIGTERM: it went on working"
    assert "ticked job" not in stderr
    assert "error:" not in stderr  # not reported as a job that failed


def _job_started(db: Path) -> bool:
    """Whether the job row exists: its command is past start-up and validating rows."""
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM jobs").fetchone()[0] > 0
        except sqlite3.DatabaseError:
            return False  # the schema is still being made


def test_sigterm_while_rows_render_never_stores_a_valid_row_as_invalid(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, 400)
    out = tmp_path / "out.jsonl"
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    # A template that takes ~20 ms a row: validating the rows is nearly all render time,
    # so the signal lands inside a render.
    slow = "{% for i in range(800) %}{% for j in range(800) %}{% endfor %}{% endfor %}"
    args = [
        *job_args(src, "j", out, per_batch=400),
        "--prompt", slow + "Classify: {{ body }}", "--skip-invalid", "--emulate",
    ]  # fmt: skip
    proc = subprocess.Popen(
        batchpipe_argv(url, "run", *args), env=cli_env, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: _job_started(db), "the job to start validating")
    time.sleep(0.5)
    code, stderr, _ = _terminate(proc)

    assert code == 130, stderr
    assert "template failed" not in stderr
    with contextlib.closing(sqlite3.connect(db)) as conn:
        invalid = conn.execute("SELECT count(*) FROM items WHERE status = 'invalid'").fetchone()
    assert invalid[0] == 0

    done = run_batchpipe(url, cli_env, "run", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 400
    assert {r["result_status"] for r in rows} == {"succeeded"}
