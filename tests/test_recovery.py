"""Crash recovery and cancel, end to end: real `batchpipe` processes against the emulator.

Covers what `test_crash.py` does not: an orphan whose create reached the API twice, orphans
that can no longer be told apart (`needs_attention`), and `batchpipe cancel` on a job with
batches in flight. The emulator runs in the test process over loopback; its counters and
batches show what was created, canceled or paid for.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pyarrow.parquet as pq
from conftest import env_for, job_args, run_batchpipe, write_rows

from batchpipe.db import Store
from batchpipe.emulator import Emulator, EmulatorConfig, EmulatorServer
from batchpipe.models import BatchStatus, ItemStatus, JobStatus

ROWS = 100
PER_BATCH = 20
DAY = 86_400.0


def _events(stderr: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event in a subprocess's stderr."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def _planned_batch(db_url: str, name: str) -> tuple[int, list[str]]:
    """The job's one planned batch: its id and the custom_ids recorded in its intent."""
    with Store.open(db_url) as store:
        job = store.get_job(name)
        assert job is not None
        (planned,) = store.list_batches(job.id, {BatchStatus.PLANNED})
        ids = [
            i.custom_id
            for i in store.iter_items(job.id, statuses={ItemStatus.SUBMITTED})
            if i.batch_id == planned.id and i.custom_id is not None
        ]
    return planned.id, ids


