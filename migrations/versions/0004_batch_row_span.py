"""batches.first_row/last_row replace the index on items.batch_id

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Written by hand and frozen, like 0001. A batch's items are now found by the range of row
indexes they lie in (the items' primary key), so the index on ``items.batch_id``, which every
claim and every result had to update, goes. Existing batches get the span of the items still
in them; one with none left keeps NULL, which the Store reads as "scan the whole job".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("first_row", sa.Integer, nullable=True))
        batch.add_column(sa.Column("last_row", sa.Integer, nullable=True))
    # One pass over the batched items (UPDATE … FROM: SQLite 3.33+, PostgreSQL), rather
    # than two lookups per batch ever created.
    op.execute(
        "UPDATE batches SET first_row = span.lo, last_row = span.hi FROM ("
        "SELECT batch_id, min(row_index) AS lo, max(row_index) AS hi FROM items "
        "WHERE batch_id IS NOT NULL GROUP BY batch_id) AS span "
        "WHERE batches.id = span.batch_id"
    )
    op.drop_index("ix_items_batch_id", table_name="items")


def downgrade() -> None:
    op.create_index("ix_items_batch_id", "items", ["batch_id"])
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("last_row")
        batch.drop_column("first_row")
