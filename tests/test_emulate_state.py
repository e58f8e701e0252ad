"""`--emulate` processes sharing one state database, and batches the API no longer knows.

The in-process emulator keeps its batches in a file beside the SQLite database, so a
`submit --emulate` and a later `tick --emulate` see the same batches. Two such processes at
once must not lose each other's batches; and a batch the API answers 404 for (deleted in the
Console, another key's workspace) must be said, with what to do, not look like waiting.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import batchpipe_argv, env_for, job_args, run_batchpipe

from batchpipe.cli.wiring import emulator_state_path
from batchpipe.db import JobRow, Store
from batchpipe.emulator import Emulator
from batchpipe.models import ItemStatus, JobStatus

if TYPE_CHECKING:
    import anthropic


def _inputs(tmp_path: Path, names: list[str], rows: int) -> None:
    for name in names:
        # Different prompts per job, so each job's requests are its own.
        lines = (orjson.dumps({"doc_id": f"d{i}", "body": f"{name} {i}"}) for i in range(rows))
        (tmp_path / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _submit(db: str, tmp_path: Path, name: str) -> subprocess.Popen[str]:
    src, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.parquet"
    argv = batchpipe_argv(db, "submit", "--emulate", *job_args(src, name, out, per_batch=5))
    return subprocess.Popen(
        argv, env=env_for("http://unused.invalid"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _tick(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batchpipe_argv(db, "tick", "--emulate", *args),
        env=env_for("http://unused.invalid"), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def _submit_gone(tmp_path: Path, cli_env: dict[str, str]) -> tuple[str, JobRow, list[str]]:
    """Submit the job "gone" (10 rows, two batches of 5) against the test's emulator: the
    state database's URL, the job, and the API ids of its batches."""
    db = f"sqlite:///{tmp_path / 'state.db'}"
    _inputs(tmp_path, ["gone"], rows=10)
    src, out = tmp_path / "gone.jsonl", tmp_path / "gone.parquet"
    submitted = run_batchpipe(db, cli_env, "submit", *job_args(src, "gone", out, per_batch=5))
    assert submitted.returncode == 0, submitted.stderr
    with Store.open(db) as store:
        job = store.get_job("gone")
        assert job is not None
        sent = [b.api_batch_id for b in store.list_batches(job.id) if b.api_batch_id]
    return db, job, sent


