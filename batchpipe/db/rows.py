"""Records the Store hands out (and takes in), decoupled from SQLAlchemy rows.

Callers never see a SQLAlchemy ``Row``: statuses come back as the enums from
:mod:`batchpipe.models`, timestamps as aware UTC datetimes. Job and batch records are
frozen; the per-item ones are slotted dataclasses that are not, because a run builds
millions of them; treat them as read-only all the same. Results come in as
``models.ResultRecord``, which collect fills in before the Store applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from batchpipe.models import BatchStatus, ItemStatus, JobStatus


@dataclass(frozen=True)
class JobRow:
    """One row of ``jobs``."""

    id: int
    name: str
    token: str
    status: JobStatus
    spec: dict[str, Any]
    input_fingerprint: str | None
    row_count: int
    invalid_count: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None
    lease_until: datetime | None
    exported_at: datetime | None
    request_spec: dict[str, Any] | None = None
    emulated: bool = False  # sent to the built-in emulator (--emulate), not the API

    @property
    def ingested(self) -> bool:
        """Whether its rows were validated and stored (the fingerprint is recorded with them,
        in the same update): a job of an empty input is ingested with no rows."""
        return self.input_fingerprint is not None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> JobRow:
        """Build from a ``SELECT * FROM jobs`` row."""
        m = row._mapping
        return cls(
            id=m["id"],
            name=m["name"],
            token=m["token"],
            status=JobStatus(m["status"]),
            spec=dict(m["spec"] or {}),
            input_fingerprint=m["input_fingerprint"],
            row_count=m["row_count"],
            invalid_count=m["invalid_count"],
            error=m["error"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            lease_owner=m["lease_owner"],
            lease_until=m["lease_until"],
            exported_at=m["exported_at"],
            request_spec=None if m["request_spec"] is None else dict(m["request_spec"]),
            emulated=bool(m["emulated"]),
        )


@dataclass(frozen=True)
class BatchRow:
    """One row of ``batches``."""

    id: int
    job_id: int
    api_batch_id: str | None
    status: BatchStatus
    round: int
    request_count: int
    request_bytes: int
    first_custom_id: str
    last_custom_id: str
    intent_at: datetime
    created_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    collected_at: datetime | None
    api_counts: dict[str, int] | None
    error: str | None
    results_missing_since: datetime | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> BatchRow:
        """Build from a ``SELECT * FROM batches`` row."""
        m = row._mapping
        counts = m["api_counts"]
        return cls(
            id=m["id"],
            job_id=m["job_id"],
            api_batch_id=m["api_batch_id"],
            status=BatchStatus(m["status"]),
            round=m["round"],
            request_count=m["request_count"],
            request_bytes=m["request_bytes"],
            first_custom_id=m["first_custom_id"],
            last_custom_id=m["last_custom_id"],
            intent_at=m["intent_at"],
            created_at=m["created_at"],
            expires_at=m["expires_at"],
            ended_at=m["ended_at"],
            collected_at=m["collected_at"],
            api_counts=None if counts is None else {str(k): int(v) for k, v in counts.items()},
            error=m["error"],
            results_missing_since=m["results_missing_since"],
        )


# Not frozen (see models.ResultRecord): the Store builds one per item read, a million to
# submit 1M rows.
@dataclass(slots=True)
class ItemRow:
    """One row of ``items`` (one input row's state and latest result)."""

    job_id: int
    row_index: int
    row_key: str
    custom_id: str | None
    status: ItemStatus
    attempts: int
    batch_id: int | None
    response_text: str | None
    stop_reason: str | None
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
    error_type: str | None
    error_message: str | None
    cost_usd: float | None = None

    @classmethod
    def from_tuple(cls, row: tuple[Any, ...]) -> ItemRow:
        """Build from a driver row selecting this class's fields in order (status as stored)."""
        job_id, row_index, row_key, custom_id, status, *rest = row
        return cls(job_id, row_index, row_key, custom_id, _ITEM_STATUSES[status], *rest)


class PendingItem(NamedTuple):
    """What submit needs of a pending item (``Store.iter_pending``), read without the rest.

    Reading whole ItemRows to submit a million rows cost 3.1 of submit's 12 CPU seconds;
    these three columns as the driver's tuples cost a fraction of that.
    """

    row_index: int
    attempts: int
    stop_reason: str | None


# Stored status string to enum: a dict lookup, cheaper than ItemStatus(...) per item.
_ITEM_STATUSES = {s.value: s for s in ItemStatus}


# The item columns a result writes (besides status), and the ones a requeue clears.
RESULT_FIELDS: tuple[str, ...] = (
    "response_text",
    "stop_reason",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "error_type",
    "error_message",
)


class JobTotals(NamedTuple):
    """Sums over a job's items, from one pass (``Store.job_totals``)."""

    usage: dict[str, int]  # tokens: input, output and both cache kinds
    cost_usd: float  # dollars paid so far, every attempt, at batch prices, of priced rows
    priced: int  # rows with a price
    truncated: int  # rows whose latest answer stopped at max_tokens
    # Rows sent whose cost is unknown (an attempt the price table could not price): while
    # there are any, cost_usd is only part of what was paid.
    unpriced: int = 0
