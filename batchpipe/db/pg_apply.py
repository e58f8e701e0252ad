"""Result lines applied on PostgreSQL: COPY into a temporary table, then two set statements.

psycopg's executemany runs the UPDATE once per row, and every run is a round trip to the
server: at 1,000,000 rows, collect took 60.7 s of batchpipe's CPU on PostgreSQL against 30.6
s on SQLite (bench/bench_pipeline.py). Here a chunk of lines is streamed with COPY into a
temporary table (dropped at commit) and joined against ``items`` by one UPDATE; the attempts
history is one INSERT … SELECT of the lines that did not succeed (``history.py``). The rules
are those of the executemany path on SQLite: an item changes only while it is submitted
under the line's custom_id, a transient failure leaves its batch, each attempt's cost adds
to the item's (an unpriced one makes it null: ``batches._added_cost``), and history rows
already recorded are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from batchpipe.db.rows import RESULT_FIELDS

# One tuple per line, in this order (apply_results builds them).
COLUMNS: tuple[str, ...] = (
    "row_index", "custom_id", "status", *RESULT_FIELDS, "cost_usd",
    "leaves_batch", "attempt", "result_type",
)  # fmt: skip
# Binary COPY (as in db/bulk.py: a sixth of the text format's CPU). Integers arrive as
# bigint, which the binary format cannot wrap; the UPDATE's assignment to the items' integer
# columns then refuses an out-of-range value as the text format did.
_TYPES = {
    "row_index": "int8",
    "input_tokens": "int8",
    "output_tokens": "int8",
    "cache_creation_input_tokens": "int8",
    "cache_read_input_tokens": "int8",
    "cost_usd": "float8",
    "leaves_batch": "bool",
    "attempt": "int8",
}
_BINARY_TYPES = [_TYPES.get(c, "text") for c in COLUMNS]
_TEMP = "batchpipe_apply"
# ``expected`` is the status an item must still have to take its line, filled in by the
# server. Comparing against it, rather than against the literal, keeps the planner off the
# items' statistics for status: taken when every item was pending, they say no item is
# submitted, and a 100,000-item job then got a nested loop that scanned every item once per
# result line (87 s to apply 100,000 lines; tests/test_store_plans.py).
_CREATE = (
    f"CREATE TEMPORARY TABLE {_TEMP} ("
    + ", ".join(f"{c} {t}" for c, t in zip(COLUMNS, _BINARY_TYPES, strict=True))
    + ", expected text NOT NULL DEFAULT 'submitted') ON COMMIT DROP"
)
_COPY_TEXT = f"COPY {_TEMP} ({', '.join(COLUMNS)}) FROM STDIN"
_COPY_BINARY = f"{_COPY_TEXT} (FORMAT BINARY)"
_SET_RESULTS = ", ".join(f"{f} = a.{f}" for f in RESULT_FIELDS)
# Both statements are built from this module's own names only; values are parameters.
_UPDATE = f"""
UPDATE items AS i SET
    status = a.status, {_SET_RESULTS},
    cost_usd = CASE WHEN i.attempts <= 1 THEN COALESCE(i.cost_usd, 0)
                    ELSE i.cost_usd END + a.cost_usd,
    batch_id = CASE WHEN a.leaves_batch THEN NULL ELSE i.batch_id END,
    updated_at = %(now)s
FROM {_TEMP} AS a
WHERE i.job_id = %(job_id)s AND i.row_index = a.row_index
  AND i.custom_id = a.custom_id AND i.status = a.expected
"""  # noqa: S608
_HISTORY = f"""
INSERT INTO attempts (job_id, row_index, attempt, custom_id, batch_id, result_type,
                      error_type, error_message, input_tokens, output_tokens, recorded_at)
SELECT %(job_id)s, row_index, attempt, custom_id, %(batch_id)s, result_type,
       error_type, error_message, input_tokens, output_tokens, %(now)s
FROM {_TEMP}
WHERE status <> 'succeeded'
ON CONFLICT (job_id, row_index, attempt) DO NOTHING
"""  # noqa: S608


def apply_by_copy(
    conn: sa.Connection,
    job_id: int,
    batch_id: int,
    rows: Sequence[tuple[Any, ...]],
    now: datetime,
    *,
    binary: bool = True,
) -> int:
    """Apply ``rows`` (tuples of :data:`COLUMNS`) in the connection's transaction.

    Returns how many items changed. ``rows`` holds each custom_id once (apply_results keeps
    the first of repeated lines): the UPDATE … FROM would apply any one of two copies.

    The binary COPY takes only values of their column's Python type, and raises TypeError
    for any other (a results line off the API's schema, say a number where a message
    belongs); ``binary=False`` writes the text format, which stores its string form.
    """
    raw: Any = conn.connection.dbapi_connection  # a psycopg Connection
    params = {"job_id": job_id, "batch_id": batch_id, "now": now}
    dbapi = conn.dialect.loaded_dbapi
    try:
        with raw.cursor() as cur:
            cur.execute(_CREATE)
            with cur.copy(_COPY_BINARY if binary else _COPY_TEXT) as copy:
                if binary:
                    copy.set_types(_BINARY_TYPES)
                for row in rows:
                    copy.write_row(row)
            cur.execute(_UPDATE, params)
            changed = int(cur.rowcount)
            cur.execute(_HISTORY, params)
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(_UPDATE, None, exc, dbapi.Error) from exc
    return changed
