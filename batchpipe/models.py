"""Value types shared by every layer: the job spec, statuses and result records.

Statuses are ``StrEnum`` so they read well in the database, logs and JSON, and each knows
whether it is terminal. Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The API's hard limits for one batch (reference §4.1).
API_MAX_BATCH_REQUESTS = 100_000
API_MAX_BATCH_BYTES = 256 * 1024 * 1024
# What we aim for by default: a little under the byte limit, so JSON framing and the SDK's
# own re-serialisation can never push a planned batch over it.
DEFAULT_MAX_BATCH_BYTES = 250 * 1000 * 1000
CUSTOM_ID_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# The stop_reason of an answer cut off at max_tokens (a truncated answer).
TRUNCATED_STOP_REASON = "max_tokens"
# What an error about an input column named like a result column suggests.
RESULT_PREFIX_HINT = (
    "rename them in the input, or give the job --result-prefix (e.g. bp_) on its command "
    "to name batchpipe's columns apart"
)
# JobSpec.max_failed: a count of rows, or a percentage of them.
_MAX_FAILED = re.compile(r"\d+|\d+(\.\d+)?%")
# What `--max-failed default` (max_failed = "default" in a job file) says: put the job's
# limit back to the default. Leaving the option out keeps the limit the job already has, so
# an unset value cannot say this; it is resolved before a spec is stored (max_failed_over).
MAX_FAILED_DEFAULT = "default"
_RESULT_PREFIX = re.compile(r"[A-Za-z0-9_]{0,32}")
# The keys POST /v1/messages/count_tokens takes; a rendered batch request also carries
# max_tokens, temperature, metadata ... which that endpoint would reject.
COUNT_TOKENS_KEYS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control",
    "output_config",
})  # fmt: skip

# The result columns added to every exported row, named exactly (and in this order).
RESULT_COLUMNS: tuple[str, ...] = (
    "custom_id",
    "result_status",
    "response_text",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "error_type",
    "error_message",
    "attempts",
    "batch_id",
    "model",
    "truncated",  # the answer stopped at max_tokens
    "cost_usd",  # what the row cost, every attempt included (batch prices)
)


class JobStatus(StrEnum):
    """Where a job is in its life."""

    RUNNING = "running"  # items still pending, in flight or uncollected
    DONE = "done"  # every item has a final status; export possible
    CANCELING = "canceling"  # the user canceled it; in-flight batches are being drained
    CANCELED = "canceled"  # canceled and drained: every item has a final status
    FAILED = "failed"  # stopped for good (e.g. pre-flight failure); see the job's error
    NEEDS_ATTENTION = "needs_attention"  # an ambiguous orphan batch; a human must look

    def is_terminal(self) -> bool:
        """True once nothing more will happen to the job without a human."""
        return self in {JobStatus.DONE, JobStatus.CANCELED, JobStatus.FAILED}

    def is_active(self) -> bool:
        """True while `tick` should keep advancing the job."""
        return self in {JobStatus.RUNNING, JobStatus.CANCELING}


class BatchStatus(StrEnum):
    """A batch as batchpipe tracks it (a superset of the API's processing_status)."""

    PLANNED = "planned"  # intent recorded; create not confirmed (maybe an orphan)
    IN_PROGRESS = "in_progress"
    CANCELING = "canceling"
    ENDED = "ended"  # the API says ended; results not yet collected
    COLLECTED = "collected"  # every result line is in the store
    REJECTED = "rejected"  # the API refused the create; its items went back to pending
    ARCHIVED = "archived"  # ended, but results were archived before we collected them

    def is_terminal(self) -> bool:
        """True when the batch needs no more calls to the API."""
        return self in {BatchStatus.COLLECTED, BatchStatus.REJECTED, BatchStatus.ARCHIVED}

    def is_in_flight(self) -> bool:
        """True while the API is (or may be) processing the batch."""
        return self in {BatchStatus.PLANNED, BatchStatus.IN_PROGRESS, BatchStatus.CANCELING}

    @classmethod
    def unsettled(cls) -> frozenset[BatchStatus]:
        """Sent (or maybe sent) and not yet collected: in flight, or ended with results due.

        While a job has such a batch it is not finished, and its rows must not be re-queued.
        """
        return frozenset({cls.PLANNED, cls.IN_PROGRESS, cls.CANCELING, cls.ENDED})


class ItemStatus(StrEnum):
    """One input row's state. The final ones map 1:1 onto the exported result_status."""

    PENDING = "pending"  # to be (re)submitted
    SUBMITTED = "submitted"  # in a batch the API has (or may have) accepted
    SUCCEEDED = "succeeded"
    ERRORED = "errored"  # fatal error, or transient errors until max attempts
    EXPIRED = "expired"  # expired until max attempts
    CANCELED = "canceled"
    INVALID = "invalid"  # failed pre-flight validation (with --skip-invalid); never sent
    INVALID_OUTPUT = "invalid_output"  # answered, but the answer does not fit the output schema

    def is_terminal(self) -> bool:
        """True when the row has its final answer (or final failure)."""
        return self not in {ItemStatus.PENDING, ItemStatus.SUBMITTED}

    def is_failure(self) -> bool:
        """True for a row that ended without a usable answer (what ``--max-failed`` counts).

        Canceled rows are not failures: the user stopped them.
        """
        return self in {
            ItemStatus.ERRORED,
            ItemStatus.EXPIRED,
            ItemStatus.INVALID,
            ItemStatus.INVALID_OUTPUT,
        }


class ResultType(StrEnum):
    """The API's per-request result types (``result.type`` in the results file)."""

    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"


# Error types inside errored results that are worth resubmitting. Everything else
# (invalid_request_error, authentication_error, permission_error, billing_error,
# not_found_error, request_too_large) is the request's own fault and final at once.
TRANSIENT_ERROR_TYPES = frozenset(
    {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}
)


def is_transient_error(error_type: str | None) -> bool:
    """Whether an errored result of this type may succeed if sent again."""
    return error_type in TRANSIENT_ERROR_TYPES


class JobSpec(BaseModel):
    """Everything that defines a job. Stored with the job (never holds secrets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Path or pyarrow filesystem URI of a JSONL or Parquet file")
    input_format: Literal["jsonl", "parquet"] | None = Field(
        default=None, description="Format of the input; guessed from the extension if unset"
    )
    prompt: str = Field(description="User message template with {{ column }} placeholders")
    system: str | None = Field(default=None, description="System prompt (also a template)")
    model: str
    max_tokens: int = Field(gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    params: dict[str, Any] = Field(
        default_factory=dict, description="Other Messages params passed through unchanged"
    )
    id_column: str | None = Field(
        default=None, description="Column holding a unique row key; default: the row number"
    )
    output: str | None = None
    max_attempts: int = Field(default=3, ge=1, le=1000)
    poll_interval: float | None = Field(
        default=None, gt=0, description="Seconds between polls; unset: back off 30 s to 5 min"
    )
    max_batch_requests: int = Field(default=API_MAX_BATCH_REQUESTS, ge=1, le=API_MAX_BATCH_REQUESTS)
    max_batch_bytes: int = Field(default=DEFAULT_MAX_BATCH_BYTES, ge=1024, le=API_MAX_BATCH_BYTES)
    skip_invalid: bool = False
    output_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the answer; each property becomes a column"
    )
    output_mode: Literal["tool", "json"] = Field(
        default="tool", description="Ask for the schema by a forced tool or JSON output"
    )
    cache_system: bool = Field(
        default=False, description="Send the system prompt as a cacheable (ephemeral) block"
    )
    retry_truncated_max_tokens: int | None = Field(
        default=None, gt=0, description="Retry answers cut at max_tokens once with this many"
    )
    max_cost: float | None = Field(
        default=None, gt=0, description="Budget in USD; submitting stops before passing it"
    )
    result_prefix: str | None = Field(
        default=None,
        description="Put before the name of every column batchpipe adds to the output "
        "(e.g. 'bp_'), for an input that has a column of the same name (model, attempts …)",
    )
    max_failed: str | None = Field(
        default=None,
        description="Rows that may end without an answer before the job counts as failed: "
        "a count ('0', '25') or a percentage of the rows ('5%'); unset: all but one. "
        "'default' puts a known job's limit back to unset",
    )

    @field_validator("result_prefix")
    @classmethod
    def _result_prefix_is_a_plain_name(cls, value: str | None) -> str | None:
        # Column names every reader (SQL engines, pandas attribute access) takes unquoted.
        if value is not None and not _RESULT_PREFIX.fullmatch(value):
            raise ValueError(
                f"result_prefix {value!r}: use letters, digits and _ only, at most 32 (e.g. bp_)"
            )
        return value

    @field_validator("max_failed", mode="before")
    @classmethod
    def _max_failed_is_count_or_share(cls, value: Any) -> Any:
        # A job file may well say `max_failed = 10`; the stored form is the text either way.
        if value is None:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        text = value.strip() if isinstance(value, str) else ""
        if text.lower() == MAX_FAILED_DEFAULT:
            return MAX_FAILED_DEFAULT
        if not _MAX_FAILED.fullmatch(text) or (text.endswith("%") and float(text[:-1]) > 100):
            raise ValueError(
                f"max_failed {value!r}: give a count of rows (e.g. 0 or 25) "
                f"or a percentage of them (e.g. 5% or 0.5%), or {MAX_FAILED_DEFAULT} "
                "for the default"
            )
        return text

    def max_failed_over(self, stored: str | None) -> str | None:
        """The limit a job keeps when run with this spec, given the one stored with it.

        Unset keeps ``stored`` (a later run need not repeat it); ``default`` clears it.
        """
        if self.max_failed is None:
            return stored
        return None if self.max_failed == MAX_FAILED_DEFAULT else self.max_failed

    def result_column(self, name: str) -> str:
        """The output name of a column batchpipe adds (``result_prefix`` + name)."""
        return (self.result_prefix or "") + name

    def failed_rows_allowed(self, row_count: int) -> int:
        """How many of ``row_count`` rows may fail (see ``max_failed``) with the job still a
        success. Unset, every row but one may: a job counts as failed only when no row got an
        answer."""
        if self.max_failed is None or self.max_failed == MAX_FAILED_DEFAULT:
            return max(row_count - 1, 0)
        if self.max_failed.endswith("%"):
            # Decimal, not float: 7% of 100 rows must allow 7, not 7.000000000000001 → 7 or 6.
            return int(Decimal(self.max_failed[:-1]) * row_count // 100)
        return int(self.max_failed)

    @field_validator("params")
    @classmethod
    def _params_do_not_shadow(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "max_tokens", "messages", "system", "temperature", "stream"}
        clash = sorted(reserved & value.keys())
        if clash:
            raise ValueError(f"params may not set {', '.join(clash)}; use the dedicated option")
        return value

    @field_validator("output_schema")
    @classmethod
    def _fields_do_not_shadow_result_columns(
        cls, value: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        # Each field becomes an output column beside RESULT_COLUMNS; a second column of the
        # same name makes the Parquet file unreadable by name (found only after paying).
        properties = (value or {}).get("properties")
        if isinstance(properties, dict):
            clash = [name for name in properties if name in RESULT_COLUMNS]
            if clash:
                raise ValueError(
                    f"field(s) {', '.join(map(repr, clash))} would repeat result column(s) "
                    f"batchpipe adds to every row ({', '.join(RESULT_COLUMNS)}); rename them"
                )
        return value

    def request_fields(self) -> dict[str, Any]:
        """The spec fields that shape every request (the rest only steer batchpipe)."""
        return self.model_dump(
            include={
                "prompt",
                "system",
                "model",
                "max_tokens",
                "temperature",
                "params",
                "output_schema",
                "output_mode",
                "cache_system",
            }
        )


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """The API's per-batch request counts."""

    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int

    @property
    def total(self) -> int:
        """All requests in the batch, whatever their state."""
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What the API says about one batch (decoupled from the SDK's classes)."""

    id: str
    processing_status: str  # in_progress | canceling | ended
    request_counts: RequestCounts
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: datetime | None
    results_url: str | None
    # The API's request id of the call that returned this, and how long that call took,
    # retries included (for log lines; None where there was no single call, e.g. a list).
    request_id: str | None = None
    latency_ms: int | None = None


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# three times the cost of a plain one, and one is built for every result line.
@dataclass(slots=True)
class ResultRecord:
    """One line of a results file, flattened to what batchpipe keeps.

    The client fills in what the line says. Collect then fills in the item it answers and
    what it decided (``row_index``, ``attempt``, ``status``, ``cost_usd``; see
    ``pipeline/outcome.py``), and the store applies the record as it is: one object per
    line, not a second one built from it (0.8 us less a line).
    """

    custom_id: str
    result_type: ResultType
    response_text: str | None = None
    stop_reason: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    # Raw content blocks, kept only when a caller asked for them (tool_use inputs for
    # structured output); None otherwise so memory stays flat.
    content: list[dict[str, Any]] | None = None
    # Set by collect. ``status`` is a final status, or ``pending`` for a failure that is
    # sent again; ``cost_usd`` is this attempt's price, added to the item's running total:
    # 0.0 for one the API does not bill, None for one billed at a price batchpipe lacks
    # (an unknown model), which makes the item's cost unknown (null) for good.
    row_index: int = -1
    attempt: int = 0
    status: ItemStatus | None = None
    cost_usd: float | None = None


# The commonest line, a success kept as it is, read without a ResultRecord (collect's
# ``outcome.plain_reader``; the store's ``apply_results``): row_index, custom_id, attempt,
# response_text, stop_reason, model, the four token counts, and the attempt's cost_usd.
PlainSuccess = tuple[int, str, int, str, Any, Any, Any, Any, Any, Any, float | None]
