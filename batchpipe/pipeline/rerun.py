"""Re-run what changed: a known job with a new template, model or other request setting.

The input is the one the job was ingested from (its fingerprint is checked), and the job
holds the settings its rows' requests were defined by at ingest or the last re-run: its spec,
or ``request_spec`` once ``retry --max-tokens`` moved the spec on for the retried rows only.
So with new settings each row is rendered twice, with those settings and with the new ones;
only rows whose request differs go back to ``pending``. The others keep their answers and
cost nothing more. (A settings change that leaves a row's request as it was, such as a
column the template does not use, sends nothing.)

Rows ``invalid`` at validation (a ``--skip-invalid`` job) are checked again too: one the new
settings render is a changed row, sent like the others; one they still cannot render stays
invalid with their message. A row the new settings cannot render is, with ``skip_invalid``
(the job's, or the command's), exported as invalid and not sent, its earlier answer kept in
the history as a re-sent row's is; without it the whole re-run is refused, as validation
refuses such a job.

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
from batchpipe.requests import RequestRenderer, RowProblem, check_row_key

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
    # Of the changed rows, those that were invalid (never sent) and now render; and the rows
    # the new settings cannot render (exported invalid, not sent).
    were_invalid: int = 0
    invalid: int = 0

    def describe(self) -> str:
        """One line for the terminal."""
        before = f" ({self.were_invalid} of them invalid before)" if self.were_invalid else ""
        said = (
            f"job {self.job_id} ({self.job_name}) already exists with different "
            f"{', '.join(self.fields)}: that changes the request of {self.changed} of "
            f"{self.changed + self.unchanged + self.invalid} row(s){before}; only those are "
            "sent again, the others keep their results"
        )
        if self.invalid:
            said += (
                f"; {self.invalid} row(s) do not render with the new settings and are "
                "exported as invalid, not sent"
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
class _Tally:
    """Running totals for a plan (not lists: memory must not grow with the rows)."""

    sent_bytes: int = 0  # the changed rows' new requests' sizes (for the cost)
    were_invalid: int = 0  # changed rows that were invalid before


# What a re-run does with a row: (row_index, send it again?, why it is invalid now or None).
Change = tuple[int, bool, str | None]


def _changes(
    ctx: Context, job: JobRow, spec: JobSpec, *, skip_invalid: bool, tally: _Tally | None = None
) -> Iterator[Change]:
    """A :data:`Change` for every row, in row order. A row the new settings cannot render is
    invalid with their message when ``skip_invalid``, else refused (UsageError)."""
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
            was_invalid = item.status is ItemStatus.INVALID
            # An invalid row may be so for its id (null, blank …), which no setting changes:
            # checked as validation checks it, before the template.
            key = check_row_key(row, spec.id_column, item.row_index) if was_invalid else None
            params = key if isinstance(key, RowProblem) else renderer.render(row, item.row_index)
            if isinstance(params, RowProblem):
                if not skip_invalid:
                    raise UsageError(
                        f"job {job.id}: with the new settings row {item.row_index + 1} does "
                        f"not render ({params.message}); nothing was changed (with "
                        "--skip-invalid, such rows are exported as invalid, not sent)"
                    )
                yield item.row_index, False, params.message
                continue
            new = renderer.canonical_request(params)
            if was_invalid:
                differs = True  # never sent: its request is new
            else:
                before = sent_with.render(row, item.row_index)
                # Compared with keys sorted: the same request whatever order built it.
                differs = isinstance(before, RowProblem) or (
                    new != sent_with.canonical_request(before)
                )
            if differs and tally is not None:
                tally.sent_bytes += len(new)
                tally.were_invalid += was_invalid
            yield item.row_index, differs, None


def plan_rerun(ctx: Context, job: JobRow, spec: JobSpec, fields: list[str]) -> RerunPlan:
    """Count the rows whose request the new settings change (reads only)."""
    changed = unchanged = invalid = 0
    tally = _Tally()
    skip_invalid = carried_settings(job_spec(job), spec)["skip_invalid"]
    for _, differs, problem in _changes(ctx, job, spec, skip_invalid=skip_invalid, tally=tally):
        if problem is not None:
            invalid += 1
        elif differs:
            changed += 1
        else:
            unchanged += 1
    return RerunPlan(
        job.id,
        job.name,
        fields,
        changed,
        unchanged,
        max_cost_usd=_resend_cost(spec, changed, tally.sent_bytes),
        cost_unknown=pricing.unpriced(spec.model),
        were_invalid=tally.were_invalid,
        invalid=invalid,
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
    rows = _changes(ctx, job, spec, skip_invalid=new_spec.skip_invalid)
    changed, unchanged, invalid = ctx.store.rerun_items(
        job.id, _with_failpoint(rows), spec=new_spec.model_dump()
    )
    bind(job, log).info(
        "job.rerun", fields=fields, changed=changed, unchanged=unchanged, invalid=invalid
    )
    return RerunPlan(job.id, job.name, fields, changed, unchanged, invalid=invalid)


def _with_failpoint(rows: Iterator[Change]) -> Iterator[Change]:
    """``rows``, with the crash tests' ``mid_rerun`` failpoint after the first few thousand."""
    for n, row in enumerate(rows):
        if n == _FAILPOINT_AFTER:
            failpoint("mid_rerun")
        yield row
