"""jobs.exported_at: when the output was last written, cleared when rows are sent again

Revision ID: 0003
Revises: 0002
Create Date: 2025-12-01

Written by hand and frozen, like 0001 (so no import of batchpipe.db.schema). Existing jobs
get NULL: `tick` exports a finished job with an output once more, which is safe (the write is
atomic) and cannot be skipped, because nothing recorded whether the file on disk predates a
`retry`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("exported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table (older SQLite cannot drop a column in place).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("exported_at")
