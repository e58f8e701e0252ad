"""HTTP faults and the API's clock: retried with backoff, never a crash, never paid twice.

Everything goes through the real SDK against the emulator over loopback, with a real SQLite
store. The emulator only fails a create *before* creating the batch, so any second batch for
the same rows would show in its ``batches_created`` / ``requests_received`` counters.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import batchpipe_argv, write_rows
from pydantic import SecretStr
from structlog.testing import capture_logs

from batchpipe import errors, pipeline
from batchpipe.client import BatchClient
from batchpipe.config import Settings
from batchpipe.db import JobRow, Store
from batchpipe.emulator import Emulator, EmulatorConfig, EmulatorServer
from batchpipe.models import BatchStatus, ItemStatus, JobSpec, JobStatus

ROWS = 120


@pytest.fixture
def emu() -> Emulator:
    return Emulator(EmulatorConfig(seed=11, processing_seconds=0.2, retry_after=0.01))


@pytest.fixture
def server(emu: Emulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emu, host="127.0.0.1", port=0) as srv:
        yield srv


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    with Store.open(sqlite_url) as s:
        yield s


def _client(server: EmulatorServer, max_retries: int = 3) -> BatchClient:
    client = BatchClient(
        Settings(api_key=SecretStr("sk-test-key")), base_url=server.url, max_retries=max_retries
    )
    client.create_retry_base = 0.01
    return client


def _context(store: Store, server: EmulatorServer) -> pipeline.Context:
    # batchpipe's clock follows the emulator's, as ours and the real API's agree.
    emu = server.emulator
    return pipeline.Context(
        store=store,
        client_factory=lambda: _client(server),
        clock=lambda: datetime.fromtimestamp(emu.now(), UTC),
        sleep=lambda s: time.sleep(min(s, 0.02)),
        orphan_grace_seconds=0.0,
    )


def _spec(tmp_path: Path, **overrides: object) -> JobSpec:
    src = tmp_path / "docs.jsonl"
    if not src.exists():
        write_rows(src, ROWS)
    values: dict[str, object] = {
        "input": str(src),
        "prompt": "Classify: {{ body }}",
        "model": "claude-haiku-4-5",
        "max_tokens": 32,
        "id_column": "doc_id",
        "output": str(tmp_path / "out.parquet"),
        "poll_interval": 0.02,
        "max_batch_requests": 20,
    }
    values.update(overrides)
    return JobSpec.model_validate(values)


def _body(n: int) -> bytes:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return orjson.dumps({"requests": [{"custom_id": f"c-{i}", "params": params} for i in range(n)]})


# ---------------------------------------------------------------------- create never doubles


@pytest.mark.parametrize("status", [500, 504, 408])
def test_uncertain_create_failure_is_not_resent(
    server: EmulatorServer, emu: Emulator, status: int
) -> None:
    """A 500 or timeout may hide a created batch: one try, then TransientAPIError."""
    emu.configure(fail_next=[status])
    with _client(server) as client, pytest.raises(errors.TransientAPIError):
        client.create(_body(2), count=2)
    assert emu.stats()["calls"]["create"] == 1
    assert emu.stats()["batches_created"] == 0


def test_refused_create_honours_retry_after(server: EmulatorServer, emu: Emulator) -> None:
    emu.configure(fail_next=[429, 529, 503], retry_after=0.25)
    waits: list[float] = []
    with _client(server) as client:
        client.sleep = waits.append
        batch = client.create(_body(3), count=3)
    assert batch.request_counts.processing == 3
    assert waits[0] == 0.25  # the 429's retry-after, to the letter
    assert len(waits) == 3
    assert emu.stats()["batches_created"] == 1


def test_refused_create_gives_up_after_max_retries(server: EmulatorServer, emu: Emulator) -> None:
    emu.configure(fail_next=[529, 529, 529])
    with _client(server, max_retries=2) as client, pytest.raises(errors.TransientAPIError):
        client.create(_body(1), count=1)
    assert emu.stats()["calls"]["create"] == 3
    assert emu.stats()["batches_created"] == 0


# ---------------------------------------------------------------------- whole runs under faults


def test_run_completes_with_thirty_percent_of_calls_failing(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    emu.configure(http_429_rate=0.1, http_500_rate=0.1, http_529_rate=0.1, results_break_rate=0.2)
    ctx = _context(store, server)
    spec = _spec(tmp_path)
    job = pipeline.run(ctx, pipeline.prepare(ctx, "faulty", spec))
    ctx.close()

    assert job.status == JobStatus.DONE
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["doc_id"] for r in table] == [f"d{i:05d}" for i in range(ROWS)]
    assert {r["result_status"] for r in table} == {"succeeded"}
    stats = emu.stats()
    failed = sum(stats["faults"].get(f"http_{c}", 0) for c in (429, 500, 529))
    assert failed >= 5
    assert failed / stats["http_requests"] > 0.15  # about 30% of every call failed
    assert stats["duplicate_successes"] == 0
    assert stats["requests_received"] == ROWS  # no row was ever sent twice
    assert stats["batches_created"] == len(store.list_batches(job.id, {BatchStatus.COLLECTED}))


def test_tick_exits_75_while_the_api_is_unavailable(
    store: Store, sqlite_url: str, emu: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    # cli_env talks to its own server; point it at this test's emulator instead.
    with EmulatorServer(emu, host="127.0.0.1", port=0) as srv:
        env = {**cli_env, "ANTHROPIC_BASE_URL": srv.url}
        ctx = _context(store, srv)
        pipeline.prepare(ctx, "down", _spec(tmp_path))
        ctx.close()
        emu.configure(http_529_rate=1.0)
        down = subprocess.run(
            batchpipe_argv(sqlite_url, "tick", "--job", "down"),
            check=False, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert down.returncode == 75, down.stderr
        assert "unavailable for now, will retry" in down.stderr
        assert emu.stats()["batches_created"] == 0
        emu.configure(http_529_rate=0.0)
        up = subprocess.run(
            batchpipe_argv(sqlite_url, "tick", "--job", "down"),
            check=False, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert emu.stats()["requests_received"] == ROWS


# ---------------------------------------------------------------------- the API's clock


def _step_until(ctx: pipeline.Context, name: str, done: JobStatus, steps: int = 200) -> None:
    job = ctx.store.get_job(name)
    assert job is not None
    for _ in range(steps):
        with ctx.lease(job):
            job = pipeline.step(ctx, job)
        if job.status == done:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {name} still {job.status}")


def test_near_expiry_warns_and_expired_items_are_sent_again(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    # Every batch needs 30 h, so part of it expires at 24 h.
    emu.configure(processing_seconds=30 * 3600)
    ctx = _context(store, server)
    job = pipeline.prepare(ctx, "slow", _spec(tmp_path, max_batch_requests=ROWS))
    with ctx.lease(job):
        pipeline.step(ctx, job)
    emu.advance(23 * 3600)
    with capture_logs() as logs, ctx.lease(job):
        pipeline.step(ctx, job)
    warned = [e for e in logs if e["event"] == "batch.near_expiry"]
    assert warned
    assert 0 < warned[0]["hours_left"] < 2
    emu.advance(3600 + 1)
    emu.configure(processing_seconds=0.1)  # the resubmission is quick
    _step_until(ctx, "slow", JobStatus.DONE)
    ctx.close()
    counts = {k: v for k, v in store.count_items(job.id).items() if v}
    assert counts == {ItemStatus.SUCCEEDED: ROWS}
    received = emu.stats()["requests_received"]
    assert ROWS < received < 2 * ROWS  # only the expired share went again
    assert emu.stats()["results_expired"] == received - ROWS


def test_expiry_is_measured_on_the_api_clock_not_ours(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    emu.configure(processing_seconds=30 * 3600)
    ctx = _context(store, server)
    ctx.clock = lambda: datetime.now(UTC)  # this host's clock; the API's runs 23 h ahead
    job = pipeline.prepare(ctx, "skewed", _spec(tmp_path, max_batch_requests=ROWS))
    with ctx.lease(job):
        pipeline.step(ctx, job)
    emu.advance(23 * 3600)
    with capture_logs() as logs, ctx.lease(job):
        pipeline.step(ctx, job)
    ctx.close()
    (warned,) = [e for e in logs if e["event"] == "batch.near_expiry"]
    assert 0.9 < warned["hours_left"] < 1.01


def test_results_archived_before_collection_are_reported_loudly(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    ctx = _context(store, server)
    job = pipeline.prepare(ctx, "late", _spec(tmp_path))
    with ctx.lease(job):
        pipeline.step(ctx, job)  # submitted
    emu.advance(30 * 24 * 3600)  # nobody ran tick for a month
    with capture_logs() as logs:
        _step_until(ctx, "late", JobStatus.DONE)
    ctx.close()
    assert [e for e in logs if e["event"] == "batch.archived_before_collection"]
    assert all(e["log_level"] == "error" for e in logs if e["event"].startswith("batch.arch"))
    items = list(store.iter_items(job.id))
    assert {i.status for i in items} == {ItemStatus.ERRORED}
    assert {i.error_type for i in items} == {"results_archived"}
    assert emu.stats()["requests_received"] == ROWS  # reported, not silently paid again


def _half_done(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> tuple[pipeline.Context, JobRow]:
    """Job "stop" submitted in batches of an hour's work each, half an hour on."""
    emu.configure(processing_seconds=3600, cancel_seconds=0.1)
    ctx = _context(store, server)
    job = pipeline.prepare(ctx, "stop", _spec(tmp_path))
    with ctx.lease(job):
        pipeline.step(ctx, job)
    emu.advance(1800)  # about half of each batch is done
    return ctx, job


