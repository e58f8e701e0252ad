"""items lose request_hash; jobs gain request_spec

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Written by hand and frozen, like 0001. A re-run used to compare each row's new request with
the hash stored at ingest. It now renders the row with the settings the rows were last
defined by as well, and compares the two, which needs nothing per item. Those settings are
the job's spec, or ``request_spec`` once ``retry --max-tokens`` has moved the spec on for
some rows only (the hashes were not updated by such a retry either, so a re-run judges the
same rows changed as before). Computing the hash cost ingest 1.5 s of CPU per 1,000,000
rows (bench/bench_pipeline.py). A downgrade brings the column back empty: the older code
then counts every row of a re-run as changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("request_hash")
    op.add_column("jobs", sa.Column("request_spec", sa.JSON, nullable=True))


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table (older SQLite cannot drop a column in place).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_spec")
    op.add_column("items", sa.Column("request_hash", sa.String(128), nullable=True))
