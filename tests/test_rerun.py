"""Sending rows again: a re-run with new settings is all or nothing, and after a retry or
re-run `tick` writes the output again.

The pipeline runs through the SDK against the loopback emulator (test_pipeline's Harness);
the crash is a real process killed with SIGKILL at a failpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import run_batchpipe
from test_pipeline import Harness, spec_for

from batchpipe import pipeline
from batchpipe.cli import cli
from batchpipe.db import JobRow, upgrade
from batchpipe.errors import UsageError
from batchpipe.models import ItemStatus, JobSpec, JobStatus

if TYPE_CHECKING:
    from batchpipe.emulator import Emulator, EmulatorServer

# More rows than the store writes per executemany chunk (5,000), so a re-run that commits
# per chunk would have lost answers before reaching the last row.
ROWS = 5_200


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    with Harness.serving(db_url, seed=5, processing_seconds=0.2) as h:
        yield h


def write_notes(path: Path, n: int, *, last_without_note: bool = False) -> None:
    """JSONL rows with a `note` column (missing from the last row if asked)."""
    lines = []
    for i in range(n):
        row: dict[str, Any] = {"doc_id": f"d{i:05d}", "body": f"review {i}", "note": f"n{i}"}
        if last_without_note and i == n - 1:
            del row["note"]
        lines.append(orjson.dumps(row) + b"\n")
    path.write_bytes(b"".join(lines))


def current(harness: Harness, job_id: int) -> JobRow:
    job = harness.store.get_job(job_id)
    assert job is not None
    return job


def snapshot(harness: Harness, job_id: int) -> list[tuple[Any, ...]]:
    """Every item's state that a lost answer or a half-done re-queue would change."""
    return [
        (i.row_index, i.status, i.custom_id, i.response_text, i.cost_usd, i.attempts)
        for i in harness.store.iter_items(job_id)
    ]


def assert_untouched(harness: Harness, job_id: int, before: list[Any], spec: JobSpec) -> None:
    assert snapshot(harness, job_id) == before
    job = current(harness, job_id)
    assert job.status is JobStatus.DONE
    assert job.spec["prompt"] == spec.prompt
    counts = harness.store.count_items(job_id)
    assert counts[ItemStatus.SUCCEEDED] == ROWS
    assert counts[ItemStatus.PENDING] == 0


def test_a_rerun_whose_last_row_fails_to_render_changes_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_notes(src, ROWS, last_without_note=True)
    first = spec_for(tmp_path, src, max_batch_requests=5_000)
    job = harness.run(first)
    before = snapshot(harness, job.id)
    # Every row's request changes, and the very last row cannot render (no `note`).
    changed = first.model_copy(update={"prompt": "{{ note }}: {{ body }}"})
    ctx = harness.context()
    try:
        with pytest.raises(UsageError, match=rf"row {ROWS} does not render.*nothing was changed"):
            pipeline.prepare(ctx, "job", changed, confirm_rerun=True)
    finally:
        ctx.close()
    assert_untouched(harness, job.id, before, first)
    assert current(harness, job.id).exported_at is not None


