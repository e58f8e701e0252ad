"""The attempts history: every attempt that is not its item's final answer.

An item row holds its latest attempt. A succeeded answer is final and stays on the item, so
``apply_results`` records in ``attempts`` only the attempts that did not succeed, or whose
answer was not kept (output that failed the schema, a truncated answer sent again).
Recording every success as well cost 1.8 s of SQLite CPU at 1,000,000 rows
(``bench/store_floor.py``) for a row per item that repeated what the item row says.

When a succeeded item is sent again (``retry`` of succeeded rows, a re-run whose request
changed), :func:`archive_succeeded` first copies its answer's attempt into the history, so
every answer a row ever kept is recorded: a row's attempts are its ``attempts`` rows plus
the item itself. An archived success's ``recorded_at`` is when it arrived: the item's
``updated_at``, which applying it set and nothing changes while it stays succeeded. Not
recorded: a success whose line changed nothing (its custom_id was no longer the item's,
e.g. a results file read again).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from batchpipe.db.bulk import BulkStatement
from batchpipe.db.schema import attempts, items
from batchpipe.errors import StoreError
from batchpipe.models import ItemStatus

SUCCEEDED = ItemStatus.SUCCEEDED.value
KEYS = [attempts.c.job_id, attempts.c.row_index, attempts.c.attempt]
_COPIED = (
    "job_id", "row_index", "attempt", "custom_id", "batch_id", "result_type", "error_type",
    "error_message", "input_tokens", "output_tokens", "recorded_at",
)  # fmt: skip
_DIALECTS = ("sqlite", "postgresql")


def archive_succeeded(dialect: str, where: sa.ColumnElement[bool]) -> sa.Insert:
    """INSERT … SELECT copying the succeeded items matching ``where`` into the history.

    The recorded_at is the item's ``updated_at`` (when its answer was applied), or the
    ``p_now`` parameter for an item without one. Attempts already recorded are left alone.
    """
    if dialect not in _DIALECTS:
        raise StoreError(f"unsupported database dialect {dialect!r}")
    source = sa.select(
        items.c.job_id,
        items.c.row_index,
        items.c.attempts,
        items.c.custom_id,
        items.c.batch_id,
        sa.literal(SUCCEEDED),
        items.c.error_type,
        items.c.error_message,
        items.c.input_tokens,
        items.c.output_tokens,
        sa.func.coalesce(
            items.c.updated_at, sa.bindparam("p_now", type_=attempts.c.recorded_at.type)
        ),
    ).where(where, items.c.status == SUCCEEDED, items.c.custom_id.is_not(None))
    if dialect == "sqlite":
        lite = sqlite.insert(attempts).from_select(_COPIED, source)
        return lite.on_conflict_do_nothing(index_elements=KEYS)
    pg = postgresql.insert(attempts).from_select(_COPIED, source)
    return pg.on_conflict_do_nothing(index_elements=KEYS)


# One row of a re-run at a time: (row_index,) tuples, p_job and p_now shared.
_ONE_ROW = sa.and_(
    items.c.job_id == sa.bindparam("p_job"), items.c.row_index == sa.bindparam("p_row")
)
ARCHIVE_ROWS = {d: BulkStatement(archive_succeeded(d, _ONE_ROW), ("p_row",)) for d in _DIALECTS}
