"""The budget cap (``max_cost``): refuse a job whose estimate passes it; stop before spend would.

Two checks, both only when the job has a budget:

- **before the first batch**: the offline estimate of every row's *expected* cost must fit,
  else nothing is sent (the job fails, saying why).
- **before every batch**: what is already paid (the items' ``cost_usd``) plus the *worst case*
  of every batch sent but not yet collected plus the worst case of this batch must fit. The
  worst case prices each request byte as a token (four characters per token would be the
  usual rate: bytes overstate it) at the input or cache-write price, and every row at its
  whole ``max_tokens``. A batch that does not fit is not sent. While other batches are still
  out, the job waits for their real cost (usually far below the bound) and tries again; with
  nothing out, it fails with an error naming the spend, the budget and the rows left.
"""

from __future__ import annotations

from batchpipe import pricing
from batchpipe.db import JobRow
from batchpipe.errors import BudgetExceeded
from batchpipe.log import get_logger
from batchpipe.models import JobSpec, JobStatus
from batchpipe.pipeline.context import Context, bind

log = get_logger(__name__)


def worst_case(spec: JobSpec, requests: int, request_bytes: int) -> float:
    """The most ``requests`` totalling ``request_bytes`` can cost (0 for an unknown model)."""
    price = pricing.price_for(spec.model)
    if price is None:
        return 0.0
    input_rate = max(price.input, price.cache_write if spec.cache_system else 0.0)
    dollars = request_bytes * input_rate + requests * spec.max_tokens * price.output
    return pricing.BATCH_DISCOUNT * dollars / 1e6


def _fail(ctx: Context, job: JobRow, message: str) -> BudgetExceeded:
    ctx.store.update_job(job.id, status=JobStatus.FAILED, error=message)
    bind(job, log).error("job.budget_exceeded", error=message)
    return BudgetExceeded(message)


def check_estimate(ctx: Context, job: JobRow, spec: JobSpec) -> None:
    """Refuse (fail the job) when nothing is sent yet and the expected cost passes the budget."""
    if spec.max_cost is None or ctx.store.list_batches(job.id):
        return
    # Imported here: estimate pulls in the dataset reader, which this module needs only now.
    from batchpipe.pipeline.estimate import estimate  # noqa: PLC0415

    # The job is ingested: its ids were checked for duplicates then, so not again here.
    found = estimate(ctx, spec, offline=True, check_ids=False)
    if found.expected_cost_usd > spec.max_cost:
        raise _fail(
            ctx,
            job,
            f"job {job.id} ({job.name}): estimated cost ${found.expected_cost_usd:.4f} "
            f"(at most ${found.max_cost_usd:.4f}) is over the budget --max-cost "
            f"${spec.max_cost:.4f}; nothing was sent. Raise --max-cost, or check with "
            "`batchpipe estimate`",
        )


class BudgetGuard:
    """Decides, batch by batch, whether sending one more keeps the job within its budget."""

    def __init__(self, ctx: Context, job: JobRow, spec: JobSpec) -> None:
        self._ctx, self._job, self._spec = ctx, job, spec
        self.held_back = 0  # requests not sent because of the budget
        # The first batch held back: its requests, its worst case, and what it would have
        # taken the committed spend to: the failure shows the bound it was held to.
        self._refused: tuple[int, float, float] | None = None

    def admit(self, requests: int, request_bytes: int) -> bool:
        """True if a batch of this size fits the budget given what is paid and out already."""
        cap = self._spec.max_cost
        if cap is None:
            return True
        paid, _ = self._ctx.store.cost_total(self._job.id)
        out_requests, out_bytes = self._ctx.store.unsettled_batches(self._job.id)
        committed = paid + worst_case(self._spec, out_requests, out_bytes)
        bound = worst_case(self._spec, requests, request_bytes)
        if committed + bound <= cap:
            return True
        if self._refused is None:
            self._refused = (requests, bound, committed + bound)
        self.held_back += requests
        return False

    def finish(self) -> None:
        """After a submit pass that held rows back: fail the job unless batches are still out."""
        if not self.held_back:
            return
        # Counted only here: without a status index, a count walks the job's rows.
        pending = self._ctx.store.count_pending(self._job.id)
        paid, _ = self._ctx.store.cost_total(self._job.id)
        out_requests, _ = self._ctx.store.unsettled_batches(self._job.id)
        logger = bind(self._job, log)
        if out_requests:
            logger.warning("budget.waiting", paid_usd=round(paid, 6), held_back=self.held_back)
            return
        assert self._spec.max_cost is not None
        assert self._refused is not None  # held_back counts what admit refused
        requests, bound, needed = self._refused
        raise _fail(
            self._ctx,
            self._job,
            f"job {self._job.id} ({self._job.name}): the budget --max-cost "
            f"${self._spec.max_cost:.4f} would be passed: ${paid:.4f} spent so far, and the "
            f"next batch ({requests} rows) could cost up to ${bound:.4f} (its worst case: "
            "each request byte priced as an input token, each answer --max-tokens long; "
            f"real costs are usually far lower); {pending} row(s) were not sent. A --max-cost "
            f"of ${needed:.4f} lets that batch go (each later batch needs room of its own; "
            "smaller batches, --max-batch-requests, need less at a time); raise it and run "
            "the same command again to send them",
        )