def kill_rerun_half_way(harness: Harness, changed: JobSpec) -> subprocess.CompletedProcess[str]:
    """Re-run the job with ``changed`` in a real process, killed (SIGKILL) right after the
    first 5,000 rows were re-queued (uncommitted)."""
    code = (
        "import sys\n"
        "from batchpipe import pipeline\n"
        "from batchpipe.db import Store\n"
        "from batchpipe.models import JobSpec\n"
        "store = Store.open(sys.argv[1])\n"
        "ctx = pipeline.Context(store=store, client_factory=lambda: 1 / 0)\n"
        "spec = JobSpec.model_validate_json(sys.argv[2])\n"
        "pipeline.prepare(ctx, 'job', spec, confirm_rerun=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, harness.db_url, changed.model_dump_json()],
        env={**os.environ, "BATCHPIPE_FAILPOINT": "mid_rerun"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rerun_to_the_end(harness: Harness, changed: JobSpec) -> JobRow:
    """The same command again after a killed re-run: every row pending, then run to the end."""
    ctx = harness.context()
    try:
        job = pipeline.prepare(ctx, "job", changed, confirm_rerun=True)
        assert job.status is JobStatus.RUNNING
        assert harness.store.count_items(job.id)[ItemStatus.PENDING] == ROWS
        return pipeline.run(ctx, job)
    finally:
        ctx.close()


def test_a_rerun_killed_half_way_changes_nothing_and_the_same_command_completes_it(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_notes(src, ROWS)
    first = spec_for(tmp_path, src, max_batch_requests=5_000)
    job = harness.run(first)
    before = snapshot(harness, job.id)
    sent = harness.emulator.stats()["requests_received"]
    changed = first.model_copy(update={"prompt": "Summarize: {{ body }}"})

    killed = kill_rerun_half_way(harness, changed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_untouched(harness, job.id, before, first)

    # The same command again (the dead process's lease is taken over) does the whole re-run.
    job = rerun_to_the_end(harness, changed)
    assert job.status is JobStatus.DONE
    assert harness.emulator.stats()["requests_received"] == sent + ROWS
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["attempts"] for r in table} == {2}
    assert {r["result_status"] for r in table} == {"succeeded"}


def test_tick_exports_again_after_a_retry(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_notes(src, 40)
    out = tmp_path / "out.parquet"
    harness.emulator.configure(invalid_rate=1.0)
    job = harness.run(spec_for(tmp_path, src))
    assert {r["result_status"] for r in pq.read_table(out).to_pylist()} == {"errored"}

    ctx = harness.context()
    try:
        summary = pipeline.job_summary(ctx, current(harness, job.id), with_batches=False)
        assert summary["next_action"].startswith("none (output in")
        harness.emulator.configure(invalid_rate=0.0)
        assert pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED}) == 40
        assert current(harness, job.id).exported_at is None
        deadline = time.monotonic() + 60
        exported: list[Any] = []
        while not exported and time.monotonic() < deadline:
            exported = pipeline.tick(ctx).exported
            time.sleep(0.05)
        assert [path for _, path in exported] == [str(out)]
        assert {r["result_status"] for r in pq.read_table(out).to_pylist()} == {"succeeded"}
        job = current(harness, job.id)
        assert job.status is JobStatus.DONE
        assert job.exported_at is not None
        summary = pipeline.job_summary(ctx, job, with_batches=False)
        assert summary["next_action"] == f"none (output in {out})"
        assert pipeline.tick(ctx).exported == []  # exported once, not on every tick
    finally:
        ctx.close()


def test_a_rerun_after_retry_max_tokens_compares_with_what_rows_were_sent_with(
    harness: Harness, tmp_path: Path
) -> None:
    """`retry --max-tokens` sends only the failed rows with the new max_tokens. A later run of
    the original command must not count the others as changed (they went out with the
    original one) and pay for them twice; a template change still re-sends its rows."""
    src = tmp_path / "docs.jsonl"
    write_notes(src, 40)
    first = spec_for(tmp_path, src)
    harness.emulator.configure(invalid_rate=0.3)
    job = harness.run(first)
    harness.emulator.configure(invalid_rate=0.0)
    ctx = harness.context()
    try:
        failed = pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED}, max_tokens=512)
        assert 0 < failed < 40
        job = pipeline.run(ctx, current(harness, job.id))
        assert job_spec_of(current(harness, job.id)).max_tokens == 512
        plan = pipeline.check_rerun(ctx, "job", first)  # the original command, max_tokens 256
        assert plan is not None
        assert plan.fields == ["max_tokens"]
        assert (plan.changed, plan.unchanged) == (0, 40)
        other = first.model_copy(update={"prompt": first.prompt + "!"})
        plan = pipeline.check_rerun(ctx, "job", other)
        assert plan is not None
        assert (plan.changed, plan.unchanged) == (40, 0)
        # Adopting the re-run makes the new settings what every row is compared with.
        pipeline.prepare(ctx, "job", other, confirm_rerun=True)
        assert current(harness, job.id).request_spec is None
        assert pipeline.check_rerun(ctx, "job", other) is None
    finally:
        ctx.close()


