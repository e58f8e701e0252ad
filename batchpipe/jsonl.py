"""Streaming JSONL: bytes in, row dicts out, with errors that point at the line.

Part of the dataset side (only ``dataset`` imports it). Users hand us messy files, so
every error names the file, the 1-based line number and, where it applies, the column.
Blank lines are skipped but still counted, so line numbers match what an editor shows.

The reader works on raw byte blocks: it splits on ``\\n`` itself and hands each line to
orjson, which validates UTF-8 strictly as it parses. The slow diagnostics (where exactly
is the bad byte?) only run once a line has already failed, keeping the hot loop lean.

Integers keep every digit. orjson reads an integer beyond 64 bits (below -2**63 or above
2**64 - 1) as a float, so ``123456789012345678901234`` would become ``1.2345678901234569e+23``
and two such ids would look alike. A block that holds a run of 19 or more digits is parsed
line by line, and each line with such a run is read again with the standard library's
``json``, which keeps integers exact (the line is valid JSON: orjson said so first). Those
integers stay Python ints: the prompt prints their digits, the JSONL export writes them as
numbers (:mod:`batchpipe.jsontext`), and the Parquet export writes their column as text
(:class:`TypeInference`: Parquet has no wider integer). A decimal literal (``1.5e30``) is a
float, as it always was.

Column types for Parquet output are inferred here too (:class:`TypeInference`), because the
Parquet writer needs one schema up front and JSONL has none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson
import pyarrow as pa

from batchpipe.errors import InputError
from batchpipe.jsontext import dumps

# Big enough that per-block overhead vanishes, small enough to keep memory flat.
READ_BLOCK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_loads = orjson.loads
# Every byte to "0" if it is a digit, else "."; then 19 zeros in a row are 19 digits in a
# row, the shortest integer orjson may read inexactly (-9223372036854775809).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_LONG_RUN = b"0" * 19
# How orjson refuses an integer too big for a double (309 digits or more).
_TOO_BIG = "number is infinity"


class ByteStream(Protocol):
    """What the reader needs from a file: ``read(n)`` returning bytes (b"" at the end)."""

    def read(self, nbytes: int, /) -> bytes: ...


def iter_line_blocks(stream: ByteStream) -> Iterator[tuple[int, list[bytes], bool]]:
    """Yield ``(number of the first line, lines, long digit runs?)`` per block read; lines
    lack their ``\\n``. The flag is False only when no line has 19 digits in a row.

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
        data = pending + block if pending else block
        lines = data.split(b"\n")
        pending = lines.pop()  # the (possibly empty) start of the next block's first line
        if lines:
            yield lineno, lines, _has_long_digit_run(data)
            lineno += len(lines)
    if pending:
        yield lineno, [pending], _has_long_digit_run(pending)


def _has_long_digit_run(data: bytes) -> bool:
    """Whether ``data`` has 19 or more digits in a row (an integer orjson may round)."""
    # Every 9th byte first: 19 digits in a row cover two consecutive samples, and this costs
    # a ninth of the full pass below, which alone took as long as parsing the block.
    if b"00" not in data[::9].translate(_DIGITS):
        return False
    return _LONG_RUN in data.translate(_DIGITS)


def line_of_row(stream: ByteStream, row_index: int) -> int | None:
    """The 1-based line number of row ``row_index`` (counted from 0, blank lines skipped),
    or None past the end. For messages only: it reads the file again."""
    seen = -1
    for first_lineno, lines, _ in iter_line_blocks(stream):
        for offset, line in enumerate(lines):
            if line.strip():
                seen += 1
                if seen == row_index:
                    return first_lineno + offset
    return None


def lines_of_rows(stream: ByteStream, row_indexes: Iterable[int]) -> dict[int, int]:
    """The 1-based line numbers of several rows (counted from 0, blank lines skipped) in
    one pass, stopping after the last one wanted; rows past the end are left out."""
    wanted = set(row_indexes)
    found: dict[int, int] = {}
    if not wanted:
        return found
    last = max(wanted)
    seen = -1
    for first_lineno, lines, _ in iter_line_blocks(stream):
        for offset, line in enumerate(lines):
            if line.strip():
                seen += 1
                if seen in wanted:
                    found[seen] = first_lineno + offset
                if seen >= last:
                    return found
    return found


def iter_row_chunks(
    stream: ByteStream, name: str, batch_rows: int
) -> Iterator[list[dict[str, Any]]]:
    """Parse JSONL into lists of at most ``batch_rows`` row dicts, in file order.

    Raises :class:`InputError` naming ``name`` and the line for bad UTF-8, bad JSON or a
    line that is not an object. A file without rows (empty, or blank lines) yields nothing.
    """
    rows: list[dict[str, Any]] = []
    for first_lineno, lines, long_digits in iter_line_blocks(stream):
        if long_digits:
            # Maybe an integer orjson would round: every line checked, such lines reread.
            rows.extend(_parse_slowly(name, first_lineno, lines, exact=True))
            while len(rows) >= batch_rows:
                chunk, rows = rows[:batch_rows], rows[batch_rows:]
                yield chunk
            continue
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


