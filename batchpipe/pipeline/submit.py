"""Submit: pack pending items into batches and create them, recording the intent first.

The order of writes is what makes a crash safe: the planned batch (with its items' new
custom_ids) is committed *before* the create call, and the API's batch id right after it.
A crash in between leaves a `planned` batch, which `recover_planned` resolves on the next run
by finding the orphan at the API instead of paying for the same requests twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from batchpipe.dataset import Dataset
from batchpipe.db import BatchRow, ItemRow, JobRow
from batchpipe.errors import (
    APIError,
    AuthenticationFailed,
    InputChangedError,
    NeedsAttention,
    TransientAPIError,
)
from batchpipe.log import get_logger
from batchpipe.models import BatchInfo, BatchStatus, ItemStatus, JobSpec, JobStatus
from batchpipe.pipeline.context import Context, bind, failpoint, job_spec
from batchpipe.requests import (
    BatchPacker,
    PlannedBatch,
    RequestRenderer,
    RowProblem,
    format_custom_id,
)

# Clocks differ between us and the API; widen the window in which an orphan may have been created.
_CLOCK_SKEW = timedelta(minutes=5)

log = get_logger(__name__)


def check_fingerprint(dataset: Dataset, job: JobRow) -> None:
    """Refuse to go on if the input is not the file the job was ingested from."""
    if job.input_fingerprint is None:
        return
    now = dataset.fingerprint()
    if now != job.input_fingerprint:
        raise InputChangedError(
            f"job {job.id} ({job.name}): {dataset.uri} changed since the job was ingested "
            f"(fingerprint {job.input_fingerprint[:24]}… is now {now[:24]}…); refusing to "
            "mislabel rows. Restore the original file, or start a new job with --job NAME"
        )


def _rows_for(
    dataset: Dataset, renderer: RequestRenderer, job: JobRow, wanted: Iterator[ItemRow]
) -> Iterator[tuple[ItemRow, dict[str, object]]]:
    """Merge the input stream with `wanted` items (both in row order): yield each item's params."""
    nxt = next(wanted, None)
    row_index = -1
    for chunk in dataset.iter_rows():
        for row in chunk:
            row_index += 1
            if nxt is None:
                return
            if row_index < nxt.row_index:
                continue
            params = renderer.render(row, row_index)
            if isinstance(params, RowProblem):
                raise InputChangedError(
                    f"job {job.id}: row {row_index + 1} no longer renders ({params.message}); "
                    "the input changed since ingest"
                )
            yield nxt, params
            nxt = next(wanted, None)
    if nxt is not None:
        raise InputChangedError(
            f"job {job.id}: the input has fewer rows than when the job was ingested "
            f"(row {nxt.row_index + 1} is missing)"
        )


def submit_pending(ctx: Context, job: JobRow) -> int:
    """Create batches for every pending item. Returns how many batches were created."""
    if ctx.store.count_items(job.id).get(ItemStatus.PENDING, 0) == 0:
        return 0
    spec = job_spec(job)
    dataset = Dataset(spec.input, spec.input_format)
    check_fingerprint(dataset, job)
    renderer = RequestRenderer(spec)
    packer = BatchPacker(spec.max_batch_requests, spec.max_batch_bytes)
    pending = ctx.store.iter_items(job.id, statuses={ItemStatus.PENDING})
    created = 0
    ctx.progress.start("uploading", ctx.store.count_items(job.id).get(ItemStatus.PENDING, 0))
    for item, params in _rows_for(dataset, renderer, job, pending):
        attempt = item.attempts + 1
        custom_id = format_custom_id(job.token, item.row_index, attempt)
        planned = packer.add(
            item.row_index, custom_id, attempt, renderer.request_bytes(custom_id, params)
        )
        if planned is not None:
            _create(ctx, job, spec, planned)
            created += 1
    last = packer.flush()
    if last is not None:
        _create(ctx, job, spec, last)
        created += 1
    ctx.progress.finish()
    return created


def _create(ctx: Context, job: JobRow, spec: JobSpec, planned: PlannedBatch) -> None:
    """Record the intent, call create, store the id: in that order."""
    round_ = max(attempt for _, _, attempt in planned.items)
    batch = ctx.store.plan_batch(
        job.id, round=round_, items=planned.items, request_bytes=planned.nbytes
    )
    failpoint("after_intent")
    _send(ctx, job, batch, planned.body(), planned.count)
    ctx.progress.advance(planned.count)


