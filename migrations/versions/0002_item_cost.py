"""items.cost_usd: what each row has cost so far, every attempt included

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-24

Written by hand and frozen, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("cost_usd", sa.Float, nullable=True))


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table (older SQLite cannot drop a column in place).
    with op.batch_alter_table("items") as batch:
        batch.drop_column("cost_usd")
