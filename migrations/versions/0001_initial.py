"""initial schema: jobs, batches, items, attempts

Revision ID: 0001
Revises:
Create Date: 2024-11-22

Written by hand and frozen: it must not import batchpipe.db.schema, whose tables will move on.
tests/test_migrations.py checks that head matches that module exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = sa.String(32)


def _ts(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("input_fingerprint", sa.String(128), nullable=True),
        sa.Column("row_count", sa.Integer, server_default="0", nullable=False),
        sa.Column("invalid_count", sa.Integer, server_default="0", nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        _ts("lease_until", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("name", name="uq_jobs_name"),
        sa.UniqueConstraint("token", name="uq_jobs_token"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])

    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("api_batch_id", sa.String(128), nullable=True),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("request_count", sa.Integer, nullable=False),
        sa.Column("request_bytes", sa.BigInteger, nullable=False),
        sa.Column("first_custom_id", sa.String(64), nullable=False),
        sa.Column("last_custom_id", sa.String(64), nullable=False),
        _ts("intent_at", nullable=False),
        _ts("created_at", nullable=True),
        _ts("expires_at", nullable=True),
        _ts("ended_at", nullable=True),
        _ts("collected_at", nullable=True),
        sa.Column("api_counts", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_batches_job_id_jobs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("api_batch_id", name="uq_batches_api_batch_id"),
    )
    op.create_index("ix_batches_job_id_status", "batches", ["job_id", "status"])

    op.create_table(
        "items",
        sa.Column("job_id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("row_index", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("row_key", sa.Text, nullable=False),
        sa.Column("custom_id", sa.String(64), nullable=True),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("attempts", sa.Integer, server_default="0", nullable=False),
        sa.Column("batch_id", sa.Integer, nullable=True),
        sa.Column("response_text", sa.Text, nullable=True),
        sa.Column("stop_reason", sa.String(64), nullable=True),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("input_tokens", sa.Integer, nullable=True),
        sa.Column("output_tokens", sa.Integer, nullable=True),
        sa.Column("cache_creation_input_tokens", sa.Integer, nullable=True),
        sa.Column("cache_read_input_tokens", sa.Integer, nullable=True),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("request_hash", sa.String(128), nullable=True),
        _ts("updated_at", nullable=True),
        sa.PrimaryKeyConstraint("job_id", "row_index", name="pk_items"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_items_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name="fk_items_batch_id_batches", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_items_job_id_status", "items", ["job_id", "status"])
    op.create_index("ix_items_job_id_row_key", "items", ["job_id", "row_key"])
    op.create_index("ix_items_batch_id", "items", ["batch_id"])

    op.create_table(
        "attempts",
        sa.Column("job_id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("row_index", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("attempt", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.String(64), nullable=False),
        sa.Column("batch_id", sa.Integer, nullable=True),
        sa.Column("result_type", STATUS, nullable=False),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("input_tokens", sa.Integer, nullable=True),
        sa.Column("output_tokens", sa.Integer, nullable=True),
        _ts("recorded_at", nullable=False),
        sa.PrimaryKeyConstraint("job_id", "row_index", "attempt", name="pk_attempts"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_attempts_job_id_jobs", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_index("ix_items_batch_id", table_name="items")
    op.drop_index("ix_items_job_id_row_key", table_name="items")
    op.drop_index("ix_items_job_id_status", table_name="items")
    op.drop_table("items")
    op.drop_index("ix_batches_job_id_status", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
