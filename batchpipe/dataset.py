"""Datasets in and out: stream JSONL/Parquet rows; join results back; write atomically.

This is pyarrow's one home (with its helper :mod:`batchpipe.jsonl`). Everything streams:
rows come out in chunks of ``batch_rows`` and the joined export is written chunk by chunk,
so memory stays flat however big the input is. Inputs are local paths or pyarrow filesystem
URIs (``s3://…``, ``gs://…``, ``file://…``).

Every error about the input names the file and, for JSONL, the line (and column where it
applies): users fix their data from the message alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import secrets
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchpipe._export import JoinedWriter, ResultChunk, ResultCursor, writing_to
from batchpipe.errors import InputError, OutputNotWritable, UsageError
from batchpipe.jsonl import TypeInference, iter_row_chunks, line_of_row, lines_of_rows
from batchpipe.models import RESULT_PREFIX_HINT
from batchpipe.procs import host_tag, pid_gone

Format = Literal["jsonl", "parquet"]


def _choose_memory_pool() -> None:
    """Arrow allocates from its jemalloc pool (the system allocator where the wheel has no
    jemalloc) unless ARROW_DEFAULT_MEMORY_POOL says otherwise.

    Not the system allocator: :mod:`batchpipe.memory` fixes glibc's mmap threshold at
    128 KiB, so every decoded Parquet page came from a fresh mmap, and the page faults cost
    0.4 s of system CPU per read of a 1,000,000-row input (read three times per run).
    jemalloc reuses what it freed for the next batch. Not the wheel's default (mimalloc):
    it keeps much of what Arrow frees (100,000 rows peaked at 305 MiB against 235 MiB).
    bench/bench_pipeline.py at 1,000,000 rows: on PostgreSQL 22.4 s CPU with the system
    allocator, 19.3-20.2 s with jemalloc; on SQLite 27.5 s, then 26.0-26.3 s; peak RSS
    259-265 MiB either way.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except (NotImplementedError, pa.ArrowException):  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)


_choose_memory_pool()

_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# JSONL may be compressed; pyarrow decompresses these on the fly when reading.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_HASH_BLOCK_BYTES = 1 << 20
# What an input's fingerprint hashes with, by the name that prefixes it. New jobs record
# sha256: OpenSSL's runs on the CPU's SHA instructions at ~1.9 GB/s here, blake2b at
# ~0.67 GB/s, and a run hashes its input three times (ingest, submit, export): 0.42 s less
# CPU at 1,000,000 rows. blake2b stays readable: jobs ingested before the switch recorded it.
_FINGERPRINT_DIGESTS: dict[str, Any] = {
    "sha256": hashlib.sha256,
    "blake2b": lambda: hashlib.blake2b(digest_size=20),
}
_FINGERPRINT_ALGORITHM = "sha256"

_RESULT_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    # Structured-output array fields (batchpipe.structured): lists of one scalar type.
    "list<string>": pa.list_(pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "list<float64>": pa.list_(pa.float64()),
    "list<bool>": pa.list_(pa.bool_()),
}


