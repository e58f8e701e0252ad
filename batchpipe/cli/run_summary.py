"""What `run` prints when a job ends: its rows by status, its cost, and what to do about
rows that failed."""

from __future__ import annotations

from collections.abc import Mapping

from batchpipe import pricing
from batchpipe.db import JobRow
from batchpipe.models import ItemStatus

# What `batchpipe retry` sends again by default; invalid and invalid_output rows need a
# changed input or schema, not another try.
RETRYABLE = (ItemStatus.ERRORED, ItemStatus.EXPIRED)


def rows_by_status(counts: Mapping[ItemStatus, int]) -> str:
    """``28 succeeded, 2 errored``: the statuses that have rows, in the enum's order.

    For people; the ``job.finished`` log line carries the same counts as JSON fields.
    """
    parts = [f"{counts[s]:,} {s.value}" for s in ItemStatus if counts.get(s)]
    return ", ".join(parts) or "none"


def cost_line(job: JobRow, cost_usd: float | None) -> str:
    """``cost: $0.0123 (…)``, or why it is unknown (a model the price table lacks; None:
    some rows' cost is unknown)."""
    unknown = pricing.unknown_cost(job.spec.get("model"), cost_usd is None)
    if unknown is not None or cost_usd is None:
        return f"cost unknown: {unknown}"
    return (
        f"cost: ${cost_usd:,.4f} (every attempt, batch prices, table {pricing.PRICE_TABLE_VERSION})"
    )


def failed_line(job: JobRow, counts: Mapping[ItemStatus, int]) -> str | None:
    """How many rows ended without an answer and the command that sends them again; None
    when every row was answered (or canceled by the user)."""
    failed = {s: n for s, n in counts.items() if s.is_failure() and n}
    if not failed:
        return None
    total = sum(failed.values())
    which = ", ".join(f"{n:,} {s.value}" for s, n in failed.items())
    said = f"failed: {total:,} row(s) without an answer ({which})"
    retryable = sum(failed.get(s, 0) for s in RETRYABLE)
    if retryable:
        return (
            f"{said}; to send the {retryable:,} errored/expired again: `batchpipe retry "
            f"{job.name}`, then `batchpipe run --job {job.name}`"
        )
    return f"{said}; `batchpipe report {job.name}` groups the errors"
