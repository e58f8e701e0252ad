"""Recover a stopped job: `resume` after a human looked, and batches the API has lost.

A job stops as `needs_attention` when deciding alone could cost money (an orphan that can't
be told apart, a batch the API answers 404 for, results that are not served long after the
batch ended); `resume` puts it back to work, optionally saying how (adopt the orphan, resend
the rows).
"""

from __future__ import annotations

from batchpipe.db import BatchRow, JobRow
from batchpipe.errors import (
    APIError,
    BatchNotFound,
    ResultsUnavailable,
    TransientAPIError,
    UsageError,
)
from batchpipe.log import get_logger
from batchpipe.models import BatchStatus, JobStatus
from batchpipe.pipeline.collect import results_overdue, settle_batch
from batchpipe.pipeline.context import Context, bind, check_same_api, job_spec, reload_job
from batchpipe.pipeline.preflight import check_output_writable
from batchpipe.pipeline.submit import resend_planned

log = get_logger(__name__)


def _nothing_to_resume(job: JobRow) -> str:
    """Why `resume` does nothing for this job, and what would do what the user wants."""
    said = f"job {job.id} ({job.name}) is {job.status.value}; nothing to resume"
    if job.status == JobStatus.CANCELED:
        # A canceled job's unanswered rows are `canceled`, which `retry` leaves alone unless
        # asked: resume is the word users reach for, so point at the command that does it.
        return (
            f"{said}. To send its canceled rows again: `batchpipe retry {job.name} "
            f"--status canceled`, then `batchpipe tick` (or `batchpipe run`)"
        )
    if job.status == JobStatus.DONE:
        return f"{said}. To send any failed rows again: `batchpipe retry {job.name}`"
    return said


def resume(ctx: Context, job: JobRow, *, adopt: str | None = None, resend: bool = False) -> JobRow:
    """Put a job that stopped (`needs_attention` or `failed`) back to work, after a human looked.

    For a job stopped over an undecidable orphan, say how it was resolved: `adopt` names the
    API batch that holds the planned batch's requests; `resend` sends them again (paying
    again if the API did run them). Without either, the next step re-checks on its own.
    """
    if adopt and resend:
        raise UsageError("--adopt and --resend exclude each other")
    if adopt or resend:  # these ask the API; a plain resume only puts the job back
        check_same_api(ctx, job)
    with ctx.lease(job):
        job = reload_job(ctx, job)
        if job.status not in {JobStatus.NEEDS_ATTENTION, JobStatus.FAILED}:
            raise UsageError(_nothing_to_resume(job))
        check_output_writable(job_spec(job))
        planned = ctx.store.list_batches(job.id, {BatchStatus.PLANNED})
        lost = _lost_batches(ctx, job) if resend and not planned else []
        if (adopt or resend) and len(planned) != 1 and not lost:
            raise UsageError(
                f"job {job.id} has {len(planned)} planned batches and none the API has lost "
                "(or serves no results for); "
                "--adopt needs exactly one planned batch, --resend one or a lost batch"
            )
        if adopt:
            if adopt in ctx.store.known_api_batch_ids():
                raise UsageError(f"batch {adopt} already belongs to a job; it cannot be adopted")
            info = ctx.client.retrieve(adopt)
            ctx.store.mark_batch_created(
                planned[0].id, api_batch_id=info.id, created_at=info.created_at,
                expires_at=info.expires_at,
            )  # fmt: skip
        ctx.store.update_job(
            job.id, expected_status=job.status, status=JobStatus.RUNNING, error=None
        )
        if lost:
            _requeue_lost(ctx, lost)
        elif resend:
            resend_planned(ctx, reload_job(ctx, job), planned[0])
        bind(job, log).warning("job.resumed", adopted=adopt, resent=resend)
        return reload_job(ctx, job)


def _lost_batches(ctx: Context, job: JobRow) -> list[tuple[BatchRow, str]]:
    """The job's sent batches the API answers 404 for now (see ``collect.lost_batch``), and
    its ended batches whose results still answer 404 long after the end
    (``collect.missing_results``); each with how it was lost.

    Asked again rather than taken from the job's error: a batch found again (the right key
    is back, the results are served again) must not be sent twice.
    """
    lost = []
    sent = {BatchStatus.IN_PROGRESS, BatchStatus.CANCELING, BatchStatus.ENDED}
    for batch in ctx.store.list_batches(job.id, sent):
        assert batch.api_batch_id is not None
        try:
            ctx.client.retrieve(batch.api_batch_id)
        except BatchNotFound:
            lost.append((batch, "not found at the API"))
            continue
        if batch.status == BatchStatus.ENDED and _results_missing(ctx, batch):
            lost.append((batch, "its results not served by the API"))
    return lost


def _results_missing(ctx: Context, batch: BatchRow) -> bool:
    """Whether the ended ``batch``'s results file answers 404, past collect's patience.

    Reads no further than the first line: the stream is closed as soon as it has answered.
    Any other refusal (results archived, say) is not this kind of loss: collect records it.
    """
    assert batch.api_batch_id is not None
    lines = ctx.client.result_objects(batch.api_batch_id)
    try:
        next(lines, None)
    except ResultsUnavailable:
        return results_overdue(ctx, batch)
    except TransientAPIError:
        raise  # the API is unavailable: this resume cannot decide, the next one will
    except APIError:
        return False
    finally:
        lines.close()
    return False


def _requeue_lost(ctx: Context, lost: list[tuple[BatchRow, str]]) -> None:
    """Lost batches' rows go back to pending (the next step sends them); the batches settle."""
    for batch, how in lost:
        settle_batch(
            ctx,
            batch,
            expected=batch.status,
            error=how + "; its {rows} unanswered rows were sent again",
        )
        log.warning("batch.resent_lost", batch_id=batch.id, api_batch_id=batch.api_batch_id)