def job_spec_of(job: JobRow) -> JobSpec:
    return JobSpec.model_validate(job.spec)


def test_retry_refuses_a_max_tokens_the_job_could_not_be_read_with(
    harness: Harness, tmp_path: Path
) -> None:
    """`retry --max-tokens 0` was stored unchecked, and every later command (status, tick,
    export, retry itself) then failed to read the job. It is refused, and nothing changes."""
    src = tmp_path / "docs.jsonl"
    write_notes(src, 5)
    harness.emulator.configure(invalid_rate=1.0)
    job = harness.run(spec_for(tmp_path, src))
    ctx = harness.context()
    try:
        with pytest.raises(UsageError, match="max_tokens"):
            pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED}, max_tokens=0)
        after = current(harness, job.id)
        assert after.spec == job.spec
        assert ctx.store.count_items(job.id)[ItemStatus.ERRORED] == 5  # nothing requeued
        assert pipeline.retry(ctx, after, statuses={ItemStatus.ERRORED}, max_tokens=64) == 5
    finally:
        ctx.close()


def test_a_changed_prompt_without_job_does_not_start_a_second_paid_job(tmp_path: Path) -> None:
    """The default job name hashes the settings: the same command with a new prompt would
    start a new job that sends every row again and overwrites the first job's output.
    It stops instead, naming the job and the --job that re-runs only what changed."""
    src = tmp_path / "tickets.jsonl"
    write_notes(src, 20)
    out = tmp_path / "labels.parquet"
    db = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    common = [str(src), "--model", "claude-haiku-4-5", "--max-tokens", "8", "--emulate"]
    common += ["-o", str(out)]
    runner = CliRunner()
    # A run refused at validation (a typo) sent nothing: fixing it is not held against it.
    typo = runner.invoke(cli, [*db, "run", *common, "--prompt", "Label: {{ bdy }}"])
    assert typo.exit_code == 1, typo.output
    first = runner.invoke(cli, [*db, "run", *common, "--prompt", "Label: {{ body }}"])
    assert first.exit_code == 0, first.output
    name = first.stderr.split("finished job 2 (", 1)[1].split(")", 1)[0]
    written = out.read_bytes()
    for extra in ([], ["--dry-run"]):
        again = runner.invoke(cli, [*db, "run", *common, "--prompt", "Tag: {{ body }}", *extra])
        assert again.exit_code == 2, again.output
        assert again.stderr == (
            f"error: job 2 ({name}) already ran this input into {out}, with different "
            "prompt; without --job this command would start a new job that sends (and pays "
            "for) every row again and overwrites that output. To send only the rows whose "
            f"request changed, add --job {name} (with --dry-run to count them first); to "
            "keep both, give this job its own -o or --job NAME\n"
        )
    listed = orjson.loads(runner.invoke(cli, [*db, "jobs", "--json"]).stdout)["jobs"]
    assert [j["name"] for j in listed if j["status"] != "failed"] == [name]
    assert out.read_bytes() == written
    # What the message says works: --job re-runs the changed rows into the same job.
    rerun = runner.invoke(
        cli, [*db, "run", *common, "--prompt", "Tag: {{ body }}", "--job", name, "--yes"]
    )
    assert rerun.exit_code == 0, rerun.output
    # Another output is another job, as before.
    other = [*common[:-1], str(tmp_path / "tags.parquet")]
    assert runner.invoke(cli, [*db, "run", *other, "--prompt", "Tag: {{ body }}"]).exit_code == 0


