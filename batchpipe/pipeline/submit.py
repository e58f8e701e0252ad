"""Submit: pack pending items into batches and create them, recording the intent first.

The order of writes is what makes a crash safe: the planned batch (with its items' new
custom_ids) is committed *before* the create call, and the API's batch id right after it.
A crash in between leaves a `planned` batch, which `recover_planned` resolves on the next run
by finding the orphan at the API instead of paying for the same requests twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from typing import IO, Protocol, TypeVar

from batchpipe.dataset import Dataset
from batchpipe.db import BatchRow, ItemRow, JobRow, PendingItem
from batchpipe.errors import (
    APIError,
    AuthenticationFailed,
    CreateRefused,
    InputChangedError,
    NeedsAttention,
    TransientAPIError,
)
from batchpipe.log import get_logger
from batchpipe.memory import release_free_memory
from batchpipe.models import BatchInfo, BatchStatus, ItemStatus, JobSpec, JobStatus
from batchpipe.pipeline.budget import BudgetGuard
from batchpipe.pipeline.context import Context, api_clock_skew, bind, failpoint, job_spec
from batchpipe.pipeline.fingerprint import check_fingerprint
from batchpipe.pipeline.outcome import may_resize, request_for
from batchpipe.requests import (
    BatchPacker,
    PlannedBatch,
    RequestRenderer,
    RowProblem,
    format_custom_id,
)

# Clocks differ between us and the API; widen the window in which an orphan may have been created.
_CLOCK_SKEW = timedelta(minutes=5)
# How far before its intent the last look for an orphan searches (see _found_in_a_wider_look).
_LAST_LOOK = timedelta(days=1)

log = get_logger(__name__)


class _Wanted(Protocol):
    @property
    def row_index(self) -> int: ...

    @property
    def stop_reason(self) -> str | None: ...


_W = TypeVar("_W", bound=_Wanted)


def _payloads(
    dataset: Dataset,
    renderer: RequestRenderer,
    job: JobRow,
    wanted: Iterator[_W],
    custom_id: Callable[[_W], str],
) -> Iterator[tuple[_W, str, bytes]]:
    """Merge the input stream with `wanted` items (both in row order): yield each item with
    its custom_id and its request's bytes, a chunk of the input at a time."""
    spec = job_spec(job)
    nxt = next(wanted, None)
    first_row = 0
    for chunk in dataset.iter_chunks(columns=renderer.columns_to_read()):
        if nxt is None:
            return
        end = first_row + len(chunk)
        here: list[_W] = []
        while nxt is not None and nxt.row_index < end:
            here.append(nxt)
            nxt = next(wanted, None)
        if here:
            # A first round wants every row; a retry round a few, rendered alone.
            picks = None if len(here) == len(chunk) else [w.row_index - first_row for w in here]
            ids = [custom_id(w) for w in here]
            if may_resize((w.stop_reason for w in here), spec):
                rendered = renderer.render_chunk(chunk, first_row, picks)
                payloads: list[bytes | RowProblem] = [
                    p
                    if isinstance(p, RowProblem)
                    else renderer.request_bytes(i, request_for(w.stop_reason, p, spec))
                    for w, i, p in zip(here, ids, rendered, strict=True)
                ]
            else:
                payloads = renderer.request_payloads(chunk, first_row, picks, ids)
            for item, item_id, payload in zip(here, ids, payloads, strict=True):
                if isinstance(payload, RowProblem):
                    raise InputChangedError(
                        f"job {job.id}: row {item.row_index + 1} no longer renders "
                        f"({payload.message}); the input changed since ingest"
                    )
                yield item, item_id, payload
        first_row = end
    if nxt is not None:
        raise InputChangedError(
            f"job {job.id}: the input has fewer rows than when the job was ingested "
            f"(row {nxt.row_index + 1} is missing)"
        )