def test_cancel_cancels_in_flight_batches_and_records_every_item(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    ctx, job = _half_done(store, server, emu, tmp_path)
    job = pipeline.cancel(ctx, job)
    assert emu.stats()["calls"]["cancel"] == ROWS // 20
    _step_until(ctx, "stop", JobStatus.CANCELED)
    ctx.close()
    counts = {k: v for k, v in store.count_items(job.id).items() if v}
    assert set(counts) == {ItemStatus.SUCCEEDED, ItemStatus.CANCELED}
    assert sum(counts.values()) == ROWS
    assert emu.stats()["requests_received"] == ROWS


def test_a_cancel_cut_short_is_finished_by_the_next_step(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    """`cancel` exits 75 when the API is overloaded ("try later"). Before, no step sent the
    cancels it had not: the job stayed canceling while its batches ran on, paid for, until
    a second `cancel`; cron's `tick` never finished it."""
    ctx, job = _half_done(store, server, emu, tmp_path)
    emu.configure(http_529_rate=1.0)
    with pytest.raises(errors.TransientAPIError):
        pipeline.cancel(ctx, job)
    assert store.list_batches(job.id, {BatchStatus.CANCELING}) == []
    emu.configure(http_529_rate=0.0)
    job = store.get_job(job.id)  # type: ignore[assignment]
    assert job.status == JobStatus.CANCELING
    with ctx.lease(job):
        pipeline.step(ctx, job)  # a tick: sends the cancels
    assert len(store.list_batches(job.id, {BatchStatus.IN_PROGRESS})) == 0
    _step_until(ctx, "stop", JobStatus.CANCELED)
    ctx.close()
    counts = {k: v for k, v in store.count_items(job.id).items() if v}
    assert set(counts) == {ItemStatus.SUCCEEDED, ItemStatus.CANCELED}
    assert counts[ItemStatus.CANCELED] > ROWS // 4  # the unprocessed half, not paid for
    assert emu.stats()["requests_received"] == ROWS


def test_retry_while_the_job_is_being_canceled_is_refused_as_not_now(
    store: Store, server: EmulatorServer, emu: Emulator, tmp_path: Path
) -> None:
    """It was an input error (exit 1) where resume says "not now" (exit 2)."""
    emu.configure(processing_seconds=3600, cancel_seconds=600)
    ctx = _context(store, server)
    job = pipeline.prepare(ctx, "stop", _spec(tmp_path))
    with ctx.lease(job):
        pipeline.step(ctx, job)
    job = pipeline.cancel(ctx, job)
    assert job.status == JobStatus.CANCELING
    with pytest.raises(errors.UsageError) as refused:
        pipeline.retry(ctx, job, statuses={ItemStatus.CANCELED})
    assert refused.value.exit_code == 2
    assert str(refused.value) == (
        "job 1 (stop) is being canceled; wait until it is canceled (`batchpipe tick` drains "
        "it), then retry (`--status canceled` sends its canceled rows too)"
    )
    emu.advance(600)
    _step_until(ctx, "stop", JobStatus.CANCELED)
    ctx.close()
    # Nothing was requeued by the refused retry: every row ended canceled, none sent again.
    assert {k: v for k, v in store.count_items(job.id).items() if v} == {ItemStatus.CANCELED: ROWS}
    assert emu.stats()["requests_received"] == ROWS