def test_the_rerun_refusal_says_what_resending_would_cost(tmp_path: Path) -> None:
    """The refusal that asks for --yes gives the rows and an upper bound on their cost, at
    batch prices with every answer at --max-tokens; --dry-run says the same."""
    src = tmp_path / "tickets.jsonl"
    write_notes(src, 20)
    db = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    common = [str(src), "--max-tokens", "100", "--emulate", "--job", "t"]
    runner = CliRunner()
    first = runner.invoke(cli, [*db, "run", *common, "--model", "claude-haiku-4-5",
                                "--prompt", "Label: {{ body }}"])  # fmt: skip
    assert first.exit_code == 0, first.output
    changed = [*common, "--model", "claude-haiku-4-5", "--prompt", "Tag: {{ body }}"]
    for extra in ([], ["--dry-run"]):
        again = runner.invoke(cli, [*db, "run", *changed, *extra])
        assert again.exit_code == (0 if extra else 2), again.output
        said = re.search(r"changes the request of 20 of 20 row\(s\).*costs at most about "
                         r"\$(\d+\.\d{4}) \(input tokens approximated", again.stderr)  # fmt: skip
        assert said, again.stderr
        # 20 answers of 100 tokens at $5/MTok, half price, plus the input: just above $0.005.
        assert 0.005 < float(said.group(1)) < 0.006
    unpriced = runner.invoke(
        cli, [*db, "run", *common, "--model", "claude-mythos-preview", "--prompt", "x {{ body }}"]
    )
    assert unpriced.exit_code == 2, unpriced.output
    assert "what that costs is unknown: model 'claude-mythos-preview' is not in" in unpriced.stderr


