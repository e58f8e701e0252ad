"""Commands that show state or manage the database: status, jobs, db upgrade."""

from __future__ import annotations

import json
from typing import Any

import click

from batchpipe import db, pipeline, pricing
from batchpipe.cli.app import State, cli, handle_errors
from batchpipe.cli.dbcheck import require_database
from batchpipe.cli.wiring import pipeline_context, settings_for
from batchpipe.errors import UsageError
from batchpipe.models import ItemStatus


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "-"


def _cost_text(s: dict[str, Any]) -> str:
    # A model the price table lacks costs something, just not a known amount: $0.0000
    # would read as free (its rows' cost_usd are null for the same reason). A null cost
    # with a priced model: some rows were answered by another one (job_summary).
    unknown = pricing.unknown_cost(s["model"], s.get("cost_usd") is None)
    if unknown is not None or s.get("cost_usd") is None:
        return f"cost unknown: {unknown}"
    return (
        f"cost ${s.get('cost_usd', 0):.4f} (every attempt, batch prices, table "
        f"{s.get('price_table')})"
    )


def _render_job(summary: dict[str, Any]) -> str:
    usage = summary["usage"]
    s = summary
    lines = [
        f"job {s['id']} ({s['name']}): {s['status']}, age {_age(s['age_seconds'])}",
        f"  input {s['input']} -> {s['output'] or '(no output path)'}, model {s['model']}",
        f"  rows {s['rows']}: {_counts_text(s['counts'])}; requests sent {s['requests_sent']}",
        # Each row's last attempt (its answer); the cost line below counts every attempt.
        f"  tokens (last attempts) in {usage.get('input_tokens', 0)}, "
        f"out {usage.get('output_tokens', 0)}, "
        f"cache write {usage.get('cache_creation_input_tokens', 0)}, "
        f"cache read {usage.get('cache_read_input_tokens', 0)}",
        f"  {_cost_text(s)}; truncated at max_tokens: {s.get('truncated', 0)}",
        f"  next: {summary['next_action']}",
    ]
    if summary["error"]:
        lines.append(f"  error: {summary['error']}")
    batches = summary.get("batches") or []
    if batches:
        rows = [
            ["batch", "api id", "status", "round", "requests", "age", "expires in", "api counts"]
        ]
        for b in batches:
            counts = b["api_counts"] or {}
            rows.append(
                [
                    str(b["id"]),
                    b["api_batch_id"] or "-",
                    b["status"],
                    str(b["round"]),
                    str(b["requests"]),
                    _age(b["age_seconds"]),
                    _age(b["expires_in_seconds"]),
                    _counts_text(counts),
                ]
            )
        lines.append("  " + _table(rows).replace("\n", "\n  "))
    return "\n".join(lines)


@cli.command()
@click.argument("job_ref", metavar="[JOB]", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Machine-readable output on stdout (schema: docs/status.schema.json).",
)
@click.pass_obj
@handle_errors
def status(state: State, job_ref: str | None, as_json: bool) -> None:
    """Show jobs with their rows by status, batches, attempts, age, expiry and next action."""
    require_database(state)
    with pipeline_context(state) as ctx:
        if job_ref is not None:
            job = ctx.store.get_job(job_ref)
            if job is None:
                raise UsageError(f"no job {job_ref!r}; `batchpipe jobs` lists them")
            jobs = [job]
        else:
            jobs = ctx.store.list_jobs()
        summaries = [pipeline.job_summary(ctx, j) for j in jobs]
    if as_json:
        click.echo(json.dumps({"jobs": summaries}, default=str, indent=2))
    elif not summaries:
        click.echo("no jobs yet; start one with `batchpipe run`")
    else:
        click.echo("\n\n".join(_render_job(s) for s in summaries))


_JOBS_COLUMNS = (
    "id", "name", "status", "rows", "answered", "failed", "canceled", "open", "age", "next",
)  # fmt: skip


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.pass_obj
@handle_errors
def jobs(state: State, as_json: bool) -> None:
    """List jobs, newest first, one line each.

    Rows are counted as answered (succeeded), failed (errored, expired, invalid,
    invalid_output: what --max-failed counts), canceled, and open (not sent yet or in
    flight); the four add up to rows.
    """
    require_database(state)
    with pipeline_context(state) as ctx:
        summaries = [
            pipeline.job_summary(ctx, j, with_batches=False) for j in ctx.store.list_jobs()
        ]
    if as_json:
        click.echo(json.dumps({"jobs": summaries}, default=str, indent=2))
        return
    if not summaries:
        click.echo("no jobs yet; start one with `batchpipe run`")
        return
    # Every row is in exactly one of answered, failed, canceled and open, so they add up
    # to rows; failed is what --max-failed counts (ItemStatus.is_failure).
    rows = [list(_JOBS_COLUMNS)]
    for s in summaries:
        c = {ItemStatus(k): n for k, n in s["counts"].items()}
        failed = sum(n for status, n in c.items() if status.is_failure())
        still_open = sum(n for status, n in c.items() if not status.is_terminal())
        rows.append(
            [
                str(s["id"]),
                s["name"],
                s["status"],
                str(s["rows"]),
                str(c.get(ItemStatus.SUCCEEDED, 0)),
                str(failed),
                str(c.get(ItemStatus.CANCELED, 0)),
                str(still_open),
                _age(s["age_seconds"]),
                s["next_action"],
            ]
        )
    click.echo(_table(rows))


@cli.group("db")
def db_group() -> None:
    """Manage the state database's schema."""


@db_group.command("upgrade")
@click.pass_obj
@handle_errors
def db_upgrade(state: State) -> None:
    """Migrate the state database to the latest schema (safe to run repeatedly)."""
    url = settings_for(state).database_url
    before = db.current_revision(url)
    db.upgrade(url)
    after = db.current_revision(url)
    click.echo(f"{db.mask_url(url)}: {before or 'empty'} -> {after}", err=True)
