"""Row keys used by more than one row: the query, and a scratch table for rows not stored.

Ingest finds duplicates among a job's stored items (``Store.find_duplicate_keys``).
``batchpipe estimate`` stores nothing, but must report the same duplicates: a set of a
million keys in memory would grow with the dataset, so :class:`ScratchKeys` puts them in
a temporary SQLite file instead (removed on close) and asks it the same query.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa

# How many row indexes are reported per duplicated key.
DUPLICATE_EXAMPLES = 5
# Keys sent to the scratch file per executemany.
_CHUNK = 10_000

_scratch = sa.MetaData()  # not the state database's metadata: never migrated or compared
_keys = sa.Table(
    "keys",
    _scratch,
    sa.Column("row_index", sa.Integer, nullable=False),
    sa.Column("row_key", sa.Text, nullable=False),
)


def select_duplicate_keys(
    conn: sa.Connection,
    table: sa.Table,
    *where: sa.ColumnElement[bool],
    limit: int,
) -> list[tuple[str, list[int]]]:
    """Keys of ``table`` (``row_key``, ``row_index`` columns) held by several rows.

    In order of each key's first row, at most ``limit`` keys, each with its first
    DUPLICATE_EXAMPLES row indexes (counted from 0).
    """
    dupes = (
        sa.select(table.c.row_key)
        .where(*where)
        .group_by(table.c.row_key)
        .having(sa.func.count() > 1)
        .order_by(sa.func.min(table.c.row_index))
        .limit(limit)
    )
    keys = list(conn.execute(dupes).scalars())
    if not keys:
        return []
    # Rank within each key so only the first few indexes of each come back.
    rank = (
        sa.func.row_number()
        .over(partition_by=table.c.row_key, order_by=table.c.row_index)
        .label("rank")
    )
    ranked = (
        sa.select(table.c.row_key, table.c.row_index, rank)
        .where(*where, table.c.row_key.in_(keys))
        .subquery()
    )
    rows = conn.execute(
        sa.select(ranked.c.row_key, ranked.c.row_index)
        .where(ranked.c.rank <= DUPLICATE_EXAMPLES)
        .order_by(ranked.c.row_index)
    ).all()
    found: dict[str, list[int]] = {key: [] for key in keys}
    for key, row_index in rows:
        found[key].append(row_index)
    return list(found.items())


class AscendingKeys:
    """Whether the keys seen so far, in row order, only ever increased: then none repeats,
    and the duplicate query (a sort of every key, 0.7-0.8 s of SQLite CPU per million) is
    not needed. Inputs in id order are common (exports ordered by a primary key)."""

    __slots__ = ("_last", "holds")

    def __init__(self) -> None:
        self.holds = True
        self._last = ""  # below every key: none is empty (blank ids are refused)

    def see(self, key: str) -> None:
        """Take the next key in row order."""
        if self.holds:
            self.holds = key > self._last
            self._last = key


class ScratchKeys:
    """Row keys in a temporary SQLite file, to find duplicates in flat memory.

    Use as a context manager: the file (in the system's temporary folder) is removed on exit.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="batchpipe-keys-")
        path = Path(self._folder.name) / "keys.db"
        # A scratch file nobody else opens: no journal, no fsync, one connection.
        self._engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.StaticPool)
        self._conn = self._engine.connect()
        self._conn.exec_driver_sql("PRAGMA journal_mode = OFF")
        self._conn.exec_driver_sql("PRAGMA synchronous = OFF")
        _scratch.create_all(self._conn)
        self._conn.commit()
        self._insert = "INSERT INTO keys (row_index, row_key) VALUES (?, ?)"
        self._indexed = False
        self._order = AscendingKeys()

    def add(self, keys: Iterable[tuple[int, str]]) -> None:
        """Record ``(row_index, row_key)`` pairs."""
        source = iter(keys)
        while chunk := list(itertools.islice(source, _CHUNK)):
            see = self._order.see
            for _, key in chunk:
                see(key)
            # The tuples straight to the driver: through SQLAlchemy's insert, a dict per key
            # and its bind processing took about 4 s of CPU per million keys, this 1 s.
            self._conn.exec_driver_sql(self._insert, chunk)
        self._conn.commit()

    def duplicates(self, limit: int = 20) -> list[tuple[str, list[int]]]:
        """What ``Store.find_duplicate_keys`` would say of the keys added so far."""
        if self._order.holds:  # no key can repeat
            return []
        if not self._indexed:
            # Built once, after the inserts (cheaper than keeping it up to date): the GROUP BY
            # then walks the index instead of sorting every key in memory.
            # Plain SQL: an sa.Index would join the shared table's metadata, and the next
            # ScratchKeys' create_all would make it before the inserts.
            self._conn.exec_driver_sql("CREATE INDEX keys_by_key ON keys (row_key, row_index)")
            self._indexed = True
        found = select_duplicate_keys(self._conn, _keys, limit=limit)
        self._conn.commit()
        return found

    def close(self) -> None:
        """Drop the connection and remove the file."""
        self._conn.close()
        self._engine.dispose()
        self._folder.cleanup()

    def __enter__(self) -> ScratchKeys:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
