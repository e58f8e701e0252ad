"""Re-run what changed: a known job with a new template, model or other request setting.

The input is the one the job was ingested from (its fingerprint is checked), and the job
holds the settings its rows' requests were defined by at ingest or the last re-run: its spec,
or ``request_spec`` once ``retry --max-tokens`` moved the spec on for the retried rows only.
So with new settings each row is rendered twice, with those settings and with the new ones;
only rows whose request differs go back to ``pending``. The others keep their answers and
cost nothing more. (A settings change that leaves a row's request as it was, such as a
column the template does not use, sends nothing.)

The count comes first: :func:`plan_rerun` reads and renders, writes nothing; applying needs
an explicit confirmation (``--yes`` on the command line) and is all or nothing: the new
settings and the re-queued rows commit in one transaction. Attempts keep counting across
the change, because custom_ids encode them and must never repeat; what a re-sent row
already cost stays in its ``cost_usd``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from batchpipe import pricing
from batchpipe.dataset import Dataset
from batchpipe.db import JobRow
from batchpipe.errors import InputChangedError, UsageError
from batchpipe.log import get_logger
from batchpipe.models import BatchStatus, ItemStatus, JobSpec
from batchpipe.pipeline.carry import carried_settings
from batchpipe.pipeline.context import Context, bind, failpoint, job_spec
from batchpipe.pipeline.fingerprint import check_fingerprint
from batchpipe.requests import RequestRenderer, RowProblem

# The store writes 5,000 rows per executemany: at this row the first chunk is written (not
# yet committed), which is where the crash test wants to die.
_FAILPOINT_AFTER = 5_000

log = get_logger(__name__)


@dataclass(frozen=True)
class RerunPlan:
    """How many of a job's rows a change of settings would send again."""

    job_id: int
    job_name: str
    fields: list[str]
    changed: int
    unchanged: int
    # What sending the changed rows again may cost, for plans that were counted (not for
    # one applied); cost_unknown says why there is no figure (a model without a price).
    max_cost_usd: float | None = None
    cost_unknown: str | None = None

    def describe(self) -> str:
        """One line for the terminal."""
        said = (
            f"job {self.job_id} ({self.job_name}) already exists with different "
            f"{', '.join(self.fields)}: that changes the request of {self.changed} of "
            f"{self.changed + self.unchanged} row(s); only those are sent again, the others "
            "keep their results"
        )
        if self.cost_unknown is not None and self.changed:
            return f"{said}; what that costs is unknown: {self.cost_unknown}"
        if self.max_cost_usd is not None and self.changed:
            return (
                f"{said}; sending them costs at most about ${self.max_cost_usd:,.4f} (input "
                "tokens approximated from the request size, every answer at --max-tokens, "
                "batch prices; `batchpipe estimate` counts more closely)"
            )
        return said


def _resend_cost(spec: JobSpec, requests: int, request_bytes: int) -> float | None:
    """The most ``requests`` of ``request_bytes`` cost at ``spec``'s model: input tokens
    approximated offline (no API call while refusing a command), output at max_tokens."""
    price = pricing.price_for(spec.model)
    if price is None:
        return None
    input_rate = price.cache_write if spec.cache_system else price.input
    dollars = (
        pricing.approx_tokens(request_bytes) * input_rate
        + requests * spec.max_tokens * price.output
    )
    return pricing.BATCH_DISCOUNT * dollars / 1e6


@dataclass
class _Bytes:
    """A running total (not a list: memory must not grow with the rows)."""

    total: int = 0


def _changes(
    ctx: Context, job: JobRow, spec: JobSpec, sent_bytes: _Bytes | None = None
) -> Iterator[tuple[int, bool]]:
    """``(row_index, changed?)`` for every sendable row, in row order; with ``sent_bytes``,
    the changed rows' new requests' sizes are added to it (for the cost)."""
    dataset = Dataset(spec.input, spec.input_format)
    check_fingerprint(dataset, job)
    renderer = RequestRenderer(spec)
    # What the rows' requests were defined by; a re-run adopts the new ones (apply_rerun).
    defined_by = (
        job_spec(job) if job.request_spec is None else JobSpec.model_validate(job.request_spec)
    )
    sent_with = RequestRenderer(defined_by)
    items = ctx.store.iter_items(job.id)
    for chunk in dataset.iter_rows():
        for row in chunk:
            item = next(items, None)
            if item is None:
                raise InputChangedError(f"job {job.id}: the input has more rows than its items")
            if item.status is ItemStatus.INVALID:
                continue  # failed pre-flight: never sent, not re-run
            params = renderer.render(row, item.row_index)
            if isinstance(params, RowProblem):
                raise UsageError(
                    f"job {job.id}: with the new settings row {item.row_index + 1} does not "
                    f"render ({params.message}); nothing was changed"
                )
            before = sent_with.render(row, item.row_index)
            new = renderer.canonical_request(params)
            # Compared with keys sorted: the same request whatever order the code built it in.
            differs = isinstance(before, RowProblem) or new != sent_with.canonical_request(before)
            if differs and sent_bytes is not None:
                sent_bytes.total += len(new)
            yield item.row_index, differs


def plan_rerun(ctx: Context, job: JobRow, spec: JobSpec, fields: list[str]) -> RerunPlan:
    """Count the rows whose request the new settings change (reads only)."""
    changed = unchanged = 0
    sent_bytes = _Bytes()
    for _, differs in _changes(ctx, job, spec, sent_bytes):
        if differs:
            changed += 1
        else:
            unchanged += 1
    return RerunPlan(
        job.id,
        job.name,
        fields,
        changed,
        unchanged,
        max_cost_usd=_resend_cost(spec, changed, sent_bytes.total),
        cost_unknown=pricing.unpriced(spec.model),
    )


def apply_rerun(ctx: Context, job: JobRow, spec: JobSpec, fields: list[str]) -> RerunPlan:
    """Adopt the new settings and send the changed rows again. The caller holds the lease.

    One transaction (see ``Store.rerun_items``): a row that does not render, or a crash half
    way, changes nothing, and the same command with ``--yes`` starts over.
    """
    counts = ctx.store.count_items(job.id)
    if counts.get(ItemStatus.SUBMITTED, 0) or ctx.store.list_batches(
        job.id, BatchStatus.unsettled()
    ):
        raise UsageError(
            f"job {job.id} ({job.name}) still has batches in flight; let it finish "
            f"(`batchpipe tick --job {job.name}`) before changing its settings"
        )
    highest = max(ctx.store.attempts_histogram(job.id), default=0)
    old = job_spec(job)
    new_spec = spec.model_copy(
        update={
            # The one rule (pipeline.carry): what the command does not give stays as the job
            # had it (output, budget, result prefix, batch sizes, max_failed …).
            **carried_settings(old, spec),
            # A new round of tries on top of the highest attempt so far: the command's round
            # (default 3), never the job's stored cap, which would add up on every re-run.
            "max_attempts": highest + spec.max_attempts,
        }
    )
    changed, unchanged = ctx.store.rerun_items(
        job.id, _with_failpoint(_changes(ctx, job, spec)), spec=new_spec.model_dump()
    )
    bind(job, log).info("job.rerun", fields=fields, changed=changed, unchanged=unchanged)
    return RerunPlan(job.id, job.name, fields, changed, unchanged)


def _with_failpoint(rows: Iterator[tuple[int, bool]]) -> Iterator[tuple[int, bool]]:
    """``rows``, with the crash tests' ``mid_rerun`` failpoint after the first few thousand."""
    for n, row in enumerate(rows):
        if n == _FAILPOINT_AFTER:
            failpoint("mid_rerun")
        yield row
