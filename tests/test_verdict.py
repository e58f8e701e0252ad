"""A finished job's exit code: rows without an answer against ``--max-failed``.

Real `batchpipe` processes and the official SDK against the emulator over loopback; the
emulator's invalid_rate makes rows come back errored (invalid_request_error, never resent).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
import pytest
from conftest import job_args, run_batchpipe, write_rows

from batchpipe.db import JobRow, Store
from batchpipe.emulator import Emulator
from batchpipe.models import ItemStatus, JobSpec, JobStatus
from batchpipe.pipeline import rows_failed

ROWS = 40
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _spec(max_failed: object) -> JobSpec:
    required = {"input": "in.jsonl", "prompt": "p", "model": "m", "max_tokens": 1}
    return JobSpec.model_validate({**required, "max_failed": max_failed})


@pytest.mark.parametrize(
    ("max_failed", "rows", "allowed"),
    [
        (None, 40, 39),  # unset: fail only when no row got an answer
        (None, 1, 0),
        (None, 0, 0),
        ("0", 40, 0),
        (7, 40, 7),  # a job file's integer
        ("7%", 100, 7),  # not 7.000000000000001 or 6.999…
        ("0.5%", 1000, 5),
        ("12.5%", 10, 1),  # rounded down: never more than the share given
        ("100%", 3, 3),
    ],
)
def test_max_failed_is_a_count_or_a_share_of_the_rows(
    max_failed: object, rows: int, allowed: int
) -> None:
    assert _spec(max_failed).failed_rows_allowed(rows) == allowed


@pytest.mark.parametrize("bad", ["lots", "-1", "5 %", "101%", "1e3", True])
def test_a_max_failed_that_is_neither_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="give a count of rows"):
        _spec(bad)


def _statuses(out: Path) -> list[str]:
    return [str(r["result_status"]) for r in pq.read_table(out).to_pylist()]


def test_every_row_exported_without_an_answer_counts_against_max_failed(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    with src.open("ab") as fh:
        fh.write(b'{"doc_id": "blank", "body": null}\n')  # sent never: invalid
    # One try per row, so transient errors and expiries are final; max_tokens 2 cuts every
    # answer short: succeeded but truncated, which is an answer all the same.
    emulator.configure(
        processing_seconds=0, errored_rate=0.2, expired_rate=0.15, invalid_rate=0.1, seed=5
    )
    args = [*job_args(src, "mixed", out), "--skip-invalid", "--max-attempts", "1"]
    args[args.index("--max-tokens") + 1] = "2"
    strict = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", "0")
    assert strict.returncode == 1, strict.stderr

    exported = pq.read_table(out).to_pylist()
    answered = [r for r in exported if r["result_status"] == "succeeded"]
    assert answered
    assert all(r["truncated"] for r in answered)
    unanswered = Counter(r["result_status"] for r in exported if r["response_text"] is None)
    assert set(unanswered) == {"errored", "expired", "invalid"}  # the mix this test is about
    assert unanswered.total() + len(answered) == ROWS + 1
    by_status = ", ".join(f"{status} {n}" for status, n in sorted(unanswered.items()))
    assert (
        f"{unanswered.total()} of {ROWS + 1} rows ended without an answer ({by_status}), "
        "more than --max-failed 0 allows (0)"
    ) in strict.stderr
    # Under cron or Airflow the limit comes from the job file: the advice names both.
    assert "raise --max-failed (max_failed in a job file) to accept them" in strict.stderr
    # Exactly as many as the limit allows pass: nothing else was counted.
    exact = run_batchpipe(
        sqlite_url, cli_env, "run", *args, "--max-failed", str(unanswered.total())
    )
    assert exact.returncode == 0, exact.stderr


def test_answers_that_do_not_fit_the_schema_count_against_max_failed(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, 6)
    emulator.configure(processing_seconds=0)
    args = [*job_args(src, "labels", out), "--labels", "good,bad"]
    args[args.index("--max-tokens") + 1] = "4"  # every tool call is cut off: no label
    ran = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert ran.returncode == 1, ran.stderr
    assert _statuses(out) == ["invalid_output"] * 6
    assert "no row got an answer (6 rows: invalid_output 6)" in ran.stderr


def test_rows_canceled_at_the_api_do_not_count_against_max_failed(
    emulator: Emulator,
    cli_env: dict[str, str],
    sqlite_url: str,
    tmp_path: Path,
    anthropic_client: anthropic.Anthropic,
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=3600, cancel_seconds=0.1)
    args = [*job_args(src, "halted", out, per_batch=ROWS), "--max-attempts", "1"]
    submitted = run_batchpipe(sqlite_url, cli_env, "submit", *args, "--max-failed", "0")
    assert submitted.returncode == 0, submitted.stderr
    emulator.advance(1800)  # about half the batch is answered ...
    (batch,) = anthropic_client.messages.batches.list().data
    anthropic_client.messages.batches.cancel(batch.id)  # ... when someone cancels it
    emulator.advance(1)
    done = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", "0")
    assert done.returncode == 0, done.stderr  # no try left: canceled rows stay canceled
    statuses = Counter(_statuses(out))
    assert set(statuses) == {"succeeded", "canceled"}
    (job,) = json.loads(run_batchpipe(sqlite_url, cli_env, "status", "--json").stdout)["jobs"]
    assert job["status"] == "done"


def test_a_run_where_no_row_was_answered_exits_1_after_writing_its_output(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=0, invalid_rate=1.0)  # e.g. a model id mistyped
    ran = run_batchpipe(sqlite_url, cli_env, "run", *job_args(src, "bad", out))
    assert ran.returncode == 1, ran.stderr
    assert "no row got an answer (40 rows: errored 40)" in ran.stderr
    assert "`batchpipe report bad` groups the errors" in ran.stderr
    shown = run_batchpipe(sqlite_url, cli_env, "status", "bad", "--json")
    (job,) = json.loads(shown.stdout)["jobs"]
    assert "more rows failed than the job's --max-failed allows" in job["next_action"]
    # The output is there to look at: every row, with its error.
    assert _statuses(out) == ["errored"] * ROWS
    created = emulator.stats()["batches_created"]

    # Running it again (an Airflow retry) says the same and sends nothing.
    again = run_batchpipe(sqlite_url, cli_env, "run", *job_args(src, "bad", out))
    assert again.returncode == 1, again.stderr
    assert "no row got an answer" in again.stderr
    assert emulator.stats()["batches_created"] == created


def test_max_failed_decides_and_a_later_run_may_change_it(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=0, invalid_rate=0.3, seed=4)
    args = job_args(src, "some", out)
    within = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert within.returncode == 0, within.stderr  # the default tolerates any but all
    failed = _statuses(out).count("errored")
    assert 0 < failed < ROWS
    created = emulator.stats()["batches_created"]

    over = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", str(failed - 1))
    assert over.returncode == 1, over.stderr
    assert (
        f"{failed} of {ROWS} rows ended without an answer (errored {failed}), "
        f"more than --max-failed {failed - 1} allows ({failed - 1})"
    ) in over.stderr
    assert f"the output {out} has each row's error" in over.stderr
    # The limit is kept with the job: the same command without the flag still fails ...
    kept = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert kept.returncode == 1, kept.stderr
    # ... until a run gives a limit the failures fit: exactly as many, as a share.
    share = f"{100 * failed / ROWS}%"
    ok = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", share)
    assert ok.returncode == 0, ok.stderr
    assert emulator.stats()["batches_created"] == created  # only the verdict changed


def test_max_failed_default_puts_a_jobs_limit_back_to_the_default(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=0, invalid_rate=0.3, seed=4)
    args = job_args(src, "strict", out)
    strict = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", "0")
    assert strict.returncode == 1, strict.stderr
    assert "more than --max-failed 0 allows (0)" in strict.stderr

    reset = run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", "Default")
    assert reset.returncode == 0, reset.stderr  # some rows answered: the default passes
    # Stored as unset, not as the word: later runs without the option keep the default.
    with Store.open(sqlite_url) as store:
        (job,) = store.list_jobs()
        assert job.spec["max_failed"] is None
    again = run_batchpipe(sqlite_url, cli_env, "run", *args)
    assert again.returncode == 0, again.stderr

    # A run that changes the requests (re-sending the rows) keeps a limit it is not given,
    # and puts the default back when told to, like any other run.
    run_batchpipe(sqlite_url, cli_env, "run", *args, "--max-failed", "0")
    reworded = [*args]
    reworded[reworded.index("Classify: {{ body }}")] = "Label: {{ body }}"
    kept = run_batchpipe(sqlite_url, cli_env, "run", *reworded, "--yes")
    assert kept.returncode == 1, kept.stderr
    assert "more than --max-failed 0 allows (0)" in kept.stderr
    reworded[reworded.index("Label: {{ body }}")] = "Tag: {{ body }}"
    back = run_batchpipe(sqlite_url, cli_env, "run", *reworded, "--yes", "--max-failed", "default")
    assert back.returncode == 0, back.stderr
    assert 0 < _statuses(out).count("errored") < ROWS  # rows did fail, within the default

    shown = run_batchpipe(sqlite_url, cli_env, "run", "--help")
    assert "--max-failed N|P%|default" in shown.stdout
    assert "'default' puts that back" in " ".join(shown.stdout.split())


def test_max_failed_default_clears_a_stored_limit_and_unset_keeps_it() -> None:
    assert _spec("default").failed_rows_allowed(40) == 39
    assert _spec("default").max_failed_over("5") is None
    assert _spec(None).max_failed_over("5") == "5"
    assert _spec("2%").max_failed_over("5") == "2%"


def test_the_tick_that_finishes_a_failed_job_exits_1_once_and_by_name_always(
    emulator: Emulator, cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "docs.jsonl", tmp_path / "out.parquet"
    write_rows(src, ROWS)
    emulator.configure(processing_seconds=0, invalid_rate=1.0)
    submitted = run_batchpipe(sqlite_url, cli_env, "submit", *job_args(src, "cron", out))
    assert submitted.returncode == 0, submitted.stderr
    ticked = run_batchpipe(sqlite_url, cli_env, "tick")
    assert ticked.returncode == 1, ticked.stderr
    assert "error: job 1 (cron): no row got an answer" in ticked.stderr
    assert _statuses(out) == ["errored"] * ROWS  # exported by that tick all the same
    # Cron hears it once; the job is done and the next tick has nothing to do.
    quiet = run_batchpipe(sqlite_url, cli_env, "tick")
    assert quiet.returncode == 0, quiet.stderr
    assert "no row got an answer" not in quiet.stderr
    # Asked for by name (an Airflow sensor, retried or cleared), it keeps failing, as run does.
    for _ in range(2):
        named = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "cron")
        assert named.returncode == 1, named.stderr
        assert "no row got an answer" in named.stderr


def test_canceled_rows_do_not_let_a_job_without_answers_pass() -> None:
    """8 canceled by the user and 2 errored: no row got an answer, so the default fails."""
    job = JobRow(
        id=1, name="j", token="0123456789", status=JobStatus.DONE,
        spec=_spec(None).model_dump(), input_fingerprint="fp", row_count=10,
        invalid_count=0, error=None, created_at=NOW, updated_at=NOW, lease_owner=None,
        lease_until=None, exported_at=None,
    )  # fmt: skip
    counts = {ItemStatus.CANCELED: 8, ItemStatus.ERRORED: 2, ItemStatus.SUCCEEDED: 0}
    assert rows_failed(job, counts) is not None
    assert rows_failed(job, {**counts, ItemStatus.SUCCEEDED: 1, ItemStatus.ERRORED: 1}) is None


def test_a_bad_max_failed_is_a_usage_error(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, 3)
    ran = run_batchpipe(sqlite_url, cli_env, "run", *job_args(src, "x"), "--max-failed", "most")
    assert ran.returncode == 2, ran.stderr
    assert "max_failed 'most': give a count of rows (e.g. 0 or 25)" in ran.stderr
    assert "or default for the default" in ran.stderr
