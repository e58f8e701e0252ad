"""Whether a finished job succeeded: its rows without an answer, against ``--max-failed``.

A job whose every row errored is `done` (each row has its final status, the output is
written), but cron and Airflow must hear that it failed: the exit code is their only signal.
"""

from __future__ import annotations

from collections.abc import Mapping

from batchpipe.db import JobRow
from batchpipe.errors import RowsFailed
from batchpipe.models import ItemStatus, JobStatus
from batchpipe.pipeline.context import job_spec


def rows_failed(job: JobRow, counts: Mapping[ItemStatus, int]) -> RowsFailed | None:
    """The error to exit with when more of a done job's rows failed than its spec allows.

    ``counts``: the job's items by status (``Store.count_items``). None for a job that is
    not done, or within its limit.
    """
    problem = failed_rows_problem(job, counts)
    return None if problem is None else RowsFailed(f"job {job.id} ({job.name}): {problem}")


def failed_rows_problem(job: JobRow, counts: Mapping[ItemStatus, int]) -> str | None:
    """What :func:`rows_failed` says, without naming the job (for lists that name it)."""
    if job.status != JobStatus.DONE:
        return None
    failed = {status: n for status, n in counts.items() if status.is_failure() and n}
    total_failed = sum(failed.values())
    # The rows meant to be answered: canceled ones were stopped by the user, and counting
    # them would let a job with no answer at all pass the default limit.
    rows = sum(n for status, n in counts.items() if status != ItemStatus.CANCELED)
    spec = job_spec(job)
    allowed = spec.failed_rows_allowed(rows)
    if total_failed <= allowed:
        return None
    by_status = ", ".join(f"{status.value} {n:,}" for status, n in sorted(failed.items()))
    if spec.max_failed is None:
        verdict = f"no row got an answer ({rows:,} rows: {by_status})"
        accept = "pass --max-failed (max_failed in a job file) to accept failed rows"
    else:
        verdict = (
            f"{total_failed:,} of {rows:,} rows ended without an answer ({by_status}), "
            f"more than --max-failed {spec.max_failed} allows ({allowed:,})"
        )
        accept = "raise --max-failed (max_failed in a job file) to accept them"
    where = f"the output {spec.output} has each row's error; " if spec.output else ""
    return f"{verdict}; {where}`batchpipe report {job.name}` groups the errors; {accept}"