def submit_pending(ctx: Context, job: JobRow) -> int:
    """Create batches for every pending item. Returns how many batches were created."""
    pending_count = ctx.store.count_pending(job.id)
    if pending_count == 0:
        return 0
    spec = job_spec(job)
    dataset = Dataset(spec.input, spec.input_format)
    check_fingerprint(dataset, job, ctx)
    renderer = RequestRenderer(spec)
    pending = ctx.store.iter_pending(job.id)
    created = 0
    guard = BudgetGuard(ctx, job, spec)
    ctx.progress.start("uploading", pending_count)
    with BatchPacker(spec.max_batch_requests, spec.max_batch_bytes) as packer:

        def next_id(item: PendingItem) -> str:
            return format_custom_id(job.token, item.row_index, item.attempts + 1)

        for item, custom_id, payload in _payloads(dataset, renderer, job, pending, next_id):
            planned = packer.add(item.row_index, custom_id, item.attempts + 1, payload)
            if planned is not None:
                if not _create_within_budget(ctx, job, spec, guard, planned):
                    break  # over budget: the rest stay pending (guard.finish decides)
                created += 1
        else:
            last = packer.flush()
            if last is not None and _create_within_budget(ctx, job, spec, guard, last):
                created += 1
    ctx.progress.finish()
    guard.finish()
    return created


def _create_within_budget(
    ctx: Context, job: JobRow, spec: JobSpec, guard: BudgetGuard, planned: PlannedBatch
) -> bool:
    """Create ``planned`` unless the budget refuses it; either way its body file is deleted."""
    with planned:
        if not guard.admit(planned.count, planned.nbytes):
            return False
        _create(ctx, job, spec, planned)
        return True


def _create(ctx: Context, job: JobRow, spec: JobSpec, planned: PlannedBatch) -> None:
    """Record the intent, call create, store the id: in that order."""
    round_ = max(attempt for _, _, attempt in planned.items)
    batch = ctx.store.plan_batch(
        job.id, round=round_, items=planned.items, request_bytes=planned.nbytes
    )
    failpoint("after_intent")
    _send(ctx, job, batch, planned.body_file(), count=planned.count, nbytes=planned.nbytes)
    ctx.progress.advance(planned.count)
    release_free_memory()


def _send(
    ctx: Context, job: JobRow, batch: BatchRow, body: bytes | IO[bytes], *, count: int, nbytes: int
) -> BatchInfo:
    logger = bind(job, log, batch_id=batch.id)
    ctx.heartbeat(job.id)  # an upload of up to 256 MB may take a while
    try:
        info = ctx.client.create(body, count=count, nbytes=nbytes)
    except CreateRefused:
        # Turned away for now (429/529/503): certainly not created, so no orphan to wait
        # for; the items go back to pending and the next submit sends them.
        ctx.store.release_batch_items(batch.id)
        logger.warning("batch.create_refused", requests=count)
        raise
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
        "batch.submitted",
        api_batch_id=info.id,
        requests=count,
        bytes=nbytes,
        round=batch.round,
        request_id=info.request_id,
        latency_ms=info.latency_ms,
    )
    failpoint("after_mark_created")
    ctx.heartbeat(job.id)
    return info