def _crash_after_create(
    emulator: Emulator, cli_env: dict[str, str], db_url: str, src: Path, name: str
) -> str:
    """`submit` killed right after the API accepted its first batch; returns that batch's id."""
    killed = run_batchpipe(
        db_url, {**cli_env, "BATCHPIPE_FAILPOINT": "after_create"}, "submit",
        *job_args(src, name),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert emulator.stats()["batches_created"] == 1
    with emulator.locked() as api:
        (orphan,) = api.batches
    return orphan


def _same_requests_again(emulator: Emulator, client: anthropic.Anthropic, orphan: str) -> str:
    """Create a second batch with exactly the orphan's requests, as a create that reached the
    API twice would; returns its id."""
    with emulator.locked() as api:
        sent = [(item.custom_id, item.params) for item in api.batches[orphan].items]
    assert all(params is not None for _, params in sent)  # still in progress: params kept
    emulator.advance(1)  # strictly younger than the orphan
    twin = client.messages.batches.create(
        requests=[{"custom_id": cid, "params": orjson.loads(p or "{}")} for cid, p in sent]
    )
    return twin.id


def test_a_create_interrupted_before_it_was_sent_says_when_it_goes_again(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    args = job_args(src, "j")
    failpoint = {**cli_env, "BATCHPIPE_FAILPOINT": "after_intent"}
    killed = run_batchpipe(sqlite_url, failpoint, "submit", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert emulator.stats()["batches_created"] == 0
    ticked = run_batchpipe(sqlite_url, {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "600"}, "tick")
    assert ticked.returncode == 0, ticked.stderr
    (pending,) = _events(ticked.stderr, "batch.orphan_pending")
    assert 590 <= pending["resend_in_s"] <= 600
    status = run_batchpipe(sqlite_url, cli_env, "status", "j", "--json")
    (job,) = json.loads(status.stdout)["jobs"]
    assert "sent again when BATCHPIPE_ORPHAN_GRACE" in job["next_action"]
    # With the grace passed, the rows go out once, under the intent's custom_ids.
    done = run_batchpipe(sqlite_url, {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "0"}, "run", *args)
    assert done.returncode == 0, done.stderr
    assert emulator.stats()["requests_received"] == ROWS


# ---------------------------------------------------------------------- adoption


def test_orphan_created_twice_adopts_the_oldest_and_answers_each_row_once(
    emulator: Emulator,
    cli_env: dict[str, str],
    anthropic_client: anthropic.Anthropic,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    src = tmp_path / "docs.jsonl"
    out = tmp_path / "out.parquet"
    write_rows(src, ROWS)
    # Slow enough that both copies are still in progress (their params readable) until
    # the clock is moved on below.
    emulator.configure(processing_seconds=600, seed=5)
    oldest = _crash_after_create(emulator, cli_env, sqlite_url, src, "twice")
    _, members = _planned_batch(sqlite_url, "twice")
    twin = _same_requests_again(emulator, anthropic_client, oldest)
    emulator.advance(700)  # both copies end; either one's results confirm the orphan
    emulator.configure(processing_seconds=0.3)  # the rest of the job goes quickly

    done = run_batchpipe(
        sqlite_url, {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "0"}, "run",
        *job_args(src, "twice", out),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    (duplicate,) = _events(done.stderr, "batch.orphan_duplicate")
    assert duplicate["level"] == "error"
    assert sorted(duplicate["api_batch_ids"]) == sorted([oldest, twin])
    (adopted,) = _events(done.stderr, "batch.orphan_adopted")
    assert adopted["api_batch_id"] == oldest  # the list returns the twin first (newest)
    assert adopted["confirmed"] is True

    rows = pq.read_table(out).to_pylist()
    assert [r["doc_id"] for r in rows] == [f"d{i:05d}" for i in range(ROWS)]
    assert {r["result_status"] for r in rows} == {"succeeded"}
    assert all(r["response_text"] for r in rows)
    by_cid = {r["custom_id"]: r for r in rows}
    assert {by_cid[cid]["batch_id"] for cid in members} == {oldest}
    stats = emulator.stats()
    # Only the twin was paid twice; batchpipe itself sent every other row once.
    assert stats["requests_received"] == ROWS + PER_BATCH
    assert stats["batches_created"] == ROWS // PER_BATCH + 1
    assert stats["duplicate_successes"] == PER_BATCH
    with Store.open(sqlite_url) as store:
        assert twin not in store.known_api_batch_ids()


def _crash_with_a_lagging_api(
    tmp_path: Path, sqlite_url: str, name: str, *, lag: float, caught_up: bool
) -> tuple[Emulator, str, subprocess.CompletedProcess[str]]:
    """Crash right after create against an API whose clock is ``lag`` s behind this host's,
    then `run` again (the API's clock moved on by ``lag`` first if ``caught_up``).

    Returns the emulator, the orphan's id and the second run.
    """
    lagging = Emulator(
        EmulatorConfig(seed=3, processing_seconds=0.3), clock=lambda: time.time() - lag
    )
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    with EmulatorServer(lagging, host="127.0.0.1", port=0) as server:
        env = env_for(server.url)
        orphan = _crash_after_create(lagging, env, sqlite_url, src, name)
        if caught_up:
            lagging.advance(lag)
        done = run_batchpipe(
            sqlite_url, {**env, "BATCHPIPE_ORPHAN_GRACE": "0"}, "run",
            *job_args(src, name, tmp_path / "out.parquet"),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return lagging, orphan, done


def test_an_orphan_is_found_when_our_clock_runs_ahead_of_the_api(
    sqlite_url: str, tmp_path: Path
) -> None:
    # The API's clock is 10 minutes behind this host's: the orphan's created_at is 10
    # minutes before the intent our clock recorded, outside the 5-minute window. Unless
    # the window follows the API's clock, the batch is sent again and paid for twice.
    lagging, orphan, done = _crash_with_a_lagging_api(
        tmp_path, sqlite_url, "skewed", lag=600, caught_up=False
    )
    assert lagging.stats()["requests_received"] == ROWS  # nothing was sent twice
    (widened,) = _events(done.stderr, "batch.orphan_window_widened")
    assert 595 <= widened["clock_lag_seconds"] <= 605
    (adopted,) = _events(done.stderr, "batch.orphan_adopted")
    assert (adopted["api_batch_id"], adopted["confirmed"]) == (orphan, True)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in rows} == {"succeeded"}


def test_an_orphan_is_found_after_the_clocks_were_brought_together(
    sqlite_url: str, tmp_path: Path
) -> None:
    # At the crash the API's clock was 11 minutes behind this host's; by the restart the
    # two agree (NTP stepped one of them): no gap measured now explains why the orphan is
    # older than the window, and the last look before paying again must find it.
    lagging, orphan, done = _crash_with_a_lagging_api(
        tmp_path, sqlite_url, "stepped", lag=660, caught_up=True
    )
    assert lagging.stats()["requests_received"] == ROWS  # nothing was sent twice
    assert not _events(done.stderr, "batch.orphan_window_widened")  # no gap left to see
    (adopted,) = _events(done.stderr, "batch.orphan_adopted")
    assert (adopted["api_batch_id"], adopted["confirmed"]) == (orphan, True)


# ---------------------------------------------------------------------- needs_attention


def test_unreadable_orphan_candidates_stop_the_job_as_needs_attention(
    emulator: Emulator,
    cli_env: dict[str, str],
    anthropic_client: anthropic.Anthropic,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=600, seed=6)
    orphan = _crash_after_create(emulator, cli_env, sqlite_url, src, "lost")
    twin = _same_requests_again(emulator, anthropic_client, orphan)
    emulator.advance(30 * DAY)  # nobody looked for a month: both results are archived
    before = emulator.stats()
    env = {**cli_env, "BATCHPIPE_ORPHAN_GRACE": "0"}

    for _ in range(2):  # and it stays that way: a later tick must not guess either
        ticked = run_batchpipe(sqlite_url, env, "tick", "--job", "lost")
        assert ticked.returncode == 1, ticked.stderr
        assert "can no longer be read" in ticked.stderr  # why, and what to do next:
        assert orphan in ticked.stderr
        assert twin in ticked.stderr
        assert "batchpipe status lost" in ticked.stderr

    shown = run_batchpipe(sqlite_url, cli_env, "status", "lost", "--json")
    assert shown.returncode == 0, shown.stderr
    (job,) = json.loads(shown.stdout)["jobs"]
    assert job["status"] == JobStatus.NEEDS_ATTENTION.value
    assert orphan in job["error"]
    assert twin in job["error"]
    assert job["counts"]["submitted"] == PER_BATCH
    assert job["counts"]["pending"] == ROWS - PER_BATCH
    assert [b["status"] for b in job["batches"]] == [BatchStatus.PLANNED.value]
    after = emulator.stats()
    assert after["batches_created"] == before["batches_created"] == 2  # nothing resubmitted
    assert after["requests_received"] == before["requests_received"]

    # A human decides: the archived answers are lost either way, so send the batch again.
    emulator.configure(processing_seconds=0.1)
    resumed = run_batchpipe(sqlite_url, env, "resume", "lost", "--resend")
    assert resumed.returncode == 0, resumed.stderr
    assert emulator.stats()["batches_created"] == 3
    for _ in range(40):
        ticked = run_batchpipe(sqlite_url, env, "tick", "--job", "lost")
        assert ticked.returncode == 0, ticked.stderr
        (job,) = json.loads(run_batchpipe(sqlite_url, env, "status", "lost", "--json").stdout)[
            "jobs"
        ]
        if job["status"] == JobStatus.DONE.value:
            break
    assert job["status"] == JobStatus.DONE.value
    assert job["counts"]["succeeded"] == ROWS


# ---------------------------------------------------------------------- cancel


def test_cancel_through_the_cli_cancels_in_flight_batches_and_keeps_answers(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    out = tmp_path / "out.parquet"
    write_rows(src, ROWS)
    # Round 1 ends quickly, with some rows failing transiently ...
    emulator.configure(processing_seconds=0.2, errored_rate=0.3, seed=8)
    assert run_batchpipe(sqlite_url, cli_env, "submit", *job_args(src, "stop")).returncode == 0
    emulator.advance(1)
    emulator.stats()  # results are drawn when a batch is first seen ended: draw them now
    # ... and their resubmission (round 2) takes an hour: in flight when the cancel comes.
    emulator.configure(processing_seconds=3600, errored_rate=0.0, cancel_seconds=0.1)
    ticked = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "stop")
    assert ticked.returncode == 0, ticked.stderr
    with Store.open(sqlite_url) as store:
        job = store.get_job("stop")
        assert job is not None
        answered = {
            i.row_index: i.response_text
            for i in store.iter_items(job.id, statuses={ItemStatus.SUCCEEDED})
        }
        in_flight = [
            str(b.api_batch_id) for b in store.list_batches(job.id, {BatchStatus.IN_PROGRESS})
        ]
    assert 0 < len(answered) < ROWS
    assert len(in_flight) == -(-(ROWS - len(answered)) // PER_BATCH)
    emulator.advance(1800)  # about half of each round-2 batch is processed
    received = emulator.stats()["requests_received"]
    assert received == 2 * ROWS - len(answered)

    canceled = run_batchpipe(sqlite_url, cli_env, "cancel", "stop")
    assert canceled.returncode == 0, canceled.stderr
    assert emulator.stats()["calls"]["cancel"] == len(in_flight)
    with emulator.locked() as api:
        assert all(api.batches[b].cancel_initiated_at is not None for b in in_flight)
    again = run_batchpipe(sqlite_url, cli_env, "cancel", "stop")  # while still canceling
    assert again.returncode == 0, again.stderr

    emulator.advance(1)  # the cancels have ended at the API
    drained = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "stop")
    assert drained.returncode == 0, drained.stderr
    once_more = run_batchpipe(sqlite_url, cli_env, "cancel", "stop")  # after it ended
    assert once_more.returncode == 0, once_more.stderr
    assert emulator.stats()["calls"]["cancel"] == len(in_flight)
    assert emulator.stats()["requests_received"] == received  # canceled rows never went again

    with Store.open(sqlite_url) as store:
        job = store.get_job("stop")
        assert job is not None
        assert job.status == JobStatus.CANCELED
    exported = run_batchpipe(sqlite_url, cli_env, "export", "stop", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["doc_id"] for r in rows] == [f"d{i:05d}" for i in range(ROWS)]
    for index, text in answered.items():
        assert rows[index]["result_status"] == "succeeded"
        assert rows[index]["response_text"] == text
    late = [r for i, r in enumerate(rows) if i not in answered]
    statuses = [r["result_status"] for r in late]
    assert set(statuses) == {"succeeded", "canceled"}  # processed before the cut, or not
    assert all(r["response_text"] is None for r in late if r["result_status"] == "canceled")


def test_cancel_goes_on_past_a_batch_that_ended_since_the_last_poll(
    emulator: Emulator,
    cli_env: dict[str, str],
    anthropic_client: anthropic.Anthropic,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """The API refuses to cancel an ended batch; that must not stop the cancel of the rest."""
    src = tmp_path / "docs.jsonl"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=3600, cancel_seconds=0.1, seed=9)
    assert run_batchpipe(sqlite_url, cli_env, "submit", *job_args(src, "race")).returncode == 0
    with Store.open(sqlite_url) as store:
        job = store.get_job("race")
        assert job is not None
        first, *rest = (str(b.api_batch_id) for b in store.list_batches(job.id))
    assert len(rest) == ROWS // PER_BATCH - 1
    # Someone canceled the first batch at the Console; it has ended, unseen by batchpipe.
    anthropic_client.messages.batches.cancel(first)
    emulator.advance(1)
    assert anthropic_client.messages.batches.retrieve(first).processing_status == "ended"

    canceled = run_batchpipe(sqlite_url, cli_env, "cancel", "race")
    assert canceled.returncode == 0, canceled.stderr
    with emulator.locked() as api:
        assert all(api.batches[b].cancel_initiated_at is not None for b in rest)
    emulator.advance(1)
    drained = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "race")
    assert drained.returncode == 0, drained.stderr
    with Store.open(sqlite_url) as store:
        job = store.get_job("race")
        assert job is not None
        assert job.status == JobStatus.CANCELED
        counts = {k: v for k, v in store.count_items(job.id).items() if v}
    assert set(counts) <= {ItemStatus.SUCCEEDED, ItemStatus.CANCELED}
    assert sum(counts.values()) == ROWS
    assert emulator.stats()["requests_received"] == ROWS


def _an_orphan_window(
    env: dict[str, str], emulator: Emulator, tmp_path: Path
) -> tuple[str, str, list[str], list[str]]:
    """Our job "ours" killed after recording its intent, before its create went out (an
    orphan window of one batch of ROWS), and the makings of "theirs", a job of the same size
    on another state database: our db, theirs, and the two jobs' arguments."""
    emulator.configure(processing_seconds=3600)
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    write_rows(ours, ROWS)
    theirs.write_text(ours.read_text().replace("review", "other"))
    our_db, their_db = (f"sqlite:///{tmp_path / n}" for n in ("ours.db", "theirs.db"))
    args = job_args(ours, "ours", tmp_path / "out.parquet", per_batch=ROWS)
    killed = run_batchpipe(our_db, {**env, "BATCHPIPE_FAILPOINT": "after_intent"}, "submit", *args)
    assert killed.returncode == -signal.SIGKILL
    their_args = job_args(theirs, "theirs", tmp_path / "theirs.parquet", per_batch=ROWS)
    return our_db, their_db, args, their_args


def test_a_batch_adopted_by_mistake_is_given_back_and_the_rows_are_sent(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """Another state database on the same API account has a running batch of the size of
    our orphan, whose create never left: recovery adopts it unconfirmed, and its results
    prove it someone else's. That once stopped the job as needs_attention for good (resume
    collected the same batch again; --resend wanted a planned batch)."""
    env = env_for(emulator_server.url)
    out = tmp_path / "out.parquet"
    our_db, their_db, args, their_args = _an_orphan_window(env, emulator, tmp_path)
    assert run_batchpipe(their_db, env, "submit", *their_args).returncode == 0

    adopted = run_batchpipe(our_db, env, "tick")
    assert adopted.returncode == 0, adopted.stderr
    assert [e["confirmed"] for e in _events(adopted.stderr, "batch.orphan_adopted")] == [False]
    emulator.advance(3600)  # their batch ends
    emulator.configure(processing_seconds=0)

    given_back = run_batchpipe(our_db, env, "tick")
    assert given_back.returncode == 0, given_back.stderr
    assert len(_events(given_back.stderr, "batch.orphan_disowned")) == 1
    done = run_batchpipe(our_db, {**env, "BATCHPIPE_ORPHAN_GRACE": "0"}, "run", *args)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["doc_id"] for r in rows] == [f"d{i:05d}" for i in range(ROWS)]
    assert {r["result_status"] for r in rows} == {"succeeded"}
    assert all("review" in r["body"] for r in rows)

    # Their job is untouched: its batch answers their rows, nothing was paid twice.
    assert run_batchpipe(their_db, env, "run", *their_args).returncode == 0
    stats = emulator.stats()
    assert stats["batches_created"] == 2
    assert stats["requests_received"] == 2 * ROWS
    assert stats["duplicate_successes"] == 0


def test_a_canceling_job_never_cancels_a_batch_it_cannot_confirm_is_its_own(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """Each step of a canceling job cancels its batches in progress. An orphan of the same
    size created in the window, which a running job adopts before its results confirm it,
    may be another state database's (same API key): a canceling job waits until it ends."""
    env = env_for(emulator_server.url)
    our_db, their_db, _, their_args = _an_orphan_window(env, emulator, tmp_path)
    canceled = run_batchpipe(our_db, env, "cancel", "ours")
    assert canceled.returncode == 0, canceled.stderr
    assert run_batchpipe(their_db, env, "submit", *their_args).returncode == 0
    ticked = run_batchpipe(our_db, env, "tick")
    assert ticked.returncode == 0, ticked.stderr
    assert _events(ticked.stderr, "batch.orphan_adopted") == []
    assert _events(ticked.stderr, "batch.orphan_ambiguous")
    with emulator.locked() as api:
        assert all(b.cancel_initiated_at is None for b in api.batches.values())