def test_rerunning_a_known_job_by_name_pays_for_what_the_full_command_would(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`run --job NAME --prompt B --yes` re-runs with the job's other settings, but each
    re-run is one round of --max-attempts on top of the highest attempt, as the full command
    gives; the job's stored cap was taken for the round and tried 12 times where 9 was due.
    BATCHPIPE_* variables given with it apply (they lost to the stored settings before)."""
    emulator.configure(processing_seconds=0, errored_rate=1.0)  # every attempt fails
    src = tmp_path / "tickets.jsonl"
    write_notes(src, 2)
    db = ["--db", f"sqlite:///{tmp_path / 'state.db'}", "--log-format", "json"]
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    runner = CliRunner()

    def attempts(*args: str, extra_env: dict[str, str] | None = None) -> list[int]:
        ran = runner.invoke(cli, [*db, "run", *args, "--yes"], env={**env, **(extra_env or {})})
        assert ran.exit_code == 0, ran.output
        out = tmp_path / f"{args[args.index('--job') + 1]}.parquet"
        return pq.read_table(out).column("attempts").to_pylist()

    def full(name: str, prompt: str) -> list[str]:
        return [
            str(src), "--job", name, "--prompt", prompt, "--model", "claude-haiku-4-5",
            "--max-tokens", "8", "-o", str(tmp_path / f"{name}.parquet"),
            "--poll-interval", "0.05", "--max-failed", "100%",
        ]  # fmt: skip

    assert attempts(*full("j", "A {{ body }}")) == [3, 3]
    assert attempts(*full("k", "A {{ body }}")) == [3, 3]
    # The full command and the short one (the job's name and what changes) agree.
    for prompt, tries in (("B {{ body }}", [6, 6]), ("C {{ body }}", [9, 9])):
        assert attempts(*full("k", prompt)) == tries
        assert attempts("--job", "j", "--prompt", prompt) == tries
    # Settings from the environment count as given: 2 more tries, one row per batch.
    before = emulator.stats()["batches_created"]
    given = {"BATCHPIPE_MAX_ATTEMPTS": "2", "BATCHPIPE_MAX_BATCH_REQUESTS": "1"}
    assert attempts("--job", "j", "--prompt", "D {{ body }}", extra_env=given) == [11, 11]
    assert emulator.stats()["batches_created"] - before == 4  # 2 rows x 2 tries


def test_the_round_of_a_retry_is_later_than_every_round_before(
    harness: Harness, tmp_path: Path
) -> None:
    """Before: a batch's round was its rows' highest attempt, so after a retry had taken
    some rows to attempt 6 (rounds 4-6), retrying rows left at attempt 3 showed round 4
    after round 6 in `status`."""
    src = tmp_path / "docs.jsonl"
    write_notes(src, 40)
    harness.emulator.configure(errored_rate=1.0)  # overloaded_error or api_error, per row
    spec = spec_for(tmp_path, src, max_attempts=3)
    job = harness.run(spec)
    ctx = harness.context()

    def rounds() -> list[int]:
        summary = pipeline.job_summary(ctx, current(harness, job.id))
        return [b["round"] for b in summary["batches"]]

    try:
        assert rounds() == [1, 2, 3]
        overloaded = {"overloaded_error"}
        harness.emulator.configure(errored_types=("overloaded_error",))  # these stay so
        assert pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED}, error_types=overloaded)
        harness.run(spec)
        assert rounds() == [1, 2, 3, 4, 5, 6]
        harness.emulator.configure(errored_rate=0.0)
        api_error = {"api_error"}  # rows still at attempt 3
        assert pipeline.retry(ctx, job, statuses={ItemStatus.ERRORED}, error_types=api_error)
        harness.run(spec)
        assert rounds() == [1, 2, 3, 4, 5, 6, 7]  # not 4 again: sent after round 6
    finally:
        ctx.close()


def test_each_retry_adds_one_round_of_tries_not_the_jobs_whole_cap(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`retry` gives the requeued rows one round of tries (3, or its --max-attempts) on top
    of those made; it used to add the job's stored cap, which already held every earlier
    round: a second retry tried 12 times where 9 was due, each try paid for."""
    emulator.configure(processing_seconds=0, errored_rate=1.0)  # every attempt fails
    sent_before = emulator.stats()["requests_received"]
    src = tmp_path / "tickets.jsonl"
    write_notes(src, 2)
    out = tmp_path / "r.parquet"
    db = ["--db", f"sqlite:///{tmp_path / 'state.db'}", "--log-format", "json"]
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    runner = CliRunner()

    def attempts() -> list[int]:
        ran = runner.invoke(cli, [*db, "run", "--job", "r"], env=env)
        assert ran.exit_code == 0, ran.output
        return pq.read_table(out).column("attempts").to_pylist()

    first = runner.invoke(cli, [
        *db, "run", str(src), "--job", "r", "--prompt", "A {{ body }}", "--model",
        "claude-haiku-4-5", "--max-tokens", "8", "-o", str(out), "--poll-interval", "0.05",
        "--max-failed", "100%",
    ], env=env)  # fmt: skip
    assert first.exit_code == 0, first.output
    assert pq.read_table(out).column("attempts").to_pylist() == [3, 3]
    for extra, tries in (([], [6, 6]), ([], [9, 9]), (["--max-attempts", "1"], [10, 10])):
        retried = runner.invoke(cli, [*db, "retry", "r", *extra], env=env)
        assert retried.exit_code == 0, retried.output
        assert attempts() == tries
    assert emulator.stats()["requests_received"] - sent_before == 2 * 10  # each try paid


def test_a_retry_with_nothing_to_send_changes_no_setting(harness: Harness, tmp_path: Path) -> None:
    """Answers cut at max_tokens are succeeded rows, which retry does not pick. `retry
    --max-tokens 40` on such a job sent nothing but stored the 40, and `run --job NAME
    --max-tokens 40` then saw no change and sent nothing either."""
    src = tmp_path / "docs.jsonl"
    write_notes(src, 6)
    first = spec_for(tmp_path, src, max_tokens=3)
    job = harness.run(first)
    ctx = harness.context()
    try:
        assert ctx.store.job_totals(job.id).truncated == 6
        failed = {ItemStatus.ERRORED, ItemStatus.EXPIRED}
        assert pipeline.retry(ctx, job, statuses=failed, max_tokens=40) == 0
        assert current(harness, job.id).spec == job.spec
        plan = pipeline.check_rerun(ctx, "job", first.model_copy(update={"max_tokens": 40}))
        assert plan is not None
        assert (plan.changed, plan.unchanged) == (6, 0)
    finally:
        ctx.close()


def test_a_retry_by_error_type_counts_its_round_from_the_rows_it_sends(
    harness: Harness, tmp_path: Path
) -> None:
    """The round's cap was the highest attempt of every failed row plus --max-attempts, the
    rows the --error-type filter left out included: invalid_request_error rows sent once,
    beside api_error rows that had used 3 tries, were given 3 more sends each, not 1."""
    src = tmp_path / "docs.jsonl"
    write_notes(src, 10)
    harness.emulator.configure(invalid_rate=1.0)
    job = harness.run(spec_for(tmp_path, src, max_failed="100%"))
    engine = sa.create_engine(harness.db_url)
    with engine.begin() as conn:  # half the rows used their 3 tries on transient errors
        conn.execute(
            sa.text(
                "UPDATE items SET error_type = 'api_error', attempts = 3 "
                "WHERE job_id = :j AND row_index < 5"
            ),
            {"j": job.id},
        )
    engine.dispose()
    ctx = harness.context()
    try:
        sent = pipeline.retry(
            ctx,
            job,
            statuses={ItemStatus.ERRORED},
            error_types={"invalid_request_error"},
            max_attempts=1,
        )
        assert sent == 5
        assert job_spec_of(current(harness, job.id)).max_attempts == 2
        before = harness.emulator.stats()["requests_received"]
        harness.emulator.configure(invalid_rate=0.0, errored_rate=1.0)  # every try fails again
        pipeline.run(ctx, current(harness, job.id))
        items = list(ctx.store.iter_items(job.id))
        assert [i.attempts for i in items] == [3] * 5 + [2] * 5
        assert harness.emulator.stats()["requests_received"] - before == 5
    finally:
        ctx.close()


# ------------------------------------------------------- rows invalid at validation


def write_with_nulls(path: Path, n: int, *, no_body: set[int], no_title: set[int]) -> None:
    """JSONL rows whose `body` is null in ``no_body`` and `title` null in ``no_title``."""
    path.write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "doc_id": i,
                    "body": None if i in no_body else f"text {i}",
                    "title": None if i in no_title else f"t{i}",
                }
            )
            + b"\n"
            for i in range(n)
        )
    )


