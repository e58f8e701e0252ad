"""Streaming JSONL: bytes in, row dicts out, with errors that point at the line.

Part of the dataset side (only ``dataset`` imports it). Users hand us messy files, so
every error names the file, the 1-based line number and, where it applies, the column.
Blank lines are skipped but still counted, so line numbers match what an editor shows.

The reader works on raw byte blocks: it splits on ``\\n`` itself and hands each line to
orjson, which validates UTF-8 strictly as it parses. The slow diagnostics (where exactly
is the bad byte?) only run once a line has already failed, keeping the hot loop lean.

Column types for Parquet output are inferred here too (:class:`TypeInference`), because the
Parquet writer needs one schema up front and JSONL has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson
import pyarrow as pa

from batchpipe.errors import InputError

# Big enough that per-block overhead vanishes, small enough to keep memory flat.
READ_BLOCK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_loads = orjson.loads


class ByteStream(Protocol):
    """What the reader needs from a file: ``read(n)`` returning bytes (b"" at the end)."""

    def read(self, nbytes: int, /) -> bytes: ...


def iter_line_blocks(stream: ByteStream) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(number of the first line, lines)`` per block read; lines lack their ``\\n``.

    Lines come a block at a time because a generator step per line cost more than parsing.
    """
    lineno = 1
    pending = b""
    first = True
    while block := stream.read(READ_BLOCK_BYTES):
        if first:
            # A UTF-8 byte-order mark is legal at the very start of a file and nowhere else.
            block = block.removeprefix(_BOM)
            first = False
        lines = (pending + block).split(b"\n") if pending else block.split(b"\n")
        pending = lines.pop()  # the (possibly empty) start of the next block's first line
        if lines:
            yield lineno, lines
            lineno += len(lines)
    if pending:
        yield lineno, [pending]


def iter_row_chunks(
    stream: ByteStream, name: str, batch_rows: int
) -> Iterator[list[dict[str, Any]]]:
    """Parse JSONL into lists of at most ``batch_rows`` row dicts, in file order.

    Raises :class:`InputError` naming ``name`` and the line for bad UTF-8, bad JSON or a
    line that is not an object. A file without rows (empty, or blank lines) yields nothing.
    """
    rows: list[dict[str, Any]] = []
    for first_lineno, lines in iter_line_blocks(stream):
        try:
            # Fast path: a block of good lines parses in one comprehension, checked in C.
            parsed = [_loads(line) for line in lines]
            if set(map(type, parsed)) - {dict}:
                raise ValueError("not all objects")
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            # Blank lines, or a bad line to report: go line by line.
            parsed = _parse_slowly(name, first_lineno, lines)
        rows.extend(parsed)
        while len(rows) >= batch_rows:
            chunk, rows = rows[:batch_rows], rows[batch_rows:]
            yield chunk
    if rows:
        yield rows


def _parse_slowly(name: str, first_lineno: int, lines: list[bytes]) -> list[Any]:
    """Parse lines one at a time, skipping blank ones and naming the first bad one."""
    parsed = []
    for offset, line in enumerate(lines):
        try:
            obj = _loads(line)
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                continue  # blank (or whitespace-only) line: skipped, still counted
            raise line_error(name, first_lineno + offset, line, exc) from None
        if type(obj) is not dict:
            raise InputError(
                f"{name}, line {first_lineno + offset}: expected a JSON object ({{...}}), "
                f"got {_json_kind(obj)}; every non-blank line must be one object"
            )
        parsed.append(obj)
    return parsed


def line_error(name: str, lineno: int, line: bytes, exc: orjson.JSONDecodeError) -> InputError:
    """Why ``line`` failed: bad UTF-8 first (orjson's message for it is vague), else JSON."""
    if lineno == 1 and line.startswith(b"\x1f\x8b"):
        # gzip's magic number: compressed data under a name without .gz
        return InputError(
            f"{name}, line 1: this looks gzip-compressed; name the file *.jsonl.gz (or "
            "decompress it) so batchpipe reads it as such"
        )
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        # Columns count characters, as an editor does, not bytes.
        column = len(line[: bad.start].decode("utf-8", errors="replace")) + 1
        return InputError(
            f"{name}, line {lineno}: not valid UTF-8 (byte 0x{line[bad.start]:02x} at column "
            f"{column}); re-save the file as UTF-8"
        )
    return InputError(
        f"{name}, line {lineno}: invalid JSON: {exc.msg} at column {exc.colno}; "
        "fix or remove that line"
    )


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


# ---------------------------------------------------------------- type inference


class TypeInference:
    """Infer one Arrow type per column over a whole file, chunk by chunk.

    Each chunk's columns are inferred by pyarrow and merged with what earlier chunks said
    (``unify_schemas(promote_options="permissive")``: int64 + double → double, null + T → T,
    structs gain fields). A column that still has no single type, say a string on one line
    and an object on another, is not an error: it becomes a *JSON-string* column, where every
    non-null value is written as its JSON text (strings too, so every cell parses back the
    same way). Users get their data out instead of a failure over one odd value.
    """

    def __init__(self) -> None:
        self._types: dict[str, pa.DataType] = {}
        self._json: set[str] = set()

    def add_chunk(self, rows: list[dict[str, Any]], columns: Iterable[str]) -> None:
        """Fold one chunk of rows into the inferred types."""
        try:
            # Fast path: infer every column at once (a struct over the chunk's rows).
            struct = pa.array(rows).type
            inferred = {
                struct.field(i).name: struct.field(i).type for i in range(struct.num_fields)
            }
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            inferred = {}
            for column in columns:
                try:
                    inferred[column] = pa.array([row.get(column) for row in rows]).type
                except (pa.ArrowException, OverflowError, TypeError, ValueError):
                    self._json.add(column)
        for column, new in inferred.items():
            if column not in self._json:
                self._merge(column, new)

    def _merge(self, column: str, new: pa.DataType) -> None:
        old = self._types.get(column)
        if old is None or old == new:
            self._types[column] = new
            return
        try:
            merged = pa.unify_schemas(
                [pa.schema([pa.field(column, old)]), pa.schema([pa.field(column, new)])],
                promote_options="permissive",
            )
        except (pa.ArrowException, TypeError):
            self._json.add(column)
            del self._types[column]
            return
        self._types[column] = merged.field(column).type

    def schema(self, columns: Iterable[str]) -> tuple[pa.Schema, frozenset[str]]:
        """The schema (in ``columns`` order) and the names of the JSON-string columns."""
        fields = [
            pa.field(c, pa.string() if c in self._json else self._types.get(c, pa.null()))
            for c in columns
        ]
        return pa.schema(fields), frozenset(self._json)


def encode_json_columns(rows: list[dict[str, Any]], json_columns: frozenset[str]) -> None:
    """Replace the values of JSON-string columns, in place, by their JSON text."""
    dumps = orjson.dumps
    for row in rows:
        for column in json_columns:
            value = row.get(column)
            if value is not None:
                row[column] = dumps(value).decode()