def _wait_ended(client: anthropic.Anthropic, batch_ids: list[str]) -> None:
    """Until the API says every one of ``batch_ids`` has ended (they end on its clock)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {client.messages.batches.retrieve(b).processing_status for b in batch_ids}
        if states == {"ended"}:
            return
        time.sleep(0.05)
    raise AssertionError(f"batches {batch_ids} never ended")


@pytest.mark.slow
def test_two_emulate_processes_at_once_keep_each_others_batches(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'state.db'}"
    names = ["left", "right", "middle"]
    _inputs(tmp_path, names, rows=10)
    started = [_submit(db, tmp_path, name) for name in names]
    for proc in started:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    # Before: the last process to exit wrote its own view of the emulator over the others';
    # their batches then answered 404 at every tick, and `status` said to wait.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ticked = _tick(db)
        assert ticked.returncode == 0, ticked.stderr
        with Store.open(db) as store:
            jobs = [store.get_job(name) for name in names]
        if all(j is not None and j.status == JobStatus.DONE for j in jobs):
            break
        time.sleep(0.5)
    for name in names:
        assert pq.read_table(tmp_path / f"{name}.parquet").num_rows == 10, name
    state = Emulator.load(emulator_state_path(db)).stats()
    assert state["batches_created"] == 6
    assert state["requests_received"] == 30


@pytest.mark.slow
def test_a_batch_the_api_no_longer_knows_stops_the_job_and_says_what_to_do(
    tmp_path: Path,
    emulator: Emulator,
    anthropic_client: anthropic.Anthropic,
    cli_env: dict[str, str],
) -> None:
    emulator.configure(processing_seconds=0.2)
    db, _, sent = _submit_gone(tmp_path, cli_env)
    out = tmp_path / "gone.parquet"
    first = sent[0]
    _wait_ended(anthropic_client, sent)  # both batches ended at the API, not yet polled
    anthropic_client.messages.batches.delete(first)  # as in the Console

    # Before: exit 1 on "404 not_found_error" at every tick while `status` said to wait.
    ticked = run_batchpipe(db, cli_env, "tick", "--job", "gone")
    assert ticked.returncode == 1, ticked.stderr
    assert f"batch {first} (batch 1, 5 requests) is not found at the API (404)" in ticked.stderr
    assert "another workspace or organization" in ticked.stderr
    assert "`batchpipe resume gone --resend` sends its rows again" in ticked.stderr
    status = run_batchpipe(db, cli_env, "status", "gone", "--json")
    (shown,) = json.loads(status.stdout)["jobs"]
    assert shown["status"] == "needs_attention"
    assert "resume gone" in shown["next_action"]
    assert "not found at the API" in shown["error"]

    resumed = run_batchpipe(db, cli_env, "resume", "gone", "--resend")
    assert resumed.returncode == 0, resumed.stderr
    for _ in range(40):
        ticked = run_batchpipe(db, cli_env, "tick", "--job", "gone")
        assert ticked.returncode == 0, ticked.stderr
        if out.exists():
            break
        time.sleep(0.2)
    table = pq.read_table(out).to_pylist()
    assert [r["result_status"] for r in table] == ["succeeded"] * 10
    # The lost batch's five rows went out again; the other batch's were not resent.
    assert emulator.stats()["requests_received"] == 15


@pytest.mark.slow
def test_a_batch_lost_while_the_job_is_canceled_does_not_stop_the_cancel(
    tmp_path: Path,
    emulator: Emulator,
    anthropic_client: anthropic.Anthropic,
    cli_env: dict[str, str],
) -> None:
    # A day: each item finishes at a random point of it, and at 60 s one of ten often
    # finished in the seconds before the cancel on a busy machine (then 9 canceled).
    emulator.configure(processing_seconds=86_400, cancel_seconds=0.1)
    db, job, sent = _submit_gone(tmp_path, cli_env)
    canceled = run_batchpipe(db, cli_env, "cancel", "gone")
    assert canceled.returncode == 0, canceled.stderr
    assert len(sent) == 2
    _wait_ended(anthropic_client, sent)
    anthropic_client.messages.batches.delete(sent[0])

    # Before: the tick turned the canceling job into needs_attention (exit 1), and the
    # `resume` it suggested would have put a job the user canceled back to running.
    ticked = run_batchpipe(db, cli_env, "tick", "--job", "gone")
    assert ticked.returncode == 0, ticked.stderr
    status = run_batchpipe(db, cli_env, "status", "gone", "--json")
    (shown,) = json.loads(status.stdout)["jobs"]
    assert shown["status"] == "canceled", shown
    with Store.open(db) as store:
        assert {k: v for k, v in store.count_items(job.id).items() if v} == {
            ItemStatus.CANCELED: 10
        }
    assert emulator.stats()["requests_received"] == 10  # nothing was sent again


def test_cancel_of_a_job_whose_batch_was_deleted_at_the_api(
    tmp_path: Path,
    emulator: Emulator,
    anthropic_client: anthropic.Anthropic,
    cli_env: dict[str, str],
) -> None:
    """A batch canceled and deleted in the Console before batchpipe polled it: `cancel`
    used to exit 1 on the 404 (the job half canceled); it cancels the rest and the next
    tick ends the job canceled, with nothing sent again."""
    # A day: each item finishes at a random point of it, and at 60 s one of ten often
    # finished in the seconds before the cancel on a busy machine (then 9 canceled).
    emulator.configure(processing_seconds=86_400, cancel_seconds=0.1)
    db, job, sent = _submit_gone(tmp_path, cli_env)
    assert len(sent) == 2
    anthropic_client.messages.batches.cancel(sent[0])  # in the Console, say
    _wait_ended(anthropic_client, sent[:1])
    anthropic_client.messages.batches.delete(sent[0])

    canceled = run_batchpipe(db, cli_env, "cancel", "gone")
    assert canceled.returncode == 0, canceled.stderr
    ticked = run_batchpipe(db, cli_env, "tick", "--job", "gone")
    assert ticked.returncode == 0, ticked.stderr
    status = run_batchpipe(db, cli_env, "status", "gone", "--json")
    (shown,) = json.loads(status.stdout)["jobs"]
    assert shown["status"] == "canceled", shown
    with Store.open(db) as store:
        counts = {k: v for k, v in store.count_items(job.id).items() if v}
    # The deleted batch's 5 rows are canceled; the other batch's rows were canceled at the
    # API, or answered before the cancel reached them (collected, not lost).
    assert set(counts) <= {ItemStatus.CANCELED, ItemStatus.SUCCEEDED}, counts
    assert sum(counts.values()) == 10
    assert counts[ItemStatus.CANCELED] >= 5
    assert emulator.stats()["requests_received"] == 10  # nothing was sent again