def _resolve(uri: str, *, writing: bool = False) -> tuple[pafs.FileSystem, str]:
    """A filesystem and path for a local path or a pyarrow filesystem URI."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)  # type: ignore[no-any-return]
        except (pa.ArrowException, OSError, ValueError) as exc:
            if writing:
                raise OutputNotWritable(f"cannot write {uri}: {exc}") from None
            raise InputError(f"cannot read {uri}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


# What an output is written as, by its extension (nothing else is guessed: an `out.csv` or
# `out.jsonl.gz` written as Parquet would surprise whoever opens it).
_OUTPUT_EXTENSIONS: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def output_format(dest: str) -> Format:
    """The format ``dest`` is written in, from its extension; :class:`OutputNotWritable`
    for any other extension."""
    name = dest.rstrip("/").rsplit("/", 1)[-1].lower()
    fmt = _OUTPUT_EXTENSIONS.get(posixpath.splitext(name)[1])
    if fmt is None:
        known = ", ".join(_OUTPUT_EXTENSIONS)
        raise OutputNotWritable(
            f"cannot tell what to write {dest} as from its extension; end it in one of "
            f"{known} (Parquet or JSONL, uncompressed)"
        )
    return fmt


def check_writable(dest: str, *, source: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Make sure ``dest`` can be written, before anything is spent on a job; its filesystem
    and path.

    Refuses a ``dest`` that names a folder, of no output format (:func:`output_format`),
    or that is ``source`` (the job's input: the
    export would replace it, and the job could no longer read the rows it was ingested
    from). Creates the output's folder as the export does (like most writers users know).
    On a local disk it also creates and removes a probe file beside ``dest``, so missing
    permissions or a read-only mount show now, not after every answer was paid for. On an
    object store only the folder is made (a probe there costs a request and says little
    about the final write). :class:`OutputNotWritable` otherwise.
    """
    fs, path = _resolve(dest, writing=True)
    folder = posixpath.dirname(path) or "."
    if dest.endswith("/") or not posixpath.basename(path):
        raise OutputNotWritable(f"cannot write {dest}: it names a folder; name a file in it")
    output_format(dest)
    if source is not None and _same_file(fs, path, source):
        raise OutputNotWritable(
            f"cannot write {dest}: it is the job's input, which must stay as it was ingested; "
            "choose another output path"
        )
    try:
        fs.create_dir(folder, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            if os.path.isdir(path):
                raise IsADirectoryError(f"{dest} is a folder; name a file in it")
            probe = posixpath.join(folder, f".{posixpath.basename(path)}.{secrets.token_hex(4)}")
            try:
                fs.open_output_stream(probe).close()
            finally:
                with contextlib.suppress(pa.ArrowException, OSError):
                    fs.delete_file(probe)
    except (pa.ArrowException, OSError) as exc:
        raise OutputNotWritable(f"cannot write {dest}: {exc}") from None
    return fs, path


def _same_file(fs: pafs.FileSystem, path: str, source: str) -> bool:
    """Whether ``path`` on ``fs`` is the file ``source`` names (links resolved locally)."""
    try:
        source_fs, source_path = _resolve(source)
    except InputError:
        return False
    if isinstance(fs, pafs.LocalFileSystem) and isinstance(source_fs, pafs.LocalFileSystem):
        return os.path.realpath(path) == os.path.realpath(source_path)
    return bool(fs.type_name == source_fs.type_name and path == source_path)


def guess_format(uri: str) -> Format:
    """The input format from the file extension, or :class:`UsageError`."""
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    fmt = _EXTENSIONS.get(posixpath.splitext(name)[1])
    if fmt is None:
        known = ", ".join(_EXTENSIONS)
        raise UsageError(
            f"cannot tell the format of {uri} from its extension (known: {known}); "
            "pass --input-format jsonl or --input-format parquet"
        )
    return fmt


class Dataset:
    """One input file, read as a stream of row dicts in input order.

    ``Dataset("rows.jsonl")``, ``Dataset("s3://bucket/rows.parquet")``. The constructor
    checks that the file exists and can be opened, so a typo fails at once.
    """

    def __init__(self, uri: str, fmt: Format | None = None) -> None:
        self.uri = uri
        self._fs, self._path = _resolve(uri)
        try:
            info = self._fs.get_file_info(self._path)
            if info.type == pafs.FileType.NotFound:
                raise InputError(f"cannot read {uri}: no such file")
            if info.type == pafs.FileType.Directory:
                raise InputError(f"cannot read {uri}: it is a directory, not a file")
            # Opening catches permission problems now rather than halfway through a job.
            self._fs.open_input_stream(self._path, compression=None).close()
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {uri}: {exc}") from None
        self.format: Format = fmt if fmt is not None else guess_format(uri)
        # Filled by one full pass over a JSONL file, on first need (see _scan_jsonl).
        self._columns: list[str] | None = None
        self._count: int | None = None
        self._schema: tuple[pa.Schema, frozenset[str]] | None = None
        # Per nanosecond column, the type Python gets it as (see _for_python); on first need.
        self._python_types: dict[str, pa.DataType | None] | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.uri!r}, fmt={self.format!r})"

    # ------------------------------------------------------------ whole-file facts

    def fingerprint(self, like: str | None = None, *, limit: int | None = None) -> str:
        """``<algorithm>:<hex>:<size>`` of the raw bytes; changes when any byte changes.

        ``like``: a fingerprint recorded earlier, to hash with its algorithm so the two
        compare (ValueError if batchpipe does not know that algorithm). ``limit``: hash only
        the first ``limit`` bytes (is the file an earlier one with lines added?).
        """
        algorithm = _FINGERPRINT_ALGORITHM if like is None else like.partition(":")[0]
        if algorithm not in _FINGERPRINT_DIGESTS:
            raise ValueError(f"unknown fingerprint algorithm {algorithm!r}")
        digest = _FINGERPRINT_DIGESTS[algorithm]()
        size = 0
        try:
            with self._fs.open_input_stream(self._path, compression=None) as stream:
                while block := stream.read(
                    _HASH_BLOCK_BYTES if limit is None else min(_HASH_BLOCK_BYTES, limit - size)
                ):
                    digest.update(block)
                    size += len(block)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {self.uri}: {exc}") from None
        return f"{algorithm}:{digest.hexdigest()}:{size}"

    def columns(self) -> list[str]:
        """Column names: the Parquet schema's, or for JSONL every key in first-seen order."""
        if self.format == "parquet":
            return list(self._parquet_file().schema_arrow.names)
        if self._columns is None:
            self._scan_jsonl(infer_types=False)
        assert self._columns is not None
        return list(self._columns)

    def count_rows(self) -> int:
        """Number of rows (blank JSONL lines do not count)."""
        if self.format == "parquet":
            return int(self._parquet_file().metadata.num_rows)
        if self._count is None:
            self._scan_jsonl(infer_types=False)
        assert self._count is not None
        return self._count

    def where(self, row_index: int) -> str:
        """Where row ``row_index`` (from 0) is, for messages: ``"{uri}, line 7"`` for JSONL
        (blank lines counted, as an editor counts), ``"{uri}, row 7"`` for Parquet."""
        if self.format == "jsonl":
            with self._open_text() as stream:
                lineno = line_of_row(stream, row_index)
            if lineno is not None:
                return f"{self.uri}, line {lineno}"
        return f"{self.uri}, row {row_index + 1}"

    def nested_column(self, name: str) -> str | None:
        """What a Parquet column holds when it is no scalar (``"struct"``, ``"list"``,
        ``"map"``, ``"binary"``), from the schema alone; None for a scalar column, a column
        the file lacks, or JSONL (whose values have a type per row, not per column)."""
        if self.format != "parquet":
            return None
        schema = self._parquet_file().schema_arrow
        if name not in schema.names:
            return None
        kind = schema.field(name).type
        if pa.types.is_struct(kind):
            return "struct"
        if pa.types.is_map(kind):
            return "map"
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return "list"
        if pa.types.is_fixed_size_list(kind):
            return "list"
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return "binary"
        if pa.types.is_fixed_size_binary(kind):
            return "binary"
        return None

    def lines_of(self, row_indexes: Collection[int]) -> dict[int, int]:
        """The file line of each of ``row_indexes`` (from 0) for a JSONL input, in one pass;
        empty for Parquet, whose rows have no lines."""
        if self.format != "jsonl" or not row_indexes:
            return {}
        with self._open_text() as stream:
            return lines_of_rows(stream, row_indexes)

    # ------------------------------------------------------------ streaming

    def iter_rows(
        self, batch_rows: int = 8192, columns: Collection[str] | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Rows as dicts, in input order, in lists of at most ``batch_rows``.

        ``columns``: the ones the caller reads. A Parquet input decodes only those of them
        it has (a row lacks the others, as it would if the file lacked them); JSONL rows
        keep every key, since each line is parsed whole anyway.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")
        if self.format == "jsonl":
            with self._open_text() as stream:
                yield from iter_row_chunks(stream, self.uri, batch_rows)
            return
        for batch in self.iter_batches(batch_rows, columns):
            yield self._for_python(batch).to_pylist()

    def iter_chunks(
        self, batch_rows: int = 8192, columns: Collection[str] | None = None
    ) -> Iterator[RowChunk]:
        """:meth:`iter_rows` as :class:`RowChunk`: a Parquet chunk also hands out whole
        columns, without a dict per row (see RowChunk)."""
        if self.format == "jsonl":
            for rows in self.iter_rows(batch_rows, columns):
                yield RowChunk(rows, None)
            return
        for batch in self.iter_batches(batch_rows, columns):
            yield RowChunk(None, self._for_python(batch))

    def iter_batches(
        self, batch_rows: int = 8192, columns: Collection[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Parquet only: the input as Arrow record batches (no Python conversion).

        ``columns`` limits what is read to those of them the file has, in file order.
        """
        if self.format != "parquet":
            raise TypeError("iter_batches reads Parquet; use iter_rows for JSONL")
        parquet = self._parquet_file()
        # Reading and converting only the columns a step uses: a template over one column
        # of a wide file should not decode the rest (Parquet is columnar; this is the point).
        wanted = None
        if columns is not None:
            # None rather than []: batches of no columns would not carry the row count.
            wanted = [name for name in parquet.schema_arrow.names if name in columns] or None
        done = 0
        try:
            # One reader per row group: a single reader over the whole file keeps Arrow
            # memory it has decoded (pyarrow 26: +160 MB at 1,000,000 rows in 20 row groups,
            # growing with the file), one per row group stays at about one row group.
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(
                    batch_size=batch_rows, row_groups=[group], columns=wanted, use_threads=False
                ):
                    done += batch.num_rows
                    yield batch
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{self.uri}: cannot read Parquet data after row {done}: {exc}; "
                "the file looks damaged"
            ) from None

    def arrow_schema(self) -> tuple[pa.Schema, frozenset[str]]:
        """The schema to write this input with, and its JSON-string columns (JSONL only).

        For JSONL this costs a full pass the first time; see :class:`jsonl.TypeInference`.
        """
        if self.format == "parquet":
            return self._parquet_file().schema_arrow, frozenset()
        if self._schema is None:
            self._scan_jsonl(infer_types=True)
        assert self._schema is not None
        return self._schema

    # ------------------------------------------------------------ internals

    def _for_python(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with its nanosecond times as values Python can hold.

        Python's datetime stops at microseconds, and pyarrow refuses (asking for pandas) to
        convert a value with nanoseconds in it, so rendering or a JSONL export of such a
        column failed. Each such column is converted as the whole file allows (decided once,
        :meth:`_nanosecond_columns`), so that every row of it reaches templates and JSONL in
        one form. InputError for nested values with nanoseconds in them, naming the column.
        """
        plan = self._nanosecond_columns()
        if not plan:
            return batch
        arrays = []
        for field, column in zip(batch.schema, batch.columns, strict=True):
            if field.name not in plan:
                arrays.append(column)
                continue
            to = plan[field.name]
            if to is None:
                raise self._nested_nanoseconds(field)
            arrays.append(column.cast(to))
        return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)

    def _nanosecond_columns(self) -> dict[str, pa.DataType | None]:
        """The Parquet columns with nanosecond times (nested too), each with the type it
        reaches Python as: counted in microseconds when that loses nothing in any row (pandas
        writes every time in nanoseconds, nearly always whole microseconds); else a top-level
        time as text, every digit kept (``2023-11-14 22:13:20.123456789``), a duration as its
        nanoseconds; else (nested) None: it cannot be converted. One read of these columns
        only, and only for a file that has one."""
        if self._python_types is None:
            plan: dict[str, pa.DataType | None] = {}
            if self.format == "parquet":
                for field in self._parquet_file().schema_arrow:
                    micro = _in_microseconds(field.type)
                    if micro != field.type:
                        plan[field.name] = micro
            for batch in self.iter_batches(columns=list(plan)) if plan else ():
                for field, column in zip(batch.schema, batch.columns, strict=True):
                    to = plan[field.name]
                    if to is None or to in (pa.string(), pa.int64()):
                        continue  # already given up on microseconds
                    try:
                        column.cast(to, safe=True)  # refused where it would lose digits
                    except pa.ArrowInvalid:
                        if not _in_nanoseconds(field.type):
                            plan[field.name] = None
                        elif pa.types.is_duration(field.type):
                            plan[field.name] = pa.int64()
                        else:
                            plan[field.name] = pa.string()
            self._python_types = plan
        return self._python_types

    def check_python_readable(self) -> None:
        """InputError if a column cannot become Python values (see :meth:`_for_python`):
        nanoseconds inside nested values. For a job whose JSONL output needs every column
        as Python values: refused before anything is paid for, not at export."""
        for name, to in self._nanosecond_columns().items():
            if to is None:
                raise self._nested_nanoseconds(self._parquet_file().schema_arrow.field(name))

    def _nested_nanoseconds(self, field: pa.Field) -> InputError:
        return InputError(
            f"{self.uri}: column {field.name!r} holds times with nanoseconds inside its "
            f"{field.type} values, which cannot become Python values for a template or a "
            "JSONL output; round them to microseconds or store them as text"
        )

    def _open_text(self) -> _TextStream:
        """The JSONL byte stream, decompressed when the extension says so."""
        try:
            return _TextStream(self._fs.open_input_stream(self._path, compression="detect"), self)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {self.uri}: {exc}") from None

    def _parquet_file(self) -> pq.ParquetFile:
        try:
            source = self._fs.open_input_file(self._path)
            # No pre-buffering: it reads a row group's column chunks whole ahead of decoding.
            parquet = pq.ParquetFile(source, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"cannot read {self.uri} as Parquet: {exc}; is it really a Parquet file?"
            ) from None
        return parquet

    def _scan_jsonl(self, *, infer_types: bool) -> None:
        """One full pass: columns in first-seen order, the row count, optionally types."""
        seen: dict[str, None] = {}
        known: set[str] = set()
        count = 0
        inference = TypeInference() if infer_types else None
        for rows in self.iter_rows():
            count += len(rows)
            for row in rows:
                # Set comparison runs in C; the Python loop only runs for new keys.
                if not row.keys() <= known:
                    for key in row:
                        if key not in known:
                            known.add(key)
                            seen[key] = None
            if inference is not None:
                inference.add_chunk(rows, seen)
        self._columns = list(seen)
        self._count = count
        if inference is not None:
            self._schema = inference.schema(self._columns)


class RowChunk:
    """Consecutive input rows: as row dicts (:meth:`rows`), and for Parquet also as whole
    columns of plain values (:meth:`texts`, :meth:`ids`).

    Turning a record batch into a dict per row is most of what reading costs once the file
    is decoded (at 1,000,000 rows of an id and a body: ~1 s a pass, against ~0.2 s for the
    two columns as lists), and ingest and submit each read the input once; a renderer
    whose template is plain text and columns can work from the columns instead.
    """

    __slots__ = ("_batch", "_rows")

    def __init__(self, rows: list[dict[str, Any]] | None, batch: pa.RecordBatch | None) -> None:
        self._rows = rows
        self._batch = batch

    def __len__(self) -> int:
        if self._batch is not None:
            rows: int = self._batch.num_rows
            return rows
        assert self._rows is not None
        return len(self._rows)

    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts (converted once, then kept)."""
        if self._rows is None:
            assert self._batch is not None
            self._rows = self._batch.to_pylist()
        return self._rows

    def texts(self, name: str) -> list[str] | None:
        """Column ``name`` as a list of str when it is a text column without a null; None
        otherwise (JSONL, where each row has its own types; a missing column; any null):
        the caller then goes row by row."""
        column = self._column(name)
        if column is None or not (
            pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        ):
            return None
        values: list[str] = column.to_pylist()
        return values

    def ids(self, name: str) -> list[str] | list[int] | None:
        """Column ``name`` as str or int values when it is a text or integer column without
        a null; None otherwise (as :meth:`texts`)."""
        column = self._column(name)
        if column is None:
            return None
        if pa.types.is_integer(column.type):
            numbers: list[int] = column.to_pylist()
            return numbers
        return self.texts(name)

    def _column(self, name: str) -> pa.Array | None:
        if self._batch is None:
            return None
        index = self._batch.schema.get_field_index(name)
        if index < 0:
            return None
        column = self._batch.column(index)
        return None if column.null_count else column


# ---------------------------------------------------------------- the joined export


# The joined export reads its input in small batches and writes them in row groups of
# _EXPORT_GROUP_ROWS: Arrow's reader decodes ahead by whole batches, and at 8,192 rows a
# batch that was ~19 MB of the export's peak RSS (at 2,048: bench/bench_pipeline.py, 1M rows).
_EXPORT_READ_ROWS = 2048
_EXPORT_GROUP_ROWS = 8192


def _row_groups(batches: Iterable[pa.RecordBatch]) -> Iterator[list[pa.RecordBatch]]:
    """Consecutive batches gathered into lists of at least _EXPORT_GROUP_ROWS rows (the
    last one may be short)."""
    group: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        group.append(batch)
        rows += batch.num_rows
        if rows >= _EXPORT_GROUP_ROWS:
            yield group
            group, rows = [], 0
    if group:
        yield group


def write_joined(
    dataset: Dataset,
    results: Iterable[ResultChunk],
    result_columns: Sequence[tuple[str, str]],
    dest: str,
) -> int:
    """Write every input row followed by its result columns to ``dest``; return the row count.

    ``results`` yields chunks (any number of rows each) of result columns: one sequence per
    entry of ``result_columns`` (``(name, type)``, type one of string, int64, float64, bool,
    or ``list<…>`` of one of those), in that order, each holding one value per input row in
    input order, all of a chunk's columns of one length. Input columns keep their types.
    Output is Parquet or JSONL by ``dest``'s extension (:func:`output_format`). The file
    appears at ``dest`` complete or not at all: it is written beside it under a temporary
    name and renamed into place; on any error (including too few or too many results:
    :class:`InputChangedError`) the temporary file is removed.
    """
    if not result_columns:
        raise ValueError("write_joined needs at least one result column")
    names = [name for name, _ in result_columns]
    types: list[pa.DataType] = []
    for name, type_name in result_columns:
        if type_name not in _RESULT_TYPES:
            raise ValueError(f"result column {name!r}: unknown type {type_name!r}")
        types.append(_RESULT_TYPES[type_name])
    as_jsonl = output_format(dest) == "jsonl"
    # Schema inference (a full JSONL pass) happens before any file is created.
    schema = None if as_jsonl else dataset.arrow_schema()
    added = frozenset(names)
    # JSONL to JSONL needs no full pass for anything else, so rather than pay one just to
    # learn the columns, each row is checked as it streams past.
    check_each_row = dataset.format == "jsonl" and dataset._columns is None
    if not check_each_row:
        _refuse_clash(dataset.uri, [c for c in dataset.columns() if c in added])
    cursor = ResultCursor(results, dataset.uri, len(names))
    fs, path = check_writable(dest, source=dataset.uri)
    if isinstance(fs, pafs.LocalFileSystem):
        sweep_dead_temporaries(path)
    tmp = posixpath.join(
        posixpath.dirname(path),
        f".{posixpath.basename(path)}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp",
    )
    writer = JoinedWriter(fs, tmp=tmp, dest=dest, names=names, types=types, schema=schema)
    written = 0
    try:
        if dataset.format == "parquet" and not as_jsonl:
            # Parquet to Parquet never converts input values to Python objects.
            for group in _row_groups(dataset.iter_batches(_EXPORT_READ_ROWS)):
                rows = sum(batch.num_rows for batch in group)
                writer.write_batches(group, cursor.take(rows))
                written += rows
        else:
            for rows in dataset.iter_rows():
                if check_each_row:
                    for row in rows:
                        if not added.isdisjoint(row):
                            _refuse_clash(dataset.uri, [c for c in row if c in added])
                writer.write_rows(rows, cursor.take(len(rows)))
                written += len(rows)
        cursor.finish()
        writer.close()
        with writing_to(dest):
            if isinstance(fs, pafs.LocalFileSystem):
                # Without the fsync, a reboot soon after the rename can leave a renamed but
                # empty or truncated file: the data must be on disk before the name points
                # at it.
                _fsync_path(tmp)
                os.replace(tmp, path)
                _fsync_dir(posixpath.dirname(path) or ".")
            else:
                fs.move(tmp, path)
    except BaseException:
        writer.abort()
        raise
    return written


# A temporary file from before temporaries named their writer: removed once a day old (a
# live export writes its temporary file every few seconds).
_UNNAMED_TEMPORARY_MAX_AGE_S = 24 * 3600


def sweep_dead_temporaries(path: str) -> list[str]:
    """Remove the temporary files that exports to ``path`` (a local file) left behind when
    their process died (``kill -9``, a reboot) before the rename; return their paths.

    Each is named ``.{name}.{host}.{pid}.{random}.tmp`` and can be as large as the output,
    so without this every killed export leaves one more beside it. Removed only when it was
    made on this host by a process that is gone: an export still writing (here or on
    another machine sharing the disk) keeps its file.
    """
    folder, name = posixpath.split(path)
    host = host_tag()
    prefix = f".{name}."
    removed: list[str] = []
    try:
        siblings = [e for e in os.scandir(folder or ".") if e.name.startswith(prefix)]
    except OSError:
        return removed  # an unreadable folder: the write itself will say so
    for entry in siblings:
        parts = entry.name[len(prefix) :].split(".")
        if parts[-1:] != ["tmp"]:
            continue
        if len(parts) == 4:
            dead = parts[0] == host and parts[1].isdigit() and pid_gone(int(parts[1]))
        else:
            try:
                age = time.time() - entry.stat().st_mtime
            except OSError:
                continue
            dead = len(parts) == 2 and age > _UNNAMED_TEMPORARY_MAX_AGE_S
        if dead:
            with contextlib.suppress(FileNotFoundError):  # another run swept it first
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def _fsync_path(path: str) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable; best effort (some systems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        _fsync_path(path)


def _refuse_clash(uri: str, clash: list[str]) -> None:
    if clash:
        raise InputError(
            f"{uri} already has column(s) {', '.join(map(repr, clash))}, which the export "
            f"adds; {RESULT_PREFIX_HINT}"
        )


def _in_nanoseconds(kind: pa.DataType) -> bool:
    """A timestamp, time of day or duration counted in nanoseconds."""
    temporal = pa.types.is_timestamp(kind) or pa.types.is_time64(kind)
    return (temporal or pa.types.is_duration(kind)) and bool(kind.unit == "ns")


def _in_microseconds(kind: pa.DataType) -> pa.DataType:
    """``kind`` with every nanosecond time in it (nested too) counted in microseconds;
    ``kind`` itself when it has none."""
    if _in_nanoseconds(kind):
        if pa.types.is_timestamp(kind):
            return pa.timestamp("us", kind.tz)
        return pa.time64("us") if pa.types.is_time64(kind) else pa.duration("us")
    if pa.types.is_struct(kind):
        fields = [kind.field(i) for i in range(kind.num_fields)]
        inner = [f.with_type(_in_microseconds(f.type)) for f in fields]
        return kind if inner == fields else pa.struct(inner)
    if pa.types.is_map(kind):
        key, item = _in_microseconds(kind.key_type), _in_microseconds(kind.item_type)
        same = key == kind.key_type and item == kind.item_type
        return kind if same else pa.map_(key, item, kind.keys_sorted)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        value = kind.value_field
        inner_field = value.with_type(_in_microseconds(value.type))
        if inner_field == value:
            return kind
        return pa.list_(inner_field) if pa.types.is_list(kind) else pa.large_list(inner_field)
    if pa.types.is_fixed_size_list(kind):
        value = kind.value_field
        inner_field = value.with_type(_in_microseconds(value.type))
        return kind if inner_field == value else pa.list_(inner_field, kind.list_size)
    return kind  # dictionary-encoded times and rarer nestings: left as they are


class _TextStream:
    """A JSONL input stream whose read errors say which file broke, and where.

    A corrupt or cut-short compressed file (.gz, .bz2, .zst) fails only once read that far,
    with pyarrow's bare OSError ("Truncated compressed stream"): as InputError the job is
    refused with the file's name, as any other unreadable input is.
    """

    def __init__(self, stream: Any, dataset: Dataset) -> None:
        self._stream = stream
        self._dataset = dataset
        self._done = 0  # bytes handed out so far (decompressed)

    def read(self, nbytes: int, /) -> bytes:
        """Up to ``nbytes`` bytes (b"" at the end), or InputError."""
        try:
            block: bytes = self._stream.read(nbytes)
        except (pa.ArrowException, OSError) as exc:
            where = f" after {self._done:,} bytes of its text" if self._done else ""
            compressed = self._dataset.uri.lower().endswith(_COMPRESSION_SUFFIXES)
            hint = "; is the compressed file whole and uncorrupted?" if compressed else ""
            raise InputError(f"cannot read {self._dataset.uri}{where}: {exc}{hint}") from None
        self._done += len(block)
        return block

    def __enter__(self) -> _TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
