"""Drive jobs: `step` (one pass), `run` (to the end), cancel, retry (resume: recover.py)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from batchpipe.dataset import Dataset
from batchpipe.db import JobRow
from batchpipe.errors import (
    APIError,
    BatchNotFound,
    BatchpipeError,
    InputError,
    NeedsAttention,
    TransientAPIError,
    UsageError,
)
from batchpipe.log import get_logger
from batchpipe.models import BatchStatus, ItemStatus, JobSpec, JobStatus
from batchpipe.pipeline.budget import check_estimate
from batchpipe.pipeline.collect import collect, poll
from batchpipe.pipeline.context import (
    Context,
    NullProgress,
    bind,
    check_same_api,
    failpoint,
    job_spec,
    reload_job,
)
from batchpipe.pipeline.export import export
from batchpipe.pipeline.ingest import REQUEST_FIELDS, RequestsChanged, ingest, open_job
from batchpipe.pipeline.preflight import check_output_limit, check_output_writable
from batchpipe.pipeline.rerun import RerunPlan, apply_rerun, plan_rerun
from batchpipe.pipeline.submit import recover_planned, submit_pending
from batchpipe.requests import RequestRenderer

MIN_POLL, MAX_POLL = 30.0, 300.0

log = get_logger(__name__)


def prepare(ctx: Context, name: str, spec: JobSpec, *, confirm_rerun: bool = False) -> JobRow:
    """Create or resume the job and make sure it is ingested (validated rows stored).

    A known job given settings that change its requests (template, model …) is re-run for
    the rows whose request changed, but only with ``confirm_rerun``; without it the error says
    how many rows that would be. With a budget, a job not yet sent is checked against it.
    The output path is checked first (:func:`~batchpipe.dataset.check_writable`).
    """
    check_output_limit(spec)  # before anything is stored or sent
    known = ctx.store.get_job(name)
    # Before anything is spent: an unwritable output would only show at the export. Without
    # -o a known job keeps the output it was given (see open_job).
    check_output_writable(spec if spec.output or known is None else job_spec(known))
    if known is None or not known.ingested:
        _check_startable(spec)  # before a job is recorded: a refused command leaves none
    try:
        job = open_job(ctx, name, spec)
    except RequestsChanged as changed:
        job = changed.job
        with ctx.lease(job):
            if not confirm_rerun:
                plan = plan_rerun(ctx, reload_job(ctx, job), spec, changed.fields)
                raise UsageError(
                    f"{plan.describe()}. Pass --yes to send them, or --dry-run to only count"
                ) from None
            apply_rerun(ctx, reload_job(ctx, job), spec, changed.fields)
        job = reload_job(ctx, job)
    with ctx.lease(job):
        job = reload_job(ctx, job)
        if job.status == JobStatus.FAILED and job.ingested:
            # Running the same command again after fixing the cause resumes the job.
            ctx.store.update_job(
                job.id, expected_status=JobStatus.FAILED, status=JobStatus.RUNNING, error=None
            )
            bind(job, log).info("job.resumed_after_failure")
        return _validate(ctx, reload_job(ctx, job))


def _validate(ctx: Context, job: JobRow) -> JobRow:
    """Ingest the job (validate its rows, store them) and check its budget; the caller holds
    the lease. An input or settings it refuses fail the job, not leave it running with no
    rows: nothing would ever advance it."""
    try:
        job = ingest(ctx, job)
    except (InputError, UsageError) as exc:
        ctx.store.update_job(job.id, status=JobStatus.FAILED, error=str(exc))
        raise
    check_estimate(ctx, job, job_spec(job))
    return job


def _check_startable(spec: JobSpec) -> None:
    """Refuse a template that does not compile, or an input that is missing or of an unknown
    format (UsageError, InputError): what ingest would stop on before reading a row."""
    RequestRenderer(spec)
    Dataset(spec.input, spec.input_format)


def check_rerun(ctx: Context, name: str, spec: JobSpec) -> RerunPlan | None:
    """What re-running a known job with ``spec`` would send (for --dry-run); writes nothing.

    None when there is no such job or its requests would not change. For a job not yet
    recorded the templates are compiled and the input opened, as the real command would
    first: a dry run of a command that would be refused is refused too.
    """
    check_output_limit(spec)
    job = ctx.store.get_job(name)
    if job is None:
        _check_startable(spec)
        return None
    old = job_spec(job).model_dump(include=set(REQUEST_FIELDS))
    new = spec.model_dump(include=set(REQUEST_FIELDS))
    fields = sorted(k for k in new if new[k] != old.get(k))
    return plan_rerun(ctx, job, spec, fields) if fields else None


def earlier_job(ctx: Context, name: str, spec: JobSpec) -> tuple[JobRow, list[str]] | None:
    """A job of another name that already holds rows of this input for this output.

    A job's default name hashes its settings, so a run with a changed prompt and no
    ``--job`` would start a new job: every row sent (and paid for) again, and the earlier
    job's output overwritten. Returns that earlier job (the newest) and the settings that
    differ, or None when ``name`` is a known job or no other job writes this output.
    """
    if spec.output is None or ctx.store.get_job(name) is not None:
        return None
    new = spec.model_dump()
    for job in ctx.store.list_jobs():
        old = job_spec(job).model_dump()
        if not job.ingested or job.row_count == 0:
            continue  # refused before anything was stored or sent: nothing to keep
        if job.emulated and not ctx.emulated:
            continue  # stand-in answers: the real run is meant to replace its output
        if old["input"] == new["input"] and old["output"] == new["output"]:
            compared = (*sorted(REQUEST_FIELDS), "id_column", "input_format")
            return job, [k for k in compared if old.get(k) != new.get(k)]
    return None


def step(ctx: Context, job: JobRow) -> JobRow:
    """Advance a job once without waiting: recover, poll, collect, resubmit, finish.

    The caller holds the job's lease.
    """
    job = reload_job(ctx, job)
    if not job.status.is_active():
        return job
    check_same_api(ctx, job)
    if not job.ingested and job.status == JobStatus.RUNNING:
        # Its rows were never validated: the command that started it failed or died first
        # (a killed submit, a locked database), or `resume` put back a job whose input had
        # been refused. Cron's tick validates it now, as that command would have: from the
        # stored settings and input, checked as at the start (a refused input fails the
        # job, exit 1, with the reason), rather than report it running with 0 rows forever.
        check_output_writable(job_spec(job))
        job = _validate(ctx, job)
        if job.status != JobStatus.RUNNING:
            return job  # an empty input: done at once
    recover_planned(ctx, job)
    poll(ctx, job)
    if job.status == JobStatus.CANCELING:
        # After the poll, so batches that ended meanwhile are not asked; a cancel the API
        # refuses now is asked again by the next step, and the collect goes on.
        failed = _cancel_in_flight(ctx, job)
        if failed is not None:
            bind(job, log).warning("job.cancel_incomplete", error=str(failed))
    collect(ctx, job)
    job = reload_job(ctx, job)
    if job.status == JobStatus.CANCELING:
        ctx.store.cancel_pending(job.id)
    else:
        submit_pending(ctx, job)
    return _finish_if_done(ctx, job)


def _finish_if_done(ctx: Context, job: JobRow) -> JobRow:
    # Batches first: a batch still out settles the question without counting the items
    # (a walk over the job's rows, there being no status index).
    if ctx.store.list_batches(job.id, BatchStatus.unsettled()):
        return job
    # The token sums and the cost come with the counts: the log line below wants them, and
    # the end of `run` shows the counts and cost (finished_totals).
    counts, usage, cost = ctx.store.count_items_and_usage(job.id)
    if counts.get(ItemStatus.PENDING, 0) + counts.get(ItemStatus.SUBMITTED, 0):
        return job
    final = JobStatus.CANCELED if job.status == JobStatus.CANCELING else JobStatus.DONE
    if ctx.store.update_job(job.id, expected_status=job.status, status=final):
        bind(job, log).info(
            "job.finished",
            status=final.value,
            **{k.value: v for k, v in counts.items()},
            **usage,
            cost_usd=None if cost is None else round(cost, 6),
        )
        # The latest job's only: a long-lived process finishing many jobs keeps one.
        ctx.finished_totals = {job.id: (counts, cost)}
    return reload_job(ctx, job)


def finished_totals(ctx: Context, job: JobRow) -> tuple[dict[ItemStatus, int], float | None]:
    """The items of a job that :func:`run` just ran to its end, by status, and the dollars
    paid for them (None when some rows' cost is unknown).

    Those taken as this run finished the job when it did (under the job's lease, with
    nothing left in flight: a finished job's items stay as they are until a `retry`), else
    (finished earlier, or by another worker) counted now. Spares the end of `run` two walks
    over the job's rows (at a million items on SQLite, 0.4-0.5 s of CPU each on a busy
    machine).
    """
    totals = ctx.finished_totals.pop(job.id, None)
    if totals is None:
        counts, _, cost = ctx.store.count_items_and_usage(job.id)
        return counts, cost
    return totals


class Backoff:
    """Poll interval: fixed when the user set one, else 30 s growing to 5 min while idle."""

    def __init__(self, fixed: float | None) -> None:
        self.fixed = fixed
        self.current = MIN_POLL

    def next(self, progressed: bool) -> float:
        """Seconds to sleep before the next poll."""
        if self.fixed is not None:
            return self.fixed
        self.current = MIN_POLL if progressed else min(self.current * 1.5, MAX_POLL)
        return self.current


def _fingerprint(ctx: Context, job: JobRow) -> tuple[int, ...]:
    counts = ctx.store.count_items(job.id)
    batches = ctx.store.list_batches(job.id)
    return (*sorted(counts.values()), *(len(b.status) for b in batches), len(batches))


def _no_fingerprint(ctx: Context, job: JobRow) -> tuple[int, ...]:
    return ()


_API_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")


def _api_counts(ctx: Context, job: JobRow) -> dict[str, int]:
    """The API's request_counts at the last poll, summed over the job's batches in flight."""
    totals = dict.fromkeys(_API_COUNTS, 0)
    for batch in ctx.store.list_batches(job.id, BatchStatus.unsettled()):
        if batch.api_counts is None:  # sent this step, not polled yet: all still processing
            totals["processing"] += batch.request_count
        for key, n in (batch.api_counts or {}).items():
            if key in totals:
                totals[key] += n
    return totals


def _show_waiting(ctx: Context, job: JobRow) -> None:
    """Report `waiting` once per poll: one ``job.waiting`` log line with the API's counts,
    and on a TTY a bar of rows processed (final in the store, or finished at the API in a
    batch not yet collected) with those counts beside it.

    Rows only become final when a batch ends and is collected, so the API's counts are what
    shows a batch moving while it runs.
    """
    api = _api_counts(ctx, job)
    bind(job, log).info("job.waiting", **api)
    if isinstance(ctx.progress, NullProgress):
        return  # nothing is drawn: spare the count (a walk over the job's rows)
    counts = ctx.store.count_items(job.id)
    unfinished = counts.get(ItemStatus.PENDING, 0) + counts.get(ItemStatus.SUBMITTED, 0)
    finished_at_api = sum(n for k, n in api.items() if k != "processing")
    done = min(job.row_count - unfinished + finished_at_api, job.row_count)
    detail = ", ".join(f"{n:,} {k}" for k, n in api.items() if n)
    ctx.progress.update("waiting", max(done, 0), job.row_count, f"API: {detail}" if detail else "")


def run(ctx: Context, job: JobRow, *, poll_interval: float | None = None) -> JobRow:
    """Work on a job until it is finished, sleeping between polls. Holds the lease throughout.

    Transient API trouble never ends the run: it waits and tries again. The job's
    ``--poll-interval`` is the one its latest command gave (see pipeline.carry);
    ``poll_interval`` stands in when it has none (the emulator's short wait), not stored.
    """
    spec = job_spec(job)
    backoff = Backoff(spec.poll_interval if spec.poll_interval is not None else poll_interval)
    ctx.finished_totals.pop(job.id, None)  # only this run's finish totals (finished_totals)
    with ctx.lease(job):
        # Progress only matters to the adaptive backoff; a fixed interval skips the counts
        # (a walk over the job's rows each, twice per poll).
        progress = _fingerprint if backoff.fixed is None else _no_fingerprint
        while True:
            before = progress(ctx, job)
            try:
                job = step(ctx, job)
            except TransientAPIError as exc:
                bind(job, log).warning("job.api_unavailable", error=str(exc))
                ctx.pause(job.id, backoff.next(progressed=False))
                continue
            if job.status.is_terminal():
                break
            if job.status == JobStatus.NEEDS_ATTENTION:
                raise NeedsAttention(job.error or f"job {job.id} needs attention")
            _show_waiting(ctx, job)
            ctx.pause(job.id, backoff.next(progressed=progress(ctx, job) != before))
        if job.status == JobStatus.FAILED:
            raise BatchpipeError(job.error or f"job {job.id} ({job.name}) failed")
        if job.status == JobStatus.DONE and spec.output:
            export(ctx, job)
    return job


def cancel(ctx: Context, job: JobRow) -> JobRow:
    """Cancel a job: pending rows are never sent, in-flight batches are canceled at the API.

    The job drains (its canceled batches are collected) on the next `tick`/`run` and ends as
    `canceled`, with every item's final status recorded.
    """
    check_same_api(ctx, job)
    with ctx.lease(job):
        job = reload_job(ctx, job)
        if job.status.is_terminal():
            return job
        ctx.store.update_job(job.id, expected_status=job.status, status=JobStatus.CANCELING)
        recover_planned(ctx, reload_job(ctx, job))
        failed = _cancel_in_flight(ctx, job)
        if failed is not None:
            raise failed
        canceled = ctx.store.cancel_pending(job.id)
        bind(job, log).info("job.cancel_requested", pending_canceled=canceled)
        return step(ctx, reload_job(ctx, job))


def _cancel_in_flight(ctx: Context, job: JobRow) -> APIError | None:
    """Ask the API to cancel each batch of a canceling job still in progress (as we last
    saw it); each one canceled is marked canceling. Returns the first error of a cancel
    the API refused for now (the others are still asked), or None.

    Run by `cancel`, and by every step of a canceling job: a `cancel` that stopped part-way
    (killed, or the API overloaded: exit 75, "try later") left batches in progress, which
    ran on, paid for, until a second `cancel`. A batch whose cancel was sent but not
    recorded is asked again; the API answers a canceling batch as it is. A canceling job
    adopts no orphan it cannot confirm (``recover_planned``), so no one else's batch is
    canceled here.
    """
    failed: APIError | None = None
    for batch in ctx.store.list_batches(job.id, {BatchStatus.IN_PROGRESS}):
        assert batch.api_batch_id is not None
        try:
            ctx.client.cancel(batch.api_batch_id)
        except TransientAPIError as exc:
            failed = failed or exc
            continue
        except APIError as exc:
            # The API refuses to cancel a batch that ended since our last poll; poll and
            # collect take it from here, and the other batches still need their cancel.
            try:
                info = ctx.client.retrieve(batch.api_batch_id)
            except BatchNotFound:
                # Gone at the API (deleted in the Console): nothing left to cancel. The
                # next step settles it for the canceling job (collect.lost_batch).
                continue
            except APIError as retrieved:
                failed = failed or retrieved
                continue
            if info.processing_status != "ended":
                failed = failed or exc
            continue
        ctx.store.update_batch(
            batch.id, expected_status=BatchStatus.IN_PROGRESS, status=BatchStatus.CANCELING
        )
    return failed


# The tries of one round when the command gives none (JobSpec's default).
_ROUND_TRIES: int = JobSpec.model_fields["max_attempts"].default


def retry(
    ctx: Context,
    job: JobRow,
    *,
    statuses: Collection[ItemStatus],
    error_types: Collection[str] | None = None,
    max_tokens: int | None = None,
    max_attempts: int | None = None,
) -> int:
    """Send finished-but-failed items round again, each with a full set of tries (attempts
    keep counting and the job's cap grows). Returns how many.

    ``max_attempts`` is the tries of this round (default: JobSpec's, 3), added to the
    highest attempt so far, as a re-run counts them (pipeline.carry). Not the job's stored
    cap: that already holds every earlier round, and adding it doubled the tries of a
    second retry (3, 6, 12 where 9 was due)."""
    with ctx.lease(job):
        job = reload_job(ctx, job)
        if job.status in {JobStatus.CANCELING}:
            # "Not now", as resume says it (exit 2); nothing is wrong with the input.
            raise UsageError(
                f"job {job.id} ({job.name}) is being canceled; wait until it is canceled "
                "(`batchpipe tick` drains it), then retry (`--status canceled` sends its "
                "canceled rows too)"
            )
        spec = job_spec(job)
        check_output_writable(spec)
        # Attempts keep counting (custom_ids encode them and must never repeat); the job's
        # cap grows instead, so every requeued row gets a full set of fresh tries.
        # Over the rows this retry requeues only: counting rows its --error-type leaves out
        # (an api_error row at attempt 3 beside invalid_request_error rows at 1) gave the
        # requeued ones their tries and then some.
        highest = wanted = 0
        for item in ctx.store.iter_items(job.id, statuses=statuses):
            if error_types is None or item.error_type in error_types:
                highest = max(highest, item.attempts)
                wanted += 1
        round_tries = max_attempts if max_attempts is not None else _ROUND_TRIES
        updates: dict[str, object] = {"max_attempts": highest + round_tries}
        moved: dict[str, Any] = {}
        if max_tokens is not None:
            updates["max_tokens"] = max_tokens
            if max_tokens != spec.max_tokens and job.request_spec is None:
                # Only the requeued rows go out with it: what the others were sent with is
                # kept for a later re-run to compare against (see pipeline/rerun.py).
                moved["request_spec"] = spec.model_dump()
        try:
            # Checked before it is stored: a spec the model refuses would make the job
            # unreadable to every later command (status, tick, export).
            new_spec = JobSpec.model_validate({**spec.model_dump(), **updates})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise UsageError(f"retry: invalid setting ({exc}); nothing was changed") from None
        check_output_limit(new_spec)  # a --max-tokens the model refuses errs every row again
        if not wanted:
            # Nothing to send, so nothing changes: a --max-tokens stored here made a later
            # `run --job NAME --max-tokens N` see no change and send nothing (truncated
            # answers are succeeded rows, which retry does not pick).
            return 0
        # The output file will no longer hold these rows' final answers: export it again.
        # Marked before the rows are requeued, not after: a crash between the two then
        # leaves a running job that simply finishes again (retry can be run again), where
        # the other order left a `done` job with pending rows that run, tick and retry all
        # passed by.
        moved.update(status=JobStatus.RUNNING, error=None, exported_at=None)
        ctx.store.update_job(job.id, spec=new_spec.model_dump(), **moved)
        failpoint("before_requeue")
        count = ctx.store.requeue_items(job.id, statuses=statuses, error_types=error_types)
        failpoint("after_requeue")
        bind(job, log).info("job.retry", items=count, statuses=sorted(s.value for s in statuses))
        return count
