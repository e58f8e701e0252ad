"""`tick`: advance every unfinished job one step without waiting, for cron and Airflow.

Never blocks on another worker (a job someone else holds is skipped) and never sleeps;
each job's problems are collected in a :class:`TickReport` for the CLI's lines and exit code.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from batchpipe.db import JobRow
from batchpipe.errors import (
    EXIT_USAGE,
    BatchpipeError,
    JobLocked,
    NeedsAttention,
    RowsFailed,
    StoreBusy,
    StoreUnreachable,
    TransientAPIError,
)
from batchpipe.log import get_logger
from batchpipe.models import JobStatus
from batchpipe.pipeline.context import Context, job_spec
from batchpipe.pipeline.export import export
from batchpipe.pipeline.runner import step
from batchpipe.pipeline.verdict import failed_rows_problem

log = get_logger(__name__)


@dataclass
class TickReport:
    """What one `tick` did, for the CLI's summary and exit code."""

    advanced: list[JobRow] = field(default_factory=list)
    exported: list[tuple[JobRow, str]] = field(default_factory=list)
    locked: list[JobRow] = field(default_factory=list)
    unavailable: list[tuple[JobRow, str]] = field(default_factory=list)
    # (job, why, exit code): 2 when only settings are wrong (no API key, say).
    failed: list[tuple[JobRow, str, int]] = field(default_factory=list)

    def failure_exit_code(self) -> int:
        """2 when every failure is a usage or configuration error, else 1 (0: none)."""
        if not self.failed:
            return 0
        return EXIT_USAGE if all(code == EXIT_USAGE for _, _, code in self.failed) else 1


def _needs_export(job: JobRow) -> bool:
    """A finished job with an output not written since its answers last changed (retry, re-run)."""
    return (
        job.status == JobStatus.DONE
        and job.exported_at is None
        and job_spec(job).output is not None
    )


def tick(ctx: Context, jobs: Collection[JobRow] | None = None) -> TickReport:
    """Advance every active job one step (or the given ones), never blocking on another worker."""
    report = TickReport()
    if jobs is None:
        candidates = ctx.store.list_jobs({JobStatus.RUNNING, JobStatus.CANCELING})
        candidates += [j for j in ctx.store.list_jobs({JobStatus.DONE}) if _needs_export(j)]
        # Jobs of the other side (--emulate, or not) are not this tick's: each would fail.
        candidates = [j for j in candidates if j.emulated == ctx.emulated]
    else:
        candidates = list(jobs)
    for candidate in candidates:
        job = candidate
        leased = False
        try:
            # Inside the try: a database busy or unreachable for this job's lease makes this
            # job unavailable, not the whole tick (the other jobs still get their step).
            if not ctx.try_lease(job):
                report.locked.append(job)
                continue
            leased = True
            fresh = ctx.store.get_job(job.id)  # under the lease: no other worker moves it
            done_before = fresh is not None and fresh.status == JobStatus.DONE
            job = step(ctx, job)
            if job.status == JobStatus.NEEDS_ATTENTION:
                # step() leaves such a job alone; asked for by name, it must keep failing
                # (as `run` does) rather than look fine to cron until a human resolves it.
                why = job.error or f"job {job.id} needs attention"
                report.failed.append((job, why, NeedsAttention.exit_code))
                continue
            report.advanced.append(job)
            exported = _needs_export(job)
            if exported:
                path, _ = export(ctx, job)
                report.exported.append((job, path))
            if job.status == JobStatus.DONE and (jobs is not None or exported or not done_before):
                # Said by the tick that finished (or exported) the job, once: cron mails it.
                # A job asked for by name is judged every time, as `run` does, so a retried
                # Airflow sensor fails again instead of turning the run green.
                problem = failed_rows_problem(job, ctx.store.count_items(job.id))
                if problem is not None:
                    report.failed.append((job, problem, RowsFailed.exit_code))
        except (TransientAPIError, StoreUnreachable, StoreBusy) as exc:
            report.unavailable.append((job, str(exc)))
        except BatchpipeError as exc:
            if isinstance(exc, JobLocked):
                report.locked.append(job)
            else:
                report.failed.append((job, str(exc), exc.exit_code))
        finally:
            if leased:
                _release(ctx, job)
    return report


def _release(ctx: Context, job: JobRow) -> None:
    """Give the job's lease back; a database too busy for it only delays the next worker
    until the lease lapses (or this process is seen dead), so the tick carries on."""
    try:
        ctx.store.release_lease(job.id, ctx.owner)
    except (StoreUnreachable, StoreBusy) as exc:
        log.warning("lease.release_failed", job_id=job.id, error=str(exc))
