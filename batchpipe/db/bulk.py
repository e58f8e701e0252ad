"""Bulk writes at driver speed: executemany with plain tuples, and COPY on PostgreSQL.

SQLAlchemy's executemany builds a parameter dict per row and runs every value through its
type's bind processor (``construct_params``), which measured more than half of the Store's
CPU time for 100,000 items. The hot statements of the pipeline (insert the items, claim them
for a batch, apply results) are written as Core statements as usual, compiled once per
dialect, and then executed through the driver with one tuple per row.

The rule that makes this safe: per-row values must be plain ``str``/``int``/``float``/``None``
(no type processing needed on any dialect). Anything that needs processing, such as a
timestamp, is passed once per call in ``shared`` and processed with its column type's own
bind processor, exactly as SQLAlchemy would have.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

# pyformat placeholders (psycopg) become positional ones, so every dialect takes tuples.
_PYFORMAT = re.compile(r"%\(([^)]+)\)s")


class BulkStatement:
    """A Core INSERT/UPDATE run as a driver-level executemany of tuples.

    ``row_names`` are the bound parameter names each row tuple supplies, in order; the
    statement's other parameters are its literal values (``status == 'pending'``) or come
    from ``shared``.
    """

    def __init__(self, stmt: sa.Insert | sa.Update, row_names: Sequence[str]) -> None:
        self._stmt = stmt
        self._row_names = tuple(row_names)
        self._compiled: dict[str, tuple[str, list[str], sa.sql.compiler.SQLCompiler]] = {}

    def _compile(self, dialect: sa.Dialect) -> tuple[str, list[str], sa.sql.compiler.SQLCompiler]:
        cached = self._compiled.get(dialect.name)
        if cached is None:
            compiled = self._stmt.compile(dialect=dialect)
            assert isinstance(compiled, sa.sql.compiler.SQLCompiler)
            sql = compiled.string
            if compiled.positional:
                order = list(compiled.positiontup or ())
            else:
                order = _PYFORMAT.findall(sql)
                sql = _PYFORMAT.sub("%s", sql)
            cached = self._compiled[dialect.name] = (sql, order, compiled)
        return cached

    def params(
        self, dialect: sa.Dialect, shared: Mapping[str, Any]
    ) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
        """The SQL, and a function turning a row tuple into the driver's parameter tuple."""
        sql, order, compiled = self._compile(dialect)
        constants: list[Any] = []
        index: list[int] = []
        width = len(self._row_names)
        for name in order:
            if name in self._row_names:
                index.append(self._row_names.index(name))
                continue
            bind = compiled.binds[name]
            if name in shared:
                value = driver_value(bind.type, dialect, shared[name])
            elif bind.required:
                raise ValueError(f"bulk statement: no value for parameter {name!r}")
            else:
                value = bind.effective_value
            index.append(width + len(constants))
            constants.append(value)
        tail = tuple(constants)
        if index == list(range(width)) and not tail:
            return sql, _identity
        getter = operator.itemgetter(*index)
        if len(index) == 1:
            return sql, lambda row: (getter(row + tail),)
        return sql, lambda row: getter(row + tail)

    def execute(
        self,
        conn: sa.Connection,
        rows: Iterable[tuple[Any, ...]],
        shared: Mapping[str, Any] | None = None,
    ) -> int:
        """executemany over ``rows``; the total rowcount (rows inserted or matched)."""
        sql, to_params = self.params(conn.dialect, shared or {})
        if to_params is _identity:
            params = rows if isinstance(rows, list) else list(rows)
        else:
            params = [to_params(row) for row in rows]
        if not params:
            return 0
        return int(conn.exec_driver_sql(sql, params).rowcount)


def driver_value(type_: sa.types.TypeEngine[Any], dialect: sa.Dialect, value: Any) -> Any:
    """``value`` as the driver takes it for a column of ``type_`` (its bind processor run),
    for a value that goes into per-row tuples or a statement's shared parameters."""
    processor = type_._cached_bind_processor(dialect)
    return processor(value) if processor is not None else value


def _identity(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row


# COPY's binary format per column type: psycopg's C dumpers write it at a sixth of the text
# format's CPU (1,000,000 items: 0.2 s against 1.3 s, mostly the timestamp's text). The
# wire format must match the column's type exactly, hence the explicit names.
def binary_type(column: sa.Column[Any]) -> str:
    """The PostgreSQL type name COPY ... (FORMAT BINARY) writes ``column``'s values as."""
    kind = column.type
    if isinstance(kind, sa.TypeDecorator):
        kind = kind.impl_instance
    if isinstance(kind, sa.BigInteger):
        return "int8"
    if isinstance(kind, sa.Integer):
        return "int4"
    if isinstance(kind, sa.Float):
        return "float8"
    if isinstance(kind, sa.Boolean):
        return "bool"
    if isinstance(kind, sa.DateTime) and kind.timezone:
        return "timestamptz"
    if isinstance(kind, sa.String):  # Text too; varchar reads text's binary form
        return "text"
    raise TypeError(f"no binary COPY type for column {column.name!r} ({column.type!r})")


def copy_rows(
    conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: Iterable[Any]
) -> int:
    """PostgreSQL only: ``COPY table (columns) FROM STDIN`` in the connection's transaction.

    Binary format (see :func:`binary_type`): values must be what the column's type takes,
    aware datetimes for timestamps, and int4 columns take ints below 2**31 (the binary
    format would wrap a larger one where the text format is refused; callers bound theirs).

    Then ``ANALYZE table``: the per-row UPDATEs that follow a load (claiming items for a
    batch, applying results) look each row up by its key, and without statistics the planner
    takes the table for a few pages and may serve them from any index on ``job_id``, so that
    every UPDATE walks all of the job's rows. Claiming 100,000 freshly loaded items took
    ten minutes of server CPU that way. ANALYZE inside the transaction counts the rows it
    has just written and its statistics commit with them; it reads a fixed-size sample
    (about 0.1-0.3 s for a million rows).
    """
    raw: Any = conn.connection.dbapi_connection  # a psycopg Connection
    cols = ", ".join(f'"{c}"' for c in columns)
    sql = f'COPY "{table.name}" ({cols}) FROM STDIN (FORMAT BINARY)'
    types = [binary_type(table.c[c]) for c in columns]
    dbapi = conn.dialect.loaded_dbapi
    count = 0
    try:
        with raw.cursor() as cur:
            with cur.copy(sql) as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
                    count += 1
            if count:
                cur.execute(f'ANALYZE "{table.name}"')
    except dbapi.Error as exc:
        # The same exception classes SQLAlchemy raises (IntegrityError for a duplicate key).
        raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi.Error) from exc
    return count
