"""jobs gain emulated

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Written by hand and frozen, like 0001 (so no import of batchpipe.db.schema). A job sent to
the built-in emulator (``--emulate``) holds stand-in answers; the same command without
``--emulate`` (a job file fixes the name) used to take it for the real job, send nothing
and export the stand-ins as answers. The flag keeps the two apart. Every job before this
revision counts as real (false): which of them were emulated is not recorded anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("emulated", sa.Boolean, nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table (older SQLite cannot drop a column in place).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("emulated")
