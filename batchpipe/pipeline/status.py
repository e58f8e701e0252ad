"""Summaries of jobs for `status` and `jobs`: plain data, rendered by the CLI as a table or JSON."""

from __future__ import annotations

from typing import Any

from batchpipe import pricing
from batchpipe.db import BatchRow, JobRow
from batchpipe.models import BatchStatus, ItemStatus, JobStatus
from batchpipe.pipeline.context import Context
from batchpipe.pipeline.fingerprint import INPUT_CHANGED
from batchpipe.pipeline.verdict import failed_rows_problem


def _next_action(job: JobRow, counts: dict[ItemStatus, int], batches: list[BatchRow]) -> str:
    if job.status == JobStatus.NEEDS_ATTENTION:
        return f"read the error, check at the API, then `batchpipe resume {job.name}`"
    if job.status == JobStatus.FAILED:
        # Not "the same command": a fix that changes settings changes the default job name.
        if not job.ingested:
            return (
                f"nothing was sent: fix the input or settings named in the error, then run "
                f"the command again with `--job {job.name}`"
            )
        return (
            f"fix the cause in the error, then run the job's command again with `--job {job.name}`"
        )
    if job.error is not None and INPUT_CHANGED in job.error:
        # Recorded when a submit or export met the changed file (pipeline.submit); the job
        # itself is fine, and goes on once the file is as it was.
        then = (
            f"`batchpipe export {job.name}`"
            if job.status in {JobStatus.DONE, JobStatus.CANCELED}
            else f"`batchpipe tick --job {job.name}`"
        )
        return (
            f"its input changed since it was ingested: put the file back as it was (see "
            f"error for how), then {then}"
        )
    if not job.ingested and job.status == JobStatus.RUNNING:
        return "validate and submit its rows (the next `tick` does, or the job's command)"
    if job.status in {JobStatus.DONE, JobStatus.CANCELED}:
        failed = sum(counts.get(s, 0) for s in (ItemStatus.ERRORED, ItemStatus.EXPIRED))
        output = job.spec.get("output")
        # Written and not stale: a retry or re-run since the export cleared exported_at.
        written = isinstance(output, str) and job.exported_at is not None
        if written:
            done = f"none (output in {output})"
        else:  # the job's own output path, when it has one, needs no -o
            done = f"`batchpipe export {job.name}{'' if output else ' -o PATH'}`"
        if failed:
            done += f"; {failed} row(s) failed (`batchpipe retry {job.name}` sends them again)"
        if failed_rows_problem(job, counts) is not None:
            done += "; more rows failed than the job's --max-failed allows (its commands exit 1)"
        return done
    statuses = {b.status for b in batches}
    if BatchStatus.PLANNED in statuses:
        return (
            "recover a batch whose create was interrupted: adopted once the API lists it, "
            "else sent again when BATCHPIPE_ORPHAN_GRACE (default 660 s) has passed since "
            "the attempt"
        )
    if BatchStatus.ENDED in statuses:
        return "collect results"
    if counts.get(ItemStatus.PENDING):
        return "submit pending rows"
    return "wait for the API to finish processing"


def _batch_summary(batch: BatchRow, now: Any) -> dict[str, Any]:
    expires_in = None
    if batch.expires_at is not None and batch.status in {
        BatchStatus.IN_PROGRESS,
        BatchStatus.CANCELING,
    }:
        expires_in = max(0, int((batch.expires_at - now).total_seconds()))
    return {
        "id": batch.id,
        "api_batch_id": batch.api_batch_id,
        "status": batch.status.value,
        "round": batch.round,
        "requests": batch.request_count,
        "bytes": batch.request_bytes,
        "api_counts": batch.api_counts,
        "age_seconds": int((now - batch.intent_at).total_seconds()),
        "expires_in_seconds": expires_in,
        "error": batch.error,
    }


def job_summary(ctx: Context, job: JobRow, *, with_batches: bool = True) -> dict[str, Any]:
    """Everything `status` shows about a job, as JSON-ready data (its schema:
    docs/status.schema.json)."""
    counts = ctx.store.count_items(job.id)
    batches = ctx.store.list_batches(job.id)
    now = ctx.clock()
    attempts_total = sum(b.request_count for b in batches if b.status != BatchStatus.REJECTED)
    totals = ctx.store.job_totals(job.id)
    summary: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "status": job.status.value,
        "input": job.spec.get("input"),
        "output": job.spec.get("output"),
        "model": job.spec.get("model"),
        "rows": job.row_count,
        "counts": {s.value: counts.get(s, 0) for s in ItemStatus},
        "requests_sent": attempts_total,
        "usage": totals.usage,
        # Dollars paid so far at batch prices (every attempt, cache tokens included); null
        # for a model the price table lacks, or rows with an answer it could not price:
        # their cost is unknown, and the others' sum would read as all that was paid.
        "cost_usd": None
        if pricing.unknown_cost(job.spec.get("model"), totals.unpriced > 0)
        else totals.cost_usd,
        "price_table": pricing.PRICE_TABLE_VERSION,
        "truncated": totals.truncated,
        "age_seconds": int((now - job.created_at).total_seconds()),
        "next_action": _next_action(job, counts, batches),
        "error": job.error,
    }
    if with_batches:
        summary["batches"] = [_batch_summary(b, now) for b in batches]
    return summary
