"""batches gain results_missing_since

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Written by hand and frozen, like 0001 (so no import of batchpipe.db.schema). When the
results file of an ended batch answers 404, collect records when it first did; only a 404
that lasts an hour from then stops the job for a human (``pipeline.collect.RESULTS_PATIENCE``).
Measured from the batch's end instead, the first look of a nightly `tick` at a batch that
ended hours before would stop its job at once. NULL: no 404 seen (every batch before this
revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "batches", sa.Column("results_missing_since", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table (older SQLite cannot drop a column in place).
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("results_missing_since")
