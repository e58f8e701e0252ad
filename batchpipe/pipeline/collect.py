"""Poll batches until they end, then stream their results into the store.

Collecting is idempotent: each result line updates its item only while the item is still
`submitted` under that very custom_id, so a download that breaks off and is started again,
or a batch collected twice, neither duplicates nor drops anything. Transient failures go
back to `pending` (the next submit resends them) until the job's attempt limit.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from batchpipe.db import BatchRow, JobRow
from batchpipe.errors import (
    APIError,
    BatchNotFound,
    NeedsAttention,
    ResultsUnavailable,
    TransientAPIError,
)
from batchpipe.log import get_logger
from batchpipe.memory import release_free_memory
from batchpipe.models import (
    BatchStatus,
    ItemStatus,
    JobSpec,
    JobStatus,
    PlainSuccess,
    ResultRecord,
    ResultType,
    is_transient_error,
)
from batchpipe.pipeline.context import Context, api_now, bind, failpoint, job_spec
from batchpipe.pipeline.outcome import output_schema, plain_reader, refine
from batchpipe.requests import parse_custom_id
from batchpipe.structured import OutputSchema

_APPLY_CHUNK = 5_000
EXPIRY_WARNING = timedelta(hours=2)
ARCHIVE_AFTER = timedelta(days=29)
ARCHIVE_WARNING = timedelta(days=2)
# The API serves a batch's results once it has ended; a results file that still answers 404
# this long after the end will not come by waiting (see missing_results).
RESULTS_PATIENCE = timedelta(hours=1)

log = get_logger(__name__)


def classify(
    record: ResultRecord, attempt: int, max_attempts: int, user_canceled: bool
) -> ItemStatus:
    """The item status a result leads to: final, or `pending` to be sent again."""
    retry_left = attempt < max_attempts
    if record.result_type is ResultType.SUCCEEDED:
        return ItemStatus.SUCCEEDED
    if record.result_type is ResultType.ERRORED:
        transient = is_transient_error(record.error_type)
        return (
            ItemStatus.PENDING
            if transient and retry_left and not user_canceled
            else ItemStatus.ERRORED
        )
    if record.result_type is ResultType.EXPIRED:
        return ItemStatus.PENDING if retry_left and not user_canceled else ItemStatus.EXPIRED
    # Canceled: final when the user canceled the job; someone else's cancel is retried.
    return ItemStatus.PENDING if retry_left and not user_canceled else ItemStatus.CANCELED


def poll(ctx: Context, job: JobRow) -> int:
    """Refresh every in-flight batch from the API. Returns how many have ended."""
    ended = 0
    for batch in ctx.store.list_batches(job.id, {BatchStatus.IN_PROGRESS, BatchStatus.CANCELING}):
        assert batch.api_batch_id is not None
        try:
            info = ctx.client.retrieve(batch.api_batch_id)
        except BatchNotFound as exc:
            lost_batch(ctx, job, batch, exc)
            continue
        counts = asdict(info.request_counts)
        logger = bind(job, log, batch_id=batch.id, api_batch_id=info.id)
        if info.processing_status == "ended":
            ctx.store.update_batch(
                batch.id,
                expected_status=batch.status,
                status=BatchStatus.ENDED,
                ended_at=info.ended_at,
                api_counts=counts,
            )
            logger.info(
                "batch.ended", request_id=info.request_id, latency_ms=info.latency_ms, **counts
            )
            ended += 1
            continue
        status = BatchStatus.CANCELING if info.processing_status == "canceling" else batch.status
        ctx.store.update_batch(
            batch.id, expected_status=batch.status, status=status, api_counts=counts
        )
        left = info.expires_at - api_now(ctx)
        if left < EXPIRY_WARNING:
            logger.warning(
                "batch.near_expiry",
                hours_left=round(left.total_seconds() / 3600, 2),
                processing=info.request_counts.processing,
            )
    return ended


def collect(ctx: Context, job: JobRow) -> int:
    """Stream the results of every ended batch into the store. Returns items updated."""
    spec = job_spec(job)
    user_canceled = job.status in {JobStatus.CANCELING, JobStatus.CANCELED}
    total = 0
    # A results file not served yet waits for the next step (exit 75), after the job's
    # other ended batches are collected: one slow file must not hold up the rest.
    wait: ResultsUnavailable | None = None
    for batch in ctx.store.list_batches(job.id, {BatchStatus.ENDED}):
        try:
            total += _collect_batch(ctx, job, batch, spec, user_canceled)
        except BatchNotFound as exc:
            lost_batch(ctx, job, batch, exc)
        except ResultsUnavailable as exc:
            if batch.results_missing_since is None:
                # The first 404: the time it lasts is counted from now (a nightly tick's
                # first look at a batch that ended hours ago is one look, not an hour's).
                ctx.store.update_batch(batch.id, results_missing_since=api_now(ctx))
                wait = wait or exc
            elif not results_overdue(ctx, batch):
                wait = wait or exc  # the file may not be served yet, or its URL went stale
            else:
                missing_results(ctx, job, batch, exc)
    if wait is not None:
        raise wait
    return total


def lost_batch(ctx: Context, job: JobRow, batch: BatchRow, exc: BatchNotFound) -> None:
    """The API answers 404 for one of the job's batches: stop the job as needs_attention
    (raises NeedsAttention), unless it is being canceled.

    Waiting will not bring the batch back, and guessing is costly either way: sending its
    rows again pays twice if the key was only wrong, waiting forever never finishes. The
    message names the batch, the two likely causes and the command for each. A job being
    canceled keeps its status (a later `resume` must not bring a canceled job back to
    running): the lost batch settles, and the step cancels its unanswered rows with the
    other pending ones.
    """
    message = (
        f"job {job.id} ({job.name}): batch {batch.api_batch_id} (batch {batch.id}, "
        f"{batch.request_count} requests) is not found at the API (404): it was deleted (in "
        "the Console, say), or ANTHROPIC_API_KEY belongs to another workspace or organization "
        "than the key that created it. If the key is wrong, set the right one and run "
        f"`batchpipe resume {job.name}`; if the batch is gone, `batchpipe resume {job.name} "
        "--resend` sends its rows again"
    )
    _stop_for_batch(ctx, job, batch, exc, message, event="batch.not_found")


def results_overdue(ctx: Context, batch: BatchRow) -> bool:
    """Whether ``batch``'s results file has answered 404 for longer than
    :data:`RESULTS_PATIENCE` (API clock), counted from the first 404 collect recorded."""
    since = batch.results_missing_since
    return since is not None and api_now(ctx) - since > RESULTS_PATIENCE


def missing_results(ctx: Context, job: JobRow, batch: BatchRow, exc: ResultsUnavailable) -> None:
    """The results file of an ended batch has answered 404 for too long: stop the job as
    needs_attention (raises NeedsAttention); for a job being canceled, its unanswered rows
    end errored (``results_unavailable``), as archived results do.

    Until then each step exits 75 and the next tries again. After that, trying again is all
    a scheduler would do, every few minutes for good (exit 75 looks healthy to cron), while
    the answers the job paid for are nowhere: a human decides whether they come back
    (`resume`) or the rows are sent again, and paid for again (`resume --resend`). A job
    being canceled is not stopped (a `resume` would bring it back to running), and its rows
    are not called canceled: the API may have answered them, and paid is paid.
    """
    assert batch.results_missing_since is not None  # results_overdue said so
    hours = (api_now(ctx) - batch.results_missing_since).total_seconds() / 3600
    ended = f" (ended {batch.ended_at:%Y-%m-%d %H:%M} UTC)" if batch.ended_at else ""
    if job.status == JobStatus.CANCELING:
        ctx.store.update_batch(batch.id, error=str(exc))
        _fail_unanswered(
            ctx,
            job,
            batch,
            error_type="results_unavailable",
            error_message=f"the API ended batch {batch.api_batch_id} but answered 404 for its "
            f"results for {hours:.1f} h; `batchpipe retry --error-type results_unavailable` "
            "sends them again (and pays again)",
            status=BatchStatus.COLLECTED,
            event="batch.results_missing_while_canceling",
        )
        return
    message = (
        f"job {job.id} ({job.name}): the results of batch {batch.api_batch_id} (batch "
        f"{batch.id}, {batch.request_count} requests){ended} have answered 404 for "
        f"{hours:.1f} h, though the API keeps results for 29 days. Look at the batch in the "
        f"Console: `batchpipe resume {job.name}` downloads them if they are back; "
        f"`batchpipe resume {job.name} --resend` sends its unanswered rows again (paid again)"
    )
    _stop_for_batch(ctx, job, batch, exc, message, event="batch.results_missing")


def _stop_for_batch(
    ctx: Context,
    job: JobRow,
    batch: BatchRow,
    exc: APIError,
    message: str,
    *,
    event: str,
) -> None:
    """Stop a running job as needs_attention over ``batch`` (raises NeedsAttention); for a
    job being canceled, settle the batch instead (its rows are then canceled)."""
    ctx.store.update_batch(batch.id, error=str(exc))
    logger = bind(job, log, batch_id=batch.id, api_batch_id=batch.api_batch_id)
    if job.status == JobStatus.CANCELING:
        rows = settle_batch(
            ctx,
            batch,
            expected=batch.status,
            error="not found at the API while the job was being canceled; its {rows} "
            "unanswered rows are canceled",
        )
        logger.warning(f"{event}_while_canceling", request_id=exc.request_id, rows=rows)
        return
    # Compare-and-set: only a running job stops here; a cancel or another step that moved
    # it meanwhile keeps its word.
    stopped = ctx.store.update_job(
        job.id,
        expected_status=JobStatus.RUNNING,
        status=JobStatus.NEEDS_ATTENTION,
        error=message,
    )
    logger.error(event, request_id=exc.request_id, job_stopped=stopped)
    raise NeedsAttention(message)


def _collect_batch(
    ctx: Context, job: JobRow, batch: BatchRow, spec: JobSpec, user_canceled: bool
) -> int:
    assert batch.api_batch_id is not None
    started = time.perf_counter()
    outputs = output_schema(spec)
    logger = bind(job, log, batch_id=batch.id, api_batch_id=batch.api_batch_id)
    if batch.created_at and api_now(ctx) - batch.created_at > ARCHIVE_AFTER - ARCHIVE_WARNING:
        logger.warning("batch.near_archive", created_at=batch.created_at.isoformat())
    buf: list[ResultRecord] = []
    plain: list[PlainSuccess] = []  # the commonest lines, without a record each
    applied = foreign = lines = 0
    # Local counters, not a dict: two subscripted updates a line cost more than the sums.
    input_tokens = output_tokens = 0
    # Lines that did not succeed, by error type (or result type: expired, canceled).
    failures: Counter[str] = Counter()
    # With an output schema every line takes the general path (the schema checks it).
    read_plain = plain_reader(job.token, spec) if outputs is None else _never_plain
    ctx.progress.start("downloading", batch.request_count)
    try:
        for obj in ctx.client.result_objects(batch.api_batch_id):
            lines += 1
            success = read_plain(obj)
            if success is not None:
                plain.append(success)
                input_tokens += success[6] or 0  # PlainSuccess: input, output tokens
                output_tokens += success[7] or 0
            else:
                record = _general_update(
                    ctx, obj, job, spec, outputs=outputs, user_canceled=user_canceled
                )
                if record is None:
                    foreign += 1
                    continue
                buf.append(record)
                input_tokens += record.input_tokens or 0
                output_tokens += record.output_tokens or 0
                if record.result_type is not ResultType.SUCCEEDED:
                    failures[record.error_type or record.result_type.value] += 1
            if len(buf) + len(plain) >= _APPLY_CHUNK:
                applied += ctx.store.apply_results(job.id, batch.id, buf, plain)
                ctx.progress.advance(len(buf) + len(plain))
                buf.clear()
                plain.clear()
                ctx.heartbeat(job.id)
                failpoint("mid_collect")
    except TransientAPIError:
        # Keep what arrived (it is committed per chunk); the next run downloads again and
        # the already-applied lines change nothing.
        if buf or plain:
            applied += ctx.store.apply_results(job.id, batch.id, buf, plain)
        raise
    except APIError as exc:
        info = ctx.client.retrieve(batch.api_batch_id)
        if info.archived_at is None:
            raise
        return _archived(ctx, job, batch, exc)
    if buf or plain:
        applied += ctx.store.apply_results(job.id, batch.id, buf, plain)
        ctx.progress.advance(len(buf) + len(plain))
    ctx.progress.finish()
    if foreign and foreign == lines:
        return _disown(ctx, job, batch, foreign)
    if foreign:
        message = (
            f"job {job.id}: batch {batch.api_batch_id} holds {foreign} result(s) that are not "
            "this job's; it was adopted as an orphan by mistake. Check it at the API"
        )
        ctx.store.update_job(job.id, status=JobStatus.NEEDS_ATTENTION, error=message)
        raise NeedsAttention(message)
    leftovers = settle_batch(ctx, batch, expected=BatchStatus.ENDED)
    logger.info(
        "batch.collected",
        # Download, parse and store, end to end: the step's latency as a user waits it.
        elapsed_ms=round((time.perf_counter() - started) * 1000),
        lines=lines,
        applied=applied,
        missing=leftovers,
        failures=dict(failures),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )
    release_free_memory()
    return applied


def _never_plain(obj: dict[str, Any]) -> PlainSuccess | None:
    return None


def _disown(ctx: Context, job: JobRow, batch: BatchRow, lines: int) -> int:
    """Give back an adopted batch none of whose results are this job's.

    Recovery adopts a lone running batch of the right size before it can be read (see
    ``submit.recover_planned``); another job's batch of that size (another state database on
    the same API account, say) then proves not ours only here. The job used to stop as
    `needs_attention` for good: `resume` collected the same batch again, and `--resend` wanted
    a planned batch. Planned again, with its rows' custom_ids as they were, recovery decides
    as for any planned batch: it judges the API's batches by their results (this one now
    rules itself out) and sends the rows once none turns out to hold them.
    """
    ctx.store.update_batch(
        batch.id,
        expected_status=BatchStatus.ENDED,
        status=BatchStatus.PLANNED,
        api_batch_id=None,
        created_at=None,
        expires_at=None,
        ended_at=None,
        api_counts=None,
    )
    bind(job, log, batch_id=batch.id).warning(
        "batch.orphan_disowned", api_batch_id=batch.api_batch_id, foreign_lines=lines
    )
    return 0


def settle_batch(
    ctx: Context, batch: BatchRow, *, expected: BatchStatus, error: str | None = None
) -> int:
    """Send the batch's unanswered rows back to pending, then mark it collected.

    Returns how many rows went back. ``error`` may name them as ``{rows}``. Rows first: a
    crash between the two leaves a batch the next step settles again, never rows stuck in
    a settled batch. Always walked, even when collect changed as many items as the batch
    has requests: a result changes the item submitted under its custom_id in whichever
    batch it is, so an adopted duplicate of another batch can answer that many rows and
    leave all of this one's submitted.
    """
    rows = ctx.store.requeue_batch_leftovers(batch.id)
    extra = {} if error is None else {"error": error.format(rows=rows)}
    ctx.store.update_batch(
        batch.id,
        expected_status=expected,
        status=BatchStatus.COLLECTED,
        collected_at=ctx.clock(),
        **extra,
    )
    return rows


def _general_update(
    ctx: Context,
    obj: dict[str, Any],
    job: JobRow,
    spec: JobSpec,
    *,
    outputs: OutputSchema | None,
    user_canceled: bool,
) -> ResultRecord | None:
    """Any line the plain reader declined, as its item's update (classified and refined);
    None for a line that is not this job's."""
    # Raw content blocks only when a schema needs them (the tool call's input).
    record = ctx.client.record_from(obj, keep_content=outputs is not None)
    parsed = parse_custom_id(record.custom_id)
    if parsed is None or parsed[0] != job.token:
        return None
    _, row_index, attempt = parsed
    status = classify(record, attempt, spec.max_attempts, user_canceled)
    return refine(
        record, row_index, attempt, status, spec, outputs=outputs, user_canceled=user_canceled
    )


