"""What `run` prints when a job ends: its rows by status, its cost, and what to do about
rows that failed."""

from __future__ import annotations

from collections.abc import Mapping

from batchpipe import pricing
from batchpipe.db import JobRow
from batchpipe.models import ItemStatus, is_transient_error

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


def failed_line(
    job: JobRow,
    counts: Mapping[ItemStatus, int],
    error_types: Mapping[str | None, int] | None = None,
) -> str | None:
    """How many rows ended without an answer and what to do about them; None when every
    row was answered (or canceled by the user).

    ``error_types`` counts the errored rows by error type. Those of a type sending again
    cannot fix (an invalid request, an unknown model) are not offered to `retry`, which
    would only fail them again after another wait: a setting must change first.
    """
    failed = {s: n for s, n in counts.items() if s.is_failure() and n}
    if not failed:
        return None
    total = sum(failed.values())
    which = ", ".join(f"{n:,} {s.value}" for s, n in failed.items())
    said = f"failed: {total:,} row(s) without an answer ({which})"
    final = {t: n for t, n in (error_types or {}).items() if n and not is_transient_error(t)}
    retryable = sum(failed.get(s, 0) for s in RETRYABLE) - sum(final.values())
    advice = []
    if retryable > 0:
        advice.append(
            f"to send the {retryable:,} errored/expired again: `batchpipe retry {job.name}`, "
            f"then `batchpipe run --job {job.name}`"
        )
    if final:
        kinds = ", ".join(f"{n:,} {t or 'without a type'}" for t, n in sorted(final.items()))
        advice.append(
            f"{sum(final.values()):,} errored for good ({kinds}): sending them again cannot "
            f"help; `batchpipe report {job.name}` shows why, then change what is wrong (the "
            f"model, a --param, the input) and re-run with `batchpipe run --job {job.name} "
            "... --yes`"
        )
    if not advice:
        advice.append(f"`batchpipe report {job.name}` groups the errors")
    return f"{said}; " + "; ".join(advice)
