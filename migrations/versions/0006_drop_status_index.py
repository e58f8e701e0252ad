"""items lose the index on (job_id, status)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Written by hand and frozen, like 0001. Every item changes status three times in a job's
life (pending, submitted, then its result), and each change rewrote its entry in this index:
2.2 s of SQLite's CPU per 1,000,000 items (bench/store_floor.py, 7.6 s with it, 5.4 s
without). What read by status (counts, the pending items, a batch's members) walks the
job's rows by primary key instead: 0.15 s per count at a million items, a few times per run.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_items_job_id_status", table_name="items")


def downgrade() -> None:
    op.create_index("ix_items_job_id_status", "items", ["job_id", "status"])