def _send(ctx: Context, job: JobRow, batch: BatchRow, body: bytes, count: int) -> BatchInfo:
    logger = bind(job, log, batch_id=batch.id)
    try:
        info = ctx.client.create(body, count=count)
    except TransientAPIError:
        # Maybe created, maybe not: the batch stays `planned` and recovery decides.
        logger.warning("batch.create_uncertain", requests=count)
        raise
    except (AuthenticationFailed, APIError) as exc:
        # A definite refusal (4xx): nothing was created, so the items may go again later.
        ctx.store.release_batch_items(batch.id)
        if not isinstance(exc, AuthenticationFailed):
            ctx.store.update_job(job.id, status=JobStatus.FAILED, error=str(exc))
        logger.error("batch.rejected", requests=count, error=str(exc))
        raise
    failpoint("after_create")
    ctx.store.mark_batch_created(
        batch.id, api_batch_id=info.id, created_at=info.created_at, expires_at=info.expires_at
    )
    logger.info(
        "batch.submitted", api_batch_id=info.id, requests=count, bytes=len(body), round=batch.round
    )
    failpoint("after_mark_created")
    ctx.heartbeat(job.id)
    return info


def recover_planned(ctx: Context, job: JobRow) -> None:
    """Resolve batches whose create may or may not have reached the API (see module doc)."""
    planned = ctx.store.list_batches(job.id, {BatchStatus.PLANNED})
    if not planned:
        return
    logger = bind(job, log)
    known = ctx.store.known_api_batch_ids()
    since = min(b.intent_at for b in planned) - _CLOCK_SKEW
    unclaimed = [b for b in ctx.client.list_batches(created_after=since) if b.id not in known]
    now = ctx.clock()
    for batch in planned:
        candidates = [
            info
            for info in unclaimed
            if info.request_counts.total == batch.request_count
            and info.created_at >= batch.intent_at - _CLOCK_SKEW
        ]
        confirmed = [c for c in candidates if _results_confirm(ctx, job, batch, c)]
        if len(confirmed) == 1 or (len(candidates) == 1 and not confirmed):
            found = confirmed[0] if confirmed else candidates[0]
            # A single unconfirmed candidate is adopted now; collect checks every custom_id.
            ctx.store.mark_batch_created(
                batch.id,
                api_batch_id=found.id,
                created_at=found.created_at,
                expires_at=found.expires_at,
            )
            unclaimed.remove(found)
            logger.warning("batch.orphan_adopted", batch_id=batch.id, api_batch_id=found.id)
        elif len(candidates) > 1:
            ids = ", ".join(c.id for c in candidates)
            message = (
                f"job {job.id}: batch {batch.id} may have been created as any of {ids}; "
                "batchpipe will not guess. Cancel the ones that are not this job's at the API "
                f"and run `batchpipe tick --job {job.name}` again"
            )
            ctx.store.update_job(job.id, status=JobStatus.NEEDS_ATTENTION, error=message)
            raise NeedsAttention(message)
        elif (now - batch.intent_at).total_seconds() >= ctx.orphan_grace_seconds:
            logger.warning(
                "batch.orphan_not_found", batch_id=batch.id, requests=batch.request_count
            )
            resend_planned(ctx, job, batch)
        else:
            logger.info("batch.orphan_pending", batch_id=batch.id)


def _results_confirm(ctx: Context, job: JobRow, batch: BatchRow, info: BatchInfo) -> bool:
    """True when an ended candidate's first result line carries one of this batch's custom_ids."""
    if info.processing_status != "ended" or info.archived_at is not None:
        return False
    first = next(iter(ctx.client.results(info.id)), None)
    if first is None:
        return False
    items = {
        i.custom_id
        for i in ctx.store.iter_items(job.id, statuses={ItemStatus.SUBMITTED})
        if i.batch_id == batch.id
    }
    return first.custom_id in items


def resend_planned(ctx: Context, job: JobRow, batch: BatchRow) -> None:
    """Create a planned batch (again) with exactly the custom_ids recorded in its intent."""
    spec = job_spec(job)
    dataset = Dataset(spec.input, spec.input_format)
    check_fingerprint(dataset, job)
    renderer = RequestRenderer(spec)
    members = (
        i
        for i in ctx.store.iter_items(job.id, statuses={ItemStatus.SUBMITTED})
        if i.batch_id == batch.id
    )
    payloads: list[bytes] = []
    for item, params in _rows_for(dataset, renderer, job, members):
        assert item.custom_id is not None
        payloads.append(renderer.request_bytes(item.custom_id, params))
    body = b'{"requests":[' + b",".join(payloads) + b"]}"
    _send(ctx, job, batch, body, len(payloads))