def recover_planned(ctx: Context, job: JobRow) -> None:
    """Resolve batches whose create may or may not have reached the API.

    For each `planned` batch, the API's batches created since its intent that no job has
    claimed and that hold as many requests are candidates. An ended candidate is judged by
    its results: one of this batch's custom_ids confirms it, anything else rules it out.
    Then: a confirmed candidate is adopted; else a single open candidate (still running) is
    adopted, and collect checks every custom_id; several open ones wait until they end and
    can be told apart; none at all past the grace period means the create never arrived, so
    the same custom_ids are sent again. Only a state no later look can settle (several
    candidates whose results can no longer be read) stops the job as `needs_attention`.
    """
    planned = ctx.store.list_batches(job.id, {BatchStatus.PLANNED})
    if not planned:
        return
    logger = bind(job, log)
    known = ctx.store.known_api_batch_ids()
    first_intent = min(b.intent_at for b in planned)
    margin = _CLOCK_SKEW
    listed = list(ctx.client.list_batches(created_after=first_intent - margin))
    # intent_at is our clock, created_at the API's: an API clock behind ours by more than
    # the margin puts the orphan before the window, to be paid for twice. The list has just
    # told us the API's time; if it lags that much, widen by the lag and look again. (One
    # ahead of ours needs nothing: the orphan is then later than the window's start.)
    lag = -api_clock_skew(ctx)
    if lag > _CLOCK_SKEW / 5:
        margin = _CLOCK_SKEW + lag
        listed = list(ctx.client.list_batches(created_after=first_intent - margin))
        logger.info("batch.orphan_window_widened", clock_lag_seconds=round(lag.total_seconds()))
    unclaimed = [b for b in listed if b.id not in known]
    now = ctx.clock()
    sizes = Counter(b.request_count for b in planned)
    for batch in planned:
        candidates = [
            info
            for info in unclaimed
            if info.request_counts.total == batch.request_count
            and info.created_at >= batch.intent_at - margin
        ]
        members: set[str] | None = None
        confirmed: list[BatchInfo] = []
        running: list[BatchInfo] = []
        unreadable: list[BatchInfo] = []
        for info in candidates:
            if info.processing_status != "ended":
                running.append(info)
                continue
            if members is None:
                members = _member_ids(ctx, batch)
            verdict = _results_confirm(ctx, info, members)
            if verdict is None:
                unreadable.append(info)
            elif verdict:
                confirmed.append(info)
        if confirmed:
            # Two confirmed copies mean the API already ran these requests twice; either
            # holds the answers, so take the oldest and say so.
            found = min(confirmed, key=lambda c: c.created_at)
            if len(confirmed) > 1:
                logger.error(
                    "batch.orphan_duplicate",
                    batch_id=batch.id,
                    api_batch_ids=[c.id for c in confirmed],
                )
            _adopt(ctx, job, batch, found, unclaimed, confirmed=True)
        elif (
            len(running) + len(unreadable) == 1
            and running
            and sizes[batch.request_count] == 1
            and job.status != JobStatus.CANCELING
        ):
            # Unconfirmed adoption only when no other planned batch of this job could own
            # that API batch too; otherwise wait until its results tell them apart. Not for a
            # job being canceled: its steps cancel what it adopts, and a batch of another
            # state database on the same key would be canceled; it waits until it ends.
            _adopt(ctx, job, batch, running[0], unclaimed, confirmed=False)
        elif running:
            logger.warning(
                "batch.orphan_ambiguous",
                batch_id=batch.id,
                candidates=[c.id for c in running + unreadable],
            )  # decided once they end and their results can be read
        elif unreadable:
            ids = ", ".join(c.id for c in unreadable)
            message = (
                f"job {job.id}: batch {batch.id} may have been created as {ids}, whose results "
                "can no longer be read (archived); batchpipe will not guess whether they hold "
                "this job's rows or send them again. Check at the API, then `batchpipe resume "
                f"{job.name} --adopt BATCH_ID` or `--resend`; `batchpipe status {job.name}` "
                "shows the rows affected"
            )
            ctx.store.update_job(job.id, status=JobStatus.NEEDS_ATTENTION, error=message)
            raise NeedsAttention(message)
        elif (now - batch.intent_at).total_seconds() >= ctx.orphan_grace_seconds:
            if _found_in_a_wider_look(ctx, job, batch, known | {b.id for b in listed}):
                continue
            logger.warning(
                "batch.orphan_not_found", batch_id=batch.id, requests=batch.request_count
            )
            if job.status == JobStatus.CANCELING:
                ctx.store.release_batch_items(batch.id)  # never sent: cancel_pending drops them
            else:
                resend_planned(ctx, job, batch)
        else:
            # Say how long until it is sent again: a create interrupted before it left
            # looks the same as one the API's list does not show yet, and waits the grace.
            waited = (now - batch.intent_at).total_seconds()
            logger.info(
                "batch.orphan_pending",
                batch_id=batch.id,
                resend_in_s=max(0, round(ctx.orphan_grace_seconds - waited)),
            )