def _archived(ctx: Context, job: JobRow, batch: BatchRow, exc: APIError) -> int:
    """Results were archived before we collected them: say so loudly, never resend silently."""
    ctx.store.update_batch(batch.id, error=str(exc))
    return _fail_unanswered(
        ctx,
        job,
        batch,
        error_type="results_archived",
        error_message="results were archived (29 days after creation) before batchpipe "
        "collected them; `batchpipe retry` with --error-type results_archived sends them "
        "again (and pays again)",
        status=BatchStatus.ARCHIVED,
        event="batch.archived_before_collection",
    )


def _fail_unanswered(
    ctx: Context,
    job: JobRow,
    batch: BatchRow,
    *,
    error_type: str,
    error_message: str,
    status: BatchStatus,
    event: str,
) -> int:
    """The ended batch's rows still in it end errored with ``error_type`` (final: `retry
    --error-type` sends them again), and the batch ends as ``status``; logged as an error."""
    logger = bind(job, log, batch_id=batch.id, api_batch_id=batch.api_batch_id)
    updates: list[ResultRecord] = []
    for item in ctx.store.iter_batch_items(batch.id, statuses={ItemStatus.SUBMITTED}):
        if item.custom_id is not None:
            updates.append(
                ResultRecord(
                    custom_id=item.custom_id,
                    result_type=ResultType.ERRORED,
                    error_type=error_type,
                    error_message=error_message,
                    row_index=item.row_index,
                    attempt=item.attempts,
                    status=ItemStatus.ERRORED,
                    # Adds nothing to the row's cost, as these lines always have: their
                    # usage is unreadable, and None would make the row's cost unknown.
                    cost_usd=0.0,
                )
            )
    applied = ctx.store.apply_results(job.id, batch.id, updates) if updates else 0
    settled = {"collected_at": ctx.clock()} if status == BatchStatus.COLLECTED else {}
    ctx.store.update_batch(batch.id, expected_status=BatchStatus.ENDED, status=status, **settled)
    logger.error(event, items=applied)
    return applied