def _parse_slowly(
    name: str, first_lineno: int, lines: list[bytes], *, exact: bool = False
) -> list[Any]:
    """Parse lines one at a time, skipping blank ones and naming the first bad one.

    ``exact``: read lines with 19 digits in a row again so that big integers stay exact.
    """
    parsed = []
    for offset, line in enumerate(lines):
        lineno = first_lineno + offset
        try:
            obj = _loads(line)
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                continue  # blank (or whitespace-only) line: skipped, still counted
            if not (exact and _TOO_BIG in exc.msg and _LONG_RUN in line.translate(_DIGITS)):
                raise line_error(name, lineno, line, exc) from None
            # An integer of 309 digits or more, too big for the double orjson reads it as,
            # is still JSON: read it exactly, as any line with a long integer is below.
            obj = _loads_huge(name, lineno, line, exc)
        else:
            if exact and _LONG_RUN in line.translate(_DIGITS):
                obj = _loads_exactly(name, lineno, line)
        if type(obj) is not dict:
            raise InputError(
                f"{name}, line {lineno}: expected a JSON object ({{...}}), "
                f"got {_json_kind(obj)}; every non-blank line must be one object"
            )
        parsed.append(obj)
    return parsed


def _loads_exactly(name: str, lineno: int, line: bytes) -> Any:
    """A line orjson parsed, parsed again keeping integers of any size exact."""
    try:
        return json.loads(line)
    except RecursionError:  # orjson reads 1,023 levels; the json module fewer
        raise _too_deep(name, lineno) from None
    except ValueError as exc:  # an integer past Python's digit limit (4,300 by default)
        raise _inexact(name, lineno, exc) from None


def _too_deep(name: str, lineno: int) -> InputError:
    return InputError(
        f"{name}, line {lineno}: nested too deeply to read with its long integers exact; "
        "nest it less, or write those numbers as strings"
    )


def _inexact(name: str, lineno: int, exc: Exception) -> InputError:
    return InputError(
        f"{name}, line {lineno}: cannot read a number exactly ({exc}); write such numbers as "
        "strings (in quotes)"
    )


class _NotJSON(Exception):
    """What the json module reads and orjson (and JSON) does not: NaN, Infinity, 1e400, a
    lone surrogate."""


def _no_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    """A float literal as the json module reads it, but refused where it overflows to
    infinity, as orjson refuses it."""
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"
        raise _NotJSON(f"{shown} is beyond the largest float")
    return value


def _loads_huge(name: str, lineno: int, line: bytes, failed: orjson.JSONDecodeError) -> Any:
    """A line orjson refused over an integer too big for a double, read by the json module,
    which must refuse what orjson would have refused for any other reason (orjson's error
    ``failed`` stands where the json module has none of its own)."""
    try:
        obj = json.loads(line, parse_constant=_no_constant, parse_float=_finite)
        _check_strings(obj)
    except _NotJSON as exc:
        raise InputError(
            f"{name}, line {lineno}: invalid JSON: {exc}; fix or remove that line"
        ) from None
    except json.JSONDecodeError as exc:
        raise line_error(name, lineno, line, exc) from None
    except UnicodeDecodeError:
        raise line_error(name, lineno, line, failed) from None
    except RecursionError:
        raise _too_deep(name, lineno) from None
    except ValueError as exc:  # an integer past Python's digit limit (4,300 by default)
        raise _inexact(name, lineno, exc) from None
    return obj


def _check_strings(value: Any) -> None:
    """_NotJSON for a string with a lone surrogate (``"\\ud800"``), which the json module
    reads and orjson does not (and nothing downstream could encode)."""
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _NotJSON("a lone surrogate (\\ud800-\\udfff) in a string") from None
    elif type(value) is dict:
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif type(value) is list:
        for item in value:
            _check_strings(item)


def line_error(name: str, lineno: int, line: bytes, exc: json.JSONDecodeError) -> InputError:
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
        # The json module's own messages may end in "at" ("Invalid control character at").
        f"{name}, line {lineno}: invalid JSON: {exc.msg.removesuffix(' at')} at column "
        f"{exc.colno}; fix or remove that line"
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
    same way). Users get their data out instead of a failure over one odd value. A column
    holding an integer beyond 64 bits is one of these too (Parquet has no wider integer):
    its integers are written as their digits, exactly.
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
    for row in rows:
        for column in json_columns:
            value = row.get(column)
            if value is not None:
                row[column] = dumps(value).decode()