def _adopt(
    ctx: Context,
    job: JobRow,
    batch: BatchRow,
    found: BatchInfo,
    unclaimed: list[BatchInfo],
    *,
    confirmed: bool,
) -> None:
    ctx.store.mark_batch_created(
        batch.id, api_batch_id=found.id, created_at=found.created_at, expires_at=found.expires_at
    )
    unclaimed.remove(found)
    bind(job, log).warning(
        "batch.orphan_adopted", batch_id=batch.id, api_batch_id=found.id, confirmed=confirmed
    )


def _found_in_a_wider_look(ctx: Context, job: JobRow, batch: BatchRow, seen: set[str]) -> bool:
    """The last look before sending a planned batch again: a day of the API's batches.

    The window above trusts the clock gap measured now, but this host's clock may have been
    stepped since it stamped the intent (NTP after the reboot that followed the crash), and
    then no gap measured now describes it. So before paying again, batches of the same size
    created up to a day before the intent are checked too, and only proof counts: an ended
    one whose results hold one of this batch's custom_ids is adopted; a running one means
    waiting until its results can tell. True when the batch was adopted or must wait.
    """
    members: set[str] | None = None
    running: list[str] = []
    for info in ctx.client.list_batches(created_after=batch.intent_at - _LAST_LOOK):
        if info.id in seen or info.request_counts.total != batch.request_count:
            continue
        if info.processing_status != "ended":
            running.append(info.id)
            continue
        if members is None:
            members = _member_ids(ctx, batch)
        if _results_confirm(ctx, info, members):
            _adopt(ctx, job, batch, info, [info], confirmed=True)
            return True
    if running:
        bind(job, log).warning("batch.orphan_ambiguous", batch_id=batch.id, candidates=running)
        return True
    return False


def _member_ids(ctx: Context, batch: BatchRow) -> set[str]:
    """The custom_ids recorded in a planned batch's intent."""
    return {
        i.custom_id
        for i in ctx.store.iter_batch_items(batch.id, statuses={ItemStatus.SUBMITTED})
        if i.custom_id is not None
    }


def _results_confirm(ctx: Context, info: BatchInfo, members: set[str]) -> bool | None:
    """Whether an ended candidate's first result line is one of ``members``.

    None when its results cannot be read (archived, or refused): nothing can be told from it.
    Custom_ids carry the job's random token, row and attempt, so one line is proof either way.
    """
    if info.archived_at is not None:
        return None
    lines = ctx.client.results(info.id)
    try:
        first = next(lines, None)
    except TransientAPIError:
        raise
    except APIError:
        return None
    finally:
        if isinstance(lines, Generator):
            lines.close()  # one line is all we need: hang up on the rest of the download
    if first is None:
        return None
    return first.custom_id in members


def resend_planned(ctx: Context, job: JobRow, batch: BatchRow) -> None:
    """Create a planned batch (again) with exactly the custom_ids recorded in its intent."""
    spec = job_spec(job)
    dataset = Dataset(spec.input, spec.input_format)
    check_fingerprint(dataset, job, ctx)
    renderer = RequestRenderer(spec)
    members = ctx.store.iter_batch_items(batch.id, statuses={ItemStatus.SUBMITTED})
    # The wait for a late-appearing orphan starts over from this send.
    if not ctx.store.update_batch(
        batch.id, expected_status=BatchStatus.PLANNED, intent_at=ctx.clock()
    ):
        return
    # Into a temporary file like a first send: a batch may be up to 256 MB.
    with PlannedBatch() as body:
        for _, _, payload in _payloads(dataset, renderer, job, members, _recorded_id):
            body.append(payload)
        _send(ctx, job, batch, body.body_file(), count=body.count, nbytes=body.nbytes)


def _recorded_id(item: ItemRow) -> str:
    """The custom_id a planned batch's item was recorded with (its intent)."""
    assert item.custom_id is not None
    return item.custom_id
