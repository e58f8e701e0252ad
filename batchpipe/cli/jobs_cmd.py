"""Commands that create and advance jobs: run, submit, tick, export, cancel, retry."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from batchpipe import pipeline
from batchpipe.cli.app import State, cli, handle_errors
from batchpipe.cli.dbcheck import require_database
from batchpipe.cli.job_extras import (
    confirm_options,
    job_name_for,
    output_schema_from,
    parse_params,
    stored_spec,
    structured_options,
)
from batchpipe.cli.run_summary import cost_line, failed_line, rows_by_status
from batchpipe.cli.wiring import EMULATE_POLL_INTERVAL, pipeline_context, require_api_key
from batchpipe.config import given_job_settings, job_file_settings, job_spec_from
from batchpipe.db import JobRow
from batchpipe.errors import EXIT_TEMPFAIL, MissingSettings, UsageError
from batchpipe.models import ItemStatus, JobSpec, JobStatus


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that define a job, shared by `run` and `submit`."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.argument("input", required=False, metavar="INPUT"),
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            help="TOML job file; flags and BATCHPIPE_* variables override it.",
        ),
        click.option(
            "--job",
            "job_name",
            metavar="NAME",
            help="Job name; the same name resumes the job (`run --job NAME` or `submit --job "
            "NAME` alone continues a known job with its stored settings; settings given "
            "replace the job's, the rest are kept). Default: input stem + settings hash.",
        ),
        click.option("--prompt", help="User message template, e.g. 'Classify: {{ body }}'."),
        click.option("--system", help="System prompt (a template too)."),
        click.option("--model", help="Model id, e.g. claude-haiku-4-5."),
        click.option("--max-tokens", type=int, help="max_tokens for every request."),
        click.option("--temperature", type=float, help="Sampling temperature (0-1)."),
        click.option(
            "--param",
            "params",
            multiple=True,
            metavar="KEY=JSON",
            help="Any other Messages parameter, passed through (repeatable).",
        ),
        click.option("--id-column", help="Column with a unique row id (default: the row number)."),
        click.option("-o", "--output", help="Write the joined results here (.parquet or .jsonl)."),
        click.option(
            "--input-format",
            type=click.Choice(["jsonl", "parquet"]),
            help="Input format, when the extension does not say.",
        ),
        click.option(
            "--max-attempts",
            type=int,
            help="Tries per row for transient failures [3]; a re-run that changes requests "
            "gives the re-sent rows this many more (not kept with the job).",
        ),
        click.option(
            "--poll-interval",
            type=float,
            help="Seconds between polls (fractions allowed) [back off 30 s to 5 min].",
        ),
        click.option("--max-batch-requests", type=int, help="Requests per batch [100000]."),
        click.option("--max-batch-bytes", type=int, help="Bytes per batch body [250000000]."),
        click.option(
            "--skip-invalid",
            is_flag=True,
            default=None,
            help="Send the valid rows; export invalid ones as result_status=invalid.",
        ),
        click.option(
            "--result-prefix",
            metavar="PREFIX",
            help="Put PREFIX before the names of the columns batchpipe adds to the output "
            "(e.g. bp_), when the input has columns of those names.",
        ),
        click.option(
            "--max-failed",
            metavar="N|P%|default",
            help="Rows that may end without an answer (errored, expired, invalid, "
            "invalid_output) before the "
            "command exits 1, after writing the output: a count or a percentage "
            "[all but one: exit 1 only when no row was answered]. Kept with the job for "
            "later runs; 'default' puts that back.",
        ),
        *structured_options(),
        click.option(
            "--emulate",
            is_flag=True,
            help="Use the built-in emulator of the API instead of Anthropic (no key needed).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _spec_from(kwargs: dict[str, Any], state: State | None = None) -> tuple[str | None, JobSpec]:
    """The job name and the spec of what the command gives (flags, BATCHPIPE_*, job file).

    Nothing is taken from a stored job here except, for `--job NAME` naming a known job,
    the input and request settings the command leaves out (pipeline.complete_spec). The
    settings that change no request are filled in by the pipeline, by one rule
    (pipeline.carry), from what the spec says was given.
    """
    kwargs["output_schema"] = output_schema_from(kwargs.pop("labels"), kwargs.pop("schema_file"))
    config_file: Path | None = kwargs.pop("config_file")
    job_name: str | None = kwargs.pop("job_name")
    kwargs["params"] = parse_params(kwargs.pop("params"))
    kwargs.pop("emulate")  # its short poll interval is the run's, not stored (see `run`)
    if config_file is not None and job_name is None:
        job_name = job_file_settings(config_file).get("name")
    given = given_job_settings(kwargs, config_file=config_file)
    try:
        spec = job_spec_from(given)
    except MissingSettings as exc:
        # `run --job NAME` alone continues a known job: its settings are in the database.
        stored = stored_spec(state, job_name) if state and job_name else None
        if stored is None and state and job_name:
            raise MissingSettings(
                f"{exc}; there is no job {job_name!r} to continue (`batchpipe jobs` lists them)"
            ) from None
        if stored is None:
            raise
        spec = pipeline.complete_spec(stored, given)
    return job_name, spec


def _echo_plan(plan: pipeline.RerunPlan | None, name: str, known: bool) -> None:
    if plan is None and not known:
        click.echo(f"dry run: no job {name} yet; this command would start it", err=True)
    elif plan is None:
        click.echo(f"dry run: job {name}'s requests would not change; none sent again", err=True)
    else:
        click.echo(f"dry run: {plan.describe()}", err=True)
    click.echo(str(plan.changed if plan else 0))


def _echo_job(job: JobRow, verb: str) -> None:
    click.echo(
        f"{verb} job {job.id} ({job.name}): {job.status.value}, {job.row_count} rows", err=True
    )


@cli.command()
@job_options
@click.pass_obj
@handle_errors
@confirm_options
def run(state: State, /, emulate: bool, yes: bool, dry_run: bool, **kwargs: Any) -> None:
    """Run a job to the end: validate, submit, wait, collect, resubmit, export.

    Blocking and resumable: after Ctrl-C, kill -9 or a reboot, the same command picks the job
    up where it stopped and pays for nothing twice.
    """
    name, spec = _spec_from({**kwargs, "emulate": emulate}, state)
    if not (emulate or dry_run):
        require_api_key(state)  # after the flags are checked, before any row is read
    with pipeline_context(state, emulate=emulate) as ctx:
        name = job_name_for(ctx, name, spec)
        if dry_run:
            known = ctx.store.get_job(name) is not None
            _echo_plan(pipeline.check_rerun(ctx, name, spec), name, known)
            return
        # One lease from start to end: a `tick` between prepare and run would lock us out.
        with ctx.keeping_leases():
            job = pipeline.prepare(ctx, name, spec, confirm_rerun=yes)
            # The job's --poll-interval is the latest one given (stored by prepare); without
            # one, the emulator's batches end quickly enough for a short wait.
            job = pipeline.run(ctx, job, poll_interval=EMULATE_POLL_INTERVAL if emulate else None)
        # Counts and cost as the run finished the job, not job_summary (which walks the
        # rows more times).
        by_status, cost = pipeline.finished_totals(ctx, job)
        # By error type only when some rows errored: one more walk of the job's rows.
        error_types = (
            {e: n for s, e, n in ctx.store.status_breakdown(job.id) if s == ItemStatus.ERRORED}
            if by_status.get(ItemStatus.ERRORED)
            else None
        )
    _echo_job(job, "finished")
    click.echo(f"  rows: {rows_by_status(by_status)}", err=True)
    click.echo(f"  {cost_line(job, cost)}", err=True)
    failed = failed_line(job, by_status, error_types)
    if failed:
        click.echo(f"  {failed}", err=True)
    # The job's own output (`run --job NAME` without -o writes the one the job holds); run
    # writes it for a done job only, so a canceled one names none (a stale file may be there).
    output = job.spec.get("output")
    if output and job.status == JobStatus.DONE:
        click.echo(f"  output: {output}", err=True)
    failure = pipeline.rows_failed(job, by_status)
    if failure is not None:
        raise failure


@cli.command()
@job_options
@click.pass_obj
@handle_errors
@confirm_options
def submit(state: State, /, emulate: bool, yes: bool, dry_run: bool, **kwargs: Any) -> None:
    """Validate and submit a job, then exit (advance it later with `tick`).

    Prints the job's name on stdout, for scripts.
    """
    name, spec = _spec_from({**kwargs, "emulate": emulate}, state)
    if not (emulate or dry_run):
        require_api_key(state)  # after the flags are checked, before any row is read
    with pipeline_context(state, emulate=emulate) as ctx:
        name = job_name_for(ctx, name, spec)
        if dry_run:
            known = ctx.store.get_job(name) is not None
            _echo_plan(pipeline.check_rerun(ctx, name, spec), name, known)
            return
        # One lease from start to end: a `tick` between prepare and step would lock us out.
        with ctx.keeping_leases():
            job = pipeline.prepare(ctx, name, spec, confirm_rerun=yes)
            with ctx.lease(job):
                job = pipeline.step(ctx, job)
    _echo_job(job, "submitted")
    click.echo(job.name)


@cli.command()
@click.option(
    "--job",
    "job_refs",
    multiple=True,
    metavar="JOB",
    help="Only these jobs (name or id; repeatable). Default: every unfinished job.",
)
@click.option("--emulate", is_flag=True, help="Use the built-in emulator of the API.")
@click.pass_obj
@handle_errors
def tick(state: State, job_refs: tuple[str, ...], emulate: bool) -> None:
    """Advance every unfinished job one step without waiting (for cron).

    Polls, collects, resubmits and exports when a job is done. Safe when runs overlap: a job
    another process is working on is skipped. Exit codes: 0 done or nothing to do, 1 a job
    failed (or finished with more failed rows than its --max-failed allows), 2 only settings
    are wrong (e.g. no API key), 75 the API or the database is unavailable, or the asked-for
    job is busy (try later).
    """
    with pipeline_context(state, emulate=emulate) as ctx:
        jobs = [_find_job(ctx, ref) for ref in job_refs] if job_refs else None
        report = pipeline.tick(ctx, jobs)
    if not (report.advanced or report.locked or report.unavailable or report.failed):
        click.echo("tick: no unfinished jobs; nothing to do", err=True)
    for job in report.advanced:
        _echo_job(job, "ticked")
    for job, path in report.exported:
        click.echo(f"exported job {job.id} ({job.name}) to {path}", err=True)
    for job in report.locked:
        click.echo(
            f"job {job.id} ({job.name}) is being worked on by another process; skipped", err=True
        )
    for job, why in report.unavailable:
        click.echo(f"job {job.id} ({job.name}): unavailable for now, will retry: {why}", err=True)
    for job, why, _ in report.failed:
        # Most errors name their job already ("job 1 (ch): …"): said once, not twice.
        click.echo(f"error: {_about(job, why)}", err=True)
    if report.failed:
        sys.exit(report.failure_exit_code())
    if report.unavailable or (job_refs and report.locked):
        sys.exit(EXIT_TEMPFAIL)


def _about(job: JobRow, message: str) -> str:
    """``message`` naming ``job`` at its start, unless it does already."""
    named = f"job {job.id} ({job.name}): "
    return message if message.startswith(named) else named + message


def _find_job(ctx: pipeline.Context, ref: str) -> JobRow:
    job = ctx.store.get_job(ref)
    if job is None:
        raise UsageError(f"no job {ref!r}; `batchpipe jobs` lists them")
    return job


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option("-o", "--output", help="Destination (.parquet or .jsonl). Default: the job's -o.")
@click.pass_obj
@handle_errors
def export(state: State, job_ref: str, output: str | None) -> None:
    """Write a finished job's results joined to its input rows, in input order."""
    require_database(state)
    with pipeline_context(state) as ctx:
        job = _find_job(ctx, job_ref)
        path, rows = pipeline.export(ctx, job, output)
    click.echo(f"wrote {rows} rows to {path}", err=True)


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--emulate", is_flag=True, help="Use the built-in emulator of the API.")
@click.pass_obj
@handle_errors
def cancel(state: State, job_ref: str, emulate: bool) -> None:
    """Cancel a job: unsent rows are dropped and in-flight batches canceled at the API.

    Already-finished answers are kept; `tick` drains the canceled batches and records every
    row's final status.
    """
    require_database(state)
    with pipeline_context(state, emulate=emulate) as ctx:
        job = _find_job(ctx, job_ref)
        if job.status.is_terminal():
            click.echo(
                f"job {job.id} ({job.name}) is already {job.status.value}; nothing to cancel",
                err=True,
            )
            return
        job = pipeline.cancel(ctx, job)
    _echo_job(job, "canceling" if not job.status.is_terminal() else "canceled")


