"""The tables, as SQLAlchemy Core objects (no ORM: bulk executemany is the hot path).

This is the model the migrations must reproduce: ``tests/test_migrations.py`` compares a
migrated database against :data:`metadata` with alembic's ``compare_metadata``. A change here
therefore always comes with a new revision in ``migrations/versions/``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Deterministic constraint names, so migrations can refer to them on every dialect.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect.

    PostgreSQL keeps ``timestamptz`` and hands back aware values (in the session's zone, so
    they are normalised to UTC). SQLite has no time zones: values are stored as naive UTC
    text and come back with ``tzinfo=UTC`` attached. Naive input is refused, because guessing
    its zone is how timestamps silently drift.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: batchpipe stores only aware UTC times")
        value = value.astimezone(UTC)
        # SQLite would store the offset text verbatim and compare strings; keep one format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Status columns hold the values of models.JobStatus / BatchStatus / ItemStatus.
STATUS_LENGTH = 32

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("token", sa.String(32), nullable=False, unique=True),
    sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("input_fingerprint", sa.String(128), nullable=True),
    sa.Column("row_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("invalid_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    # When the output file was last written; cleared when rows are sent again (retry,
    # re-run), so NULL on a done job with an output means its export is due (or stale).
    sa.Column("exported_at", UTCDateTime, nullable=True),
    # The settings the rows' requests were last defined by (at ingest or a re-run), kept
    # when the spec moves on without sending every row again (`retry --max-tokens`); NULL
    # when that is the spec itself. A re-run compares each row's request under these with
    # its request under the new settings.
    sa.Column("request_spec", sa.JSON, nullable=True),
    # Sent to the built-in emulator (--emulate), whose answers are stand-ins: a command
    # against the real API never steps such a job, nor an --emulate one a real job.
    sa.Column("emulated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "status"),
)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("api_batch_id", sa.String(128), nullable=True, unique=True),
    sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("request_count", sa.Integer, nullable=False),
    sa.Column("request_bytes", sa.BigInteger, nullable=False),
    sa.Column("first_custom_id", sa.String(64), nullable=False),
    sa.Column("last_custom_id", sa.String(64), nullable=False),
    # The span of row indexes the batch's items lie in: its items are found by a range of
    # the items' primary key (an index on items.batch_id cost 1.1 s of CPU per million rows
    # written). NULL for batches from before revision 0004 with no items left: scan the job.
    sa.Column("first_row", sa.Integer, nullable=True),
    sa.Column("last_row", sa.Integer, nullable=True),
    sa.Column("intent_at", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    sa.Column("collected_at", UTCDateTime, nullable=True),
    sa.Column("api_counts", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # When the results file of this ended batch first answered 404 (API clock); NULL: never.
    # A 404 that lasts pipeline.collect.RESULTS_PATIENCE from then stops the job.
    sa.Column("results_missing_since", UTCDateTime, nullable=True),
    sa.Index(None, "job_id", "status"),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column(
        "job_id",
        sa.Integer,
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("row_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("row_key", sa.Text, nullable=False),
    sa.Column("custom_id", sa.String(64), nullable=True),
    sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column(
        "batch_id", sa.Integer, sa.ForeignKey("batches.id", ondelete="SET NULL"), nullable=True
    ),
    sa.Column("response_text", sa.Text, nullable=True),
    sa.Column("stop_reason", sa.String(64), nullable=True),
    sa.Column("model", sa.String(128), nullable=True),
    sa.Column("input_tokens", sa.Integer, nullable=True),
    sa.Column("output_tokens", sa.Integer, nullable=True),
    sa.Column("cache_creation_input_tokens", sa.Integer, nullable=True),
    sa.Column("cache_read_input_tokens", sa.Integer, nullable=True),
    sa.Column("error_type", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    # Dollars paid for the row so far (every attempt, batch prices); NULL: nothing priced yet.
    sa.Column("cost_usd", sa.Float, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=True),
    # No index but the primary key. Not on row_key: only ingest's duplicate check reads by
    # it, once. Not on status: every item changes status three times (pending, submitted,
    # final), and keeping an index entry in step cost SQLite 2.2 s of CPU per million rows,
    # where counting by status walks the job's rows in 0.15 s, a few times per run.
)

# One row per (job, row, attempt) that is not the item's final success (that one is the
# item row itself; see db/history.py): the primary key is what makes re-applying a results
# file a no-op (INSERT … ON CONFLICT DO NOTHING).
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column(
        "job_id",
        sa.Integer,
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("row_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("custom_id", sa.String(64), nullable=False),
    sa.Column("batch_id", sa.Integer, nullable=True),
    sa.Column("result_type", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("error_type", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("input_tokens", sa.Integer, nullable=True),
    sa.Column("output_tokens", sa.Integer, nullable=True),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
)
