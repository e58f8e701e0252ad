"""The writing half of the joined export (used by :func:`batchpipe.dataset.write_joined`).

Part of the dataset side: pyarrow lives here too. Two small pieces:

- :class:`ResultCursor` lines up the caller's result chunks (any size) with the input's
  chunks, and notices when there are too few or too many results.
- :class:`JoinedWriter` appends result columns to each input chunk and streams it to a
  temporary file as Parquet or JSONL; ``abort`` removes the file.
"""

from __future__ import annotations

import base64
import contextlib
import decimal
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchpipe.errors import InputChangedError, OutputNotWritable
from batchpipe.jsonl import encode_json_columns
from batchpipe.jsontext import dumps

# zstd: answers are text, which it packs much tighter than the default snappy, about as fast.
_PARQUET_COMPRESSION = "zstd"


@contextlib.contextmanager
def writing_to(dest: str) -> Iterator[None]:
    """An OSError while writing ``dest`` (a full disk, a lost mount) as OutputNotWritable."""
    try:
        yield
    except OSError as exc:  # pyarrow's IO errors are OSErrors too
        raise OutputNotWritable(f"cannot write {dest}: {exc}") from None


# One chunk of results: ``width`` columns, each a sequence of one value per row, all of one
# length (see :func:`batchpipe.dataset.write_joined`).
ResultChunk = Sequence[Sequence[Any]]


class ResultCursor:
    """Hands out the result columns of exactly ``n`` rows at a time from chunks of any size.

    Columns rather than a tuple per row: the writer builds one Arrow array per column, and
    building a tuple per row to turn back into columns cost the export of a million rows
    about 0.6 s more CPU (measured on a busy machine; see pipeline.export).
    """

    def __init__(self, results: Iterable[ResultChunk], uri: str, width: int) -> None:
        self._chunks = iter(results)
        self._width = width
        self._current: ResultChunk = ()
        self._rows = 0  # in the current chunk
        self._offset = 0
        self._taken = 0
        self._uri = uri

    def _next_chunk(self) -> bool:
        """Move on to the caller's next chunk, checking its shape; False once they ended."""
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if len(chunk) != self._width:
            raise ValueError(f"result chunks have {len(chunk)} columns, expected {self._width}")
        rows = len(chunk[0]) if chunk else 0
        if any(len(column) != rows for column in chunk):
            raise ValueError("the columns of a result chunk differ in length")
        self._current, self._rows, self._offset = chunk, rows, 0
        return True

    def take(self, n: int) -> ResultChunk:
        """The next ``n`` rows' results; :class:`InputChangedError` if they run out first."""
        if n == 0:
            return [() for _ in range(self._width)]
        while self._offset >= self._rows:
            if not self._next_chunk():
                raise self._ran_out(0)
        # Common case: the caller's chunk lines up with ours; hand it over without copying.
        if self._offset == 0 and self._rows == n:
            self._offset = n
            self._taken += n
            return self._current
        collected: list[list[Any]] = [[] for _ in range(self._width)]
        got = 0
        while got < n:
            if self._offset >= self._rows:
                if not self._next_chunk():
                    raise self._ran_out(got)
                continue
            start = self._offset
            end = min(self._rows, start + n - got)
            for out, column in zip(collected, self._current, strict=True):
                out.extend(column[start:end])
            got += end - start
            self._offset = end
        self._taken += n
        return collected

    def _ran_out(self, got: int) -> InputChangedError:
        return InputChangedError(
            f"{self._uri} has more rows than there are results (they ended after "
            f"{self._taken + got} rows): the input changed since the job was submitted; "
            "export from the original file"
        )

    def finish(self) -> None:
        """:class:`InputChangedError` if results are left once the input has ended."""
        while self._offset >= self._rows:
            if not self._next_chunk():
                return
        raise InputChangedError(
            f"{self._uri} has {self._taken} rows but there are more results than that: the "
            "input changed since the job was submitted; export from the original file"
        )


# Each line carries its own newline: one write per row into a buffered stream measured
# about 5x faster than joining a chunk's lines, which allocates a large bytes object.
_LINE_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
_WRITE_BUFFER_BYTES = 1 << 20