# `invalid` rows failed validation before sending; fix the input and start a new job.
_RETRY_STATUSES = ["errored", "expired", "canceled"]


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_RETRY_STATUSES),
    help="Which final statuses to send again (repeatable) [errored, expired].",
)
@click.option(
    "--error-type",
    "error_types",
    multiple=True,
    metavar="TYPE",
    help="Only errored rows with this error type, e.g. invalid_request_error (repeatable).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Send the retried rows with this max_tokens, and use it from now on. Answers cut "
    "at max_tokens are succeeded rows, which retry does not pick: `run --job JOB "
    "--max-tokens N` sends those again.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1, max=1000),
    help="Tries in this round, on top of the highest attempt among the rows it sends [3].",
)
@click.pass_obj
@handle_errors
def retry(
    state: State,
    job_ref: str,
    *,
    statuses: tuple[str, ...],
    error_types: tuple[str, ...],
    max_tokens: int | None,
    max_attempts: int | None,
) -> None:
    """Send a finished job's failed rows round again, with fresh attempts.

    For failures that a change fixed: credit topped up, a larger --max-tokens, an outage over.
    Then `run --job JOB` (its settings are kept) or `tick` the job as usual.
    """
    chosen = {ItemStatus(s) for s in (statuses or ("errored", "expired"))}
    if error_types and ItemStatus.ERRORED not in chosen:
        # Only errored rows carry an error type: the two filters together match nothing.
        raise UsageError(
            "--error-type picks errored rows by their error type, but --status "
            f"{'/'.join(sorted(s.value for s in chosen))} leaves errored rows out; add "
            "--status errored, or drop --error-type"
        )
    require_database(state)
    with pipeline_context(state) as ctx:
        job = _find_job(ctx, job_ref)
        count = pipeline.retry(
            ctx,
            job,
            statuses=chosen,
            error_types=error_types or None,
            max_tokens=max_tokens,
            max_attempts=max_attempts,
        )
    if count:
        click.echo(
            f"job {job.id} ({job.name}): {count} row(s) queued again; `batchpipe run --job "
            f"{job.name}` sends them and waits for the answers (`batchpipe tick` for one step)",
            err=True,
        )
        return
    which = "/".join(sorted(s.value for s in chosen)) + " rows"
    if error_types:  # only errored rows have one
        which = f"errored rows of error type {'/'.join(sorted(set(error_types)))}"
    why = (
        "; it is still running, and sends rows that failed for transient reasons again by "
        "itself (up to --max-attempts)"
        if job.status.is_active()
        else ""
    )
    if max_tokens is not None and not why:
        why = (
            "; nothing was changed (answers cut at max_tokens are succeeded rows: `batchpipe "
            f"run --job {job.name} --max-tokens {max_tokens}` sends those again)"
        )
    click.echo(f"job {job.id} ({job.name}): no {which} to send again{why}", err=True)


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option(
    "--adopt",
    metavar="BATCH_ID",
    help="The API batch that holds the job's interrupted batch (e.g. msgbatch_…).",
)
@click.option(
    "--resend",
    is_flag=True,
    help="Send the interrupted batch again, or the rows of a batch the API no longer knows "
    "(404: deleted) or serves no results for; pays again if the API did run them.",
)
@click.option("--emulate", is_flag=True, help="Use the built-in emulator of the API.")
@click.pass_obj
@handle_errors
def resume(state: State, job_ref: str, adopt: str | None, resend: bool, emulate: bool) -> None:
    """Put a job that stopped (needs_attention or failed) back to work.

    Run it after reading `batchpipe status JOB` and resolving the cause. For a batch whose
    create was interrupted and cannot be matched safely, say which API batch it became
    (--adopt) or that it should be sent again (--resend). Then `tick` or `run` as usual.
    """
    require_database(state)
    with pipeline_context(state, emulate=emulate) as ctx:
        job = pipeline.resume(ctx, _find_job(ctx, job_ref), adopt=adopt, resend=resend)
    _echo_job(job, "resumed")