def run_invalid_job(db_url: str, env: dict[str, str], tmp_path: Path) -> tuple[Path, Path]:
    """The tester's job: 10 rows, `body` null in rows 2 and 5 (and `title` in 5 and 7),
    run with --skip-invalid, so rows 2 and 5 end invalid; returns the input and output."""
    upgrade(db_url)  # a PostgreSQL database is migrated before its first use
    src, out = tmp_path / "inv.jsonl", tmp_path / "inv.parquet"
    write_with_nulls(src, 10, no_body={2, 5}, no_title={5, 7})
    first = run_batchpipe(
        db_url, env, "run", str(src), "--prompt", "C: {{ body }}", "--model", "claude-haiku-4-5",
        "--id-column", "doc_id", "--max-tokens", "16", "--labels", "a,b", "-o", str(out),
        "--job", "inv", "--skip-invalid", "--poll-interval", "0.1",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    table = pq.read_table(out).to_pylist()
    assert [r["result_status"] for r in table].count("invalid") == 2
    assert table[2]["error_message"] == "column 'body' is null"
    return src, out


def test_a_rerun_sends_the_rows_that_were_invalid_and_now_render(
    db_url: str, emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A template that renders rows which failed validation makes them changed rows of a
    re-run: counted (the dry run counts every row and says how many were invalid), sent,
    and answered; the rows whose request is the same keep their answers."""
    emulator.configure(processing_seconds=0.1)
    _, out = run_invalid_job(db_url, cli_env, tmp_path)
    before = pq.read_table(out).to_pylist()
    fixed = ("--job", "inv", "--prompt", "C: {{ body or '' }}", "--poll-interval", "0.1")
    dry = run_batchpipe(db_url, cli_env, "run", *fixed, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "changes the request of 2 of 10 row(s) (2 of them invalid before)" in dry.stderr
    assert dry.stdout == "2\n"
    assert emulator.stats()["requests_received"] == 8
    ran = run_batchpipe(db_url, cli_env, "run", *fixed, "--yes")
    assert ran.returncode == 0, ran.stderr
    assert "rows: 10 succeeded" in ran.stderr
    assert emulator.stats()["requests_received"] == 10  # only rows 2 and 5 were sent
    after = pq.read_table(out).to_pylist()
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        assert new["result_status"] == "succeeded"
        assert new["label"] in {"a", "b"}
        assert new["error_message"] is None
        assert new["attempts"] == 1
        if i not in (2, 5):
            assert new["custom_id"] == old["custom_id"]
    assert run_batchpipe(db_url, cli_env, "retry", "inv", "--status", "invalid").returncode == 2


def test_a_rerun_exports_rows_the_new_settings_cannot_render_as_invalid(
    db_url: str, emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """With --skip-invalid, a re-run whose template does not render a row sends it no more:
    one invalid before stays invalid with the new settings' message, one answered before
    ends invalid with it (its earlier answer kept in the history, its cost in cost_usd)."""
    emulator.configure(processing_seconds=0.1)
    _, out = run_invalid_job(db_url, cli_env, tmp_path)
    before = pq.read_table(out).to_pylist()
    titled = ("--job", "inv", "--prompt", "{{ title }}: {{ body or '' }}")
    dry = run_batchpipe(db_url, cli_env, "run", *titled, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "changes the request of 8 of 10 row(s) (1 of them invalid before);" in dry.stderr
    said = "; 2 row(s) do not render with the new settings and are exported as invalid, not sent"
    assert said in dry.stderr
    ran = run_batchpipe(db_url, cli_env, "run", *titled, "--yes", "--poll-interval", "0.1")
    assert ran.returncode == 0, ran.stderr
    assert "rows: 8 succeeded, 2 invalid" in ran.stderr
    assert emulator.stats()["requests_received"] == 16  # 8, then the 8 changed rows
    after = pq.read_table(out).to_pylist()
    for i in (5, 7):
        assert after[i]["result_status"] == "invalid"
        assert after[i]["error_message"] == (
            "template prints a null value: title is null in this row; write {{ title or '' }} "
            "where an empty value is fine"
        )
        assert (after[i]["response_text"], after[i]["label"]) == (None, None)
    assert after[7]["cost_usd"] == before[7]["cost_usd"] > 0  # its answer was paid for
    assert after[2]["result_status"] == "succeeded"
    assert {after[i]["attempts"] for i in (0, 1, 3, 4, 6, 8, 9)} == {2}
    status = run_batchpipe(db_url, cli_env, "status", "inv", "--json")
    (job,) = orjson.loads(status.stdout)["jobs"]
    assert (job["counts"]["invalid"], job["counts"]["succeeded"]) == (2, 8)


def test_a_rerun_of_invalid_rows_killed_half_way_changes_nothing_and_sends_each_row_once(
    harness: Harness, tmp_path: Path
) -> None:
    """The rows a re-run takes out of `invalid` change in its one transaction too: killed
    half way, every row is as it was (invalid rows with their old message); the same
    command again sends each changed row once, the formerly invalid ones at attempt 1."""
    src = tmp_path / "docs.jsonl"
    nulls = {7, 1_007, 5_007}  # one of them past the first chunk of 5,000
    write_with_nulls(src, ROWS, no_body=nulls, no_title=set())
    first = spec_for(tmp_path, src, max_batch_requests=5_000, skip_invalid=True)
    job = harness.run(first)
    before = snapshot(harness, job.id)
    assert [s for _, s, *_ in before].count(ItemStatus.INVALID) == 3
    sent = harness.emulator.stats()["requests_received"]
    changed = first.model_copy(update={"prompt": "Summarize: {{ body or '' }}"})
    killed = kill_rerun_half_way(harness, changed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(harness, job.id) == before
    assert current(harness, job.id).spec["prompt"] == first.prompt

    job = rerun_to_the_end(harness, changed)
    assert job.status is JobStatus.DONE
    assert harness.emulator.stats()["requests_received"] == sent + ROWS
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in table} == {"succeeded"}
    assert [i for i, r in enumerate(table) if r["attempts"] == 1] == sorted(nulls)