def dumps_row(row: dict[str, Any]) -> bytes:
    """One compact JSON line (with its newline) for a row that may hold Parquet-only types."""
    return dumps(row, default=_json_default, option=_LINE_OPTIONS)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact; a float would silently round
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


class JoinedWriter:
    """Streams input chunks plus result columns into ``tmp`` (Parquet, or JSONL if no schema).

    ``schema`` is the input's Arrow schema and its JSON-string columns (see
    :class:`batchpipe.jsonl.TypeInference`); ``None`` means write JSONL.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        *,
        tmp: str,
        dest: str,
        names: list[str],
        types: list[pa.DataType],
        schema: tuple[pa.Schema, frozenset[str]] | None,
    ) -> None:
        self._fs, self._tmp, self._dest = fs, tmp, dest
        self._names, self._types = names, types
        self._parquet: pq.ParquetWriter | None = None
        self._stream: Any = None
        self._json_columns: frozenset[str] = frozenset()
        try:
            if schema is None:
                self._stream = fs.open_output_stream(
                    tmp, compression=None, buffer_size=_WRITE_BUFFER_BYTES
                )
            else:
                self._in_schema, self._json_columns = schema
                out = self._in_schema
                for name, typ in zip(names, types, strict=True):
                    out = out.append(pa.field(name, typ))
                self._out_schema = out
                self._parquet = pq.ParquetWriter(
                    tmp, out, filesystem=fs, compression=_PARQUET_COMPRESSION
                )
        except (pa.ArrowException, OSError) as exc:
            self.abort()
            raise OutputNotWritable(f"cannot write {dest}: {exc}") from None

    def _result_arrays(self, results: ResultChunk) -> list[pa.Array]:
        width = len(self._names)
        if len(results) != width:
            raise ValueError(f"result chunks have {len(results)} columns, expected {width}")
        arrays = []
        for name, typ, values in zip(self._names, self._types, results, strict=True):
            try:
                arrays.append(pa.array(values, type=typ))
            except (pa.ArrowException, OverflowError, TypeError) as exc:
                raise ValueError(f"result column {name!r} is typed {typ}: {exc}") from None
        return arrays

    def write_batches(self, batches: Sequence[pa.RecordBatch], results: ResultChunk) -> None:
        """Append Parquet input batches as one row group (Parquet output only)."""
        assert self._parquet is not None
        inputs = pa.Table.from_batches(batches, schema=self._in_schema)
        columns = [*inputs.columns, *self._result_arrays(results)]
        table = pa.Table.from_arrays(columns, schema=self._out_schema)
        with writing_to(self._dest):
            self._parquet.write_table(table, row_group_size=max(table.num_rows, 1))

    def write_rows(self, rows: list[dict[str, Any]], results: ResultChunk) -> None:
        """Append one chunk of row dicts (JSONL input, or any input to JSONL output)."""
        if self._parquet is None:
            names, write = self._names, self._stream.write
            with writing_to(self._dest):
                for row, *result in zip(rows, *results, strict=True):
                    row.update(zip(names, result, strict=True))
                    write(dumps_row(row))
            return
        if self._json_columns:
            encode_json_columns(rows, self._json_columns)
        try:
            inputs = pa.RecordBatch.from_pylist(rows, schema=self._in_schema)
        except (pa.ArrowException, OverflowError, TypeError) as exc:
            # The schema came from a full pass over this file; a value that no longer fits
            # means the file changed underneath us.
            raise InputChangedError(
                f"the input no longer matches the column types read from it a moment ago "
                f"({exc}); was it modified during the export? export again"
            ) from None
        arrays = [*inputs.columns, *self._result_arrays(results)]
        with writing_to(self._dest):
            self._parquet.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._out_schema))

    def close(self) -> None:
        """Finish the file (it is still at the temporary name)."""
        with writing_to(self._dest):
            if self._parquet is not None:
                self._parquet.close()
            if self._stream is not None:
                self._stream.close()

    def abort(self) -> None:
        """Close whatever is open and delete the temporary file; never raises."""
        for closable in (self._parquet, self._stream):
            if closable is not None:
                # Already failing: the original error is the one worth reporting.
                with contextlib.suppress(Exception):
                    closable.close()
        # The file may never have been created.
        with contextlib.suppress(pa.ArrowException, OSError):
            self._fs.delete_file(self._tmp)
