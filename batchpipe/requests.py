"""Rows into Message Batch requests: templates, the custom_id scheme, and batch packing.

jinja2's one home. A job's prompt (and optional system prompt) are templates over the row's
columns, compiled once in a sandbox with ``StrictUndefined``. Rendering a row either gives
the Messages params or a :class:`RowProblem` saying what is wrong with that row, so
pre-flight validation can report every bad row before anything is sent.

The custom_id scheme (``{token}-{row_index}-{attempt}``) is known only to
:func:`format_custom_id` and :func:`parse_custom_id`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

import jinja2
import jinja2.meta
import orjson
from jinja2.sandbox import SandboxedEnvironment

from batchpipe.errors import InputError, UsageError
from batchpipe.models import CUSTOM_ID_PATTERN, JobSpec
from batchpipe.structured import OutputSchema

_CUSTOM_ID_RE = re.compile(CUSTOM_ID_PATTERN)
# Ours exactly: no leading zeros, so parse(format(x)) == x and each id has one spelling.
_OURS_RE = re.compile(r"([A-Za-z0-9_]+)-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")

# The create body is b'{"requests":[' + b",".join(requests) + b"]}".
_BODY_HEAD = b'{"requests":['
_BODY_TAIL = b"]}"
_FRAME_BYTES = len(_BODY_HEAD) + len(_BODY_TAIL)
# A request's bytes around its params, with the longest custom_id the API allows.
_MAX_CUSTOM_ID = 64
# request_bytes() around the custom_id and the params.
_WRAPPER_BYTES = len(b'{"custom_id":"","params":}')
_REQUEST_WRAPPER_BYTES = _WRAPPER_BYTES + _MAX_CUSTOM_ID
# Marks a column absent from the row (as opposed to present and null).
_MISSING: Any = object()


# ---------------------------------------------------------------- custom ids


def format_custom_id(token: str, row_index: int, attempt: int) -> str:
    """``{token}-{row_index}-{attempt}``; ValueError if that is not a valid custom_id."""
    if row_index < 0 or attempt < 0:
        raise ValueError(f"row_index and attempt must be >= 0, not {row_index}, {attempt}")
    custom_id = f"{token}-{row_index}-{attempt}"
    # Two non-negative ints always format validly, so only the token and the length can
    # make the id invalid; the token's check is cached (this runs twice per row of a job).
    if len(custom_id) > _MAX_CUSTOM_ID or not _valid_token(token):
        raise ValueError(f"{custom_id!r} is not a valid custom_id (token {token!r})")
    return custom_id


@functools.lru_cache(maxsize=64)
def _valid_token(token: str) -> bool:
    probe = f"{token}-0-0"
    return bool(_OURS_RE.fullmatch(probe) and _CUSTOM_ID_RE.match(probe))


def parse_custom_id(custom_id: str) -> tuple[str, int, int] | None:
    """``(token, row_index, attempt)`` from one of our custom_ids, or None if not ours."""
    if len(custom_id) > _MAX_CUSTOM_ID:
        return None
    match = _OURS_RE.fullmatch(custom_id)
    if match is None:
        return None
    return match[1], int(match[2]), int(match[3])


def new_job_token() -> str:
    """A fresh job token: 10 lowercase hex characters."""
    return secrets.token_hex(5)


# ---------------------------------------------------------------- row checks


class RowProblem(NamedTuple):
    """Why one row cannot become a request. ``message`` names the column where one applies."""

    row_index: int
    row_key: str | None
    message: str

    def describe(self) -> str:
        """One line for users: ``row 41 (key 'a7'): column 'body' is null``."""
        key = f" (key {self.row_key!r})" if self.row_key is not None else ""
        return f"row {self.row_index}{key}: {self.message}"


def check_row_key(
    row: Mapping[str, Any], id_column: str | None, row_index: int
) -> str | RowProblem:
    """The row key as a string (the row index without an id column), or a RowProblem."""
    if id_column is None:
        return str(row_index)
    if id_column not in row:
        return RowProblem(row_index, None, f"column {id_column!r} (the id column) is missing")
    value = row[id_column]
    if value is None:
        return RowProblem(row_index, None, f"column {id_column!r} (the id column) is null")
    if isinstance(value, dict | list | tuple | bytes):
        return RowProblem(
            row_index,
            None,
            f"column {id_column!r} (the id column) holds a {type(value).__name__}; "
            "it must be a string or a number",
        )
    key = str(value)
    if not key.strip():
        return RowProblem(row_index, None, f"column {id_column!r} (the id column) is empty")
    return key


def check_result_column_clash(columns: Iterable[str], result_columns: Iterable[str]) -> None:
    """InputError if the input already has columns the export adds (e.g. ``custom_id``)."""
    added = set(result_columns)
    clash = [c for c in columns if c in added]
    if clash:
        names = ", ".join(repr(c) for c in clash)
        raise InputError(
            f"the input already has column(s) {names}, which batchpipe adds to the output; "
            "rename them in the input and run again"
        )


# ---------------------------------------------------------------- rendering


def _finalize(value: Any) -> Any:
    # Objects and arrays go into prompts as JSON, which models read better than Python's
    # repr ({'a': 1}); everything else renders with str() as jinja2 normally does.
    if isinstance(value, dict | list):
        return orjson.dumps(value, default=str).decode()
    return value


def _human_bytes(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.0f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.0f} kB"
    return f"{n} bytes"


class _SimpleTemplate:
    """A template of only literal text and ``{{ column }}``, rendered without jinja2.

    Most prompts look like this, and jinja2's per-call context set-up costs about ten times
    the actual work. The output is exactly jinja2's: literal text as written (whitespace
    control is already applied by the parser) and each value as ``str(finalize(value))``.
    """

    __slots__ = ("_parts",)

    def __init__(self, parts: list[tuple[str, bool]]) -> None:
        self._parts = parts  # (literal text, False) or (column name, True)

    @classmethod
    def from_ast(cls, ast: jinja2.nodes.Template, columns: set[str]) -> _SimpleTemplate | None:
        """The fast form of ``ast``, or None when it uses anything beyond text and names."""
        parts: list[tuple[str, bool]] = []
        for node in ast.body:
            if not isinstance(node, jinja2.nodes.Output):
                return None
            for child in node.nodes:
                if isinstance(child, jinja2.nodes.TemplateData):
                    parts.append((child.data, False))
                elif isinstance(child, jinja2.nodes.Name) and child.name in columns:
                    parts.append((child.name, True))
                else:
                    return None
        return cls(parts)

    def render(self, row: Mapping[str, Any]) -> str:
        """The text for one row; every referenced column must be present."""
        out = []
        for text, is_column in self._parts:
            if is_column:
                value = row[text]
                out.append(value if type(value) is str else str(_finalize(value)))
            else:
                out.append(text)
        return "".join(out)


class RequestRenderer:
    """Turns rows into Messages params according to a JobSpec."""

    def __init__(self, spec: JobSpec) -> None:
        self._spec = spec
        self._env = SandboxedEnvironment(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=_finalize,
        )
        self._prompt = self._compile("prompt", spec.prompt)
        self._system = self._compile("system", spec.system) if spec.system is not None else None
        self._columns = self._referenced(spec.prompt)
        if spec.system is not None:
            self._columns |= self._referenced(spec.system)
        # Checked in sorted order so a row with several problems always reports the same one.
        self._column_order = sorted(self._columns)
        self._head: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens}
        self._tail: dict[str, Any] = {}
        if spec.temperature is not None:
            self._tail["temperature"] = spec.temperature
        self._tail.update(spec.params)
        if spec.output_schema is not None:
            # After params: the schema's tool or JSON format is what the answer is read from.
            self._tail.update(OutputSchema(spec.output_schema, spec.output_mode).request_params())
        # Largest params JSON that still fits one request into one batch body.
        self._max_params_bytes = spec.max_batch_bytes - _FRAME_BYTES - _REQUEST_WRAPPER_BYTES
        fixed = {**self._head, "messages": [{"role": "user", "content": ""}], **self._tail}
        self._fixed_bytes = len(orjson.dumps({**fixed, "system": ""}))

    def _compile(self, name: str, source: str) -> _SimpleTemplate | jinja2.Template:
        try:
            ast = self._env.parse(source)
            referenced = self._referenced(ast)
            simple = _SimpleTemplate.from_ast(ast, referenced)
            return simple if simple is not None else self._env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise UsageError(
                f"{name} template, line {exc.lineno}: {exc.message}; fix the --{name} template"
            ) from None

    def _referenced(self, source: str | jinja2.nodes.Template) -> set[str]:
        ast = self._env.parse(source) if isinstance(source, str) else source
        # Globals such as range() and dict() are not columns.
        return jinja2.meta.find_undeclared_variables(ast) - set(self._env.globals)

    def template_columns(self) -> set[str]:
        """The columns the templates reference."""
        return set(self._columns)

    def render(self, row: Mapping[str, Any], row_index: int) -> dict[str, Any] | RowProblem:
        """The Messages params for one row, or the RowProblem that stops it.

        The returned dict shares ``spec.params`` values with every other request; treat it
        as read-only.
        """
        for column in self._column_order:
            value = row.get(column, _MISSING)
            if value is None or value is _MISSING:
                what = "missing" if value is _MISSING else "null"
                return RowProblem(row_index, None, f"column {column!r} is {what}")
        try:
            text = self._prompt.render(row)
            system = self._system.render(row) if self._system is not None else None
        except jinja2.UndefinedError as exc:
            return RowProblem(row_index, None, f"template: {exc.message}")
        except Exception as exc:
            # User template code (filters, arithmetic on row values) can raise anything;
            # whatever it is, it is this row's problem, not the run's.
            return RowProblem(row_index, None, f"template failed: {type(exc).__name__}: {exc}")
        if not text.strip():
            return RowProblem(row_index, None, "prompt renders to empty text")
        params = {**self._head, "messages": [{"role": "user", "content": text}]}
        # A system prompt that renders to nothing is left out: the API rejects empty text.
        if system is not None and system.strip():
            # A cacheable system prompt is sent as one text block marked for the prompt cache,
            # so rows sharing it pay the cache-read price for it after the first.
            params["system"] = (
                [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
                if self._spec.cache_system
                else system
            )
        params.update(self._tail)
        problem = self._check_size(params, text, system, row_index)
        return problem if problem is not None else params

    def _check_size(
        self, params: dict[str, Any], text: str, system: str | None, row_index: int
    ) -> RowProblem | None:
        # Exact size needs a serialisation; skip it when even the worst case (every char
        # escaped to 6 bytes) fits, which is every row of any realistic dataset.
        chars = len(text) + (len(system) if system else 0)
        if self._fixed_bytes + 6 * chars <= self._max_params_bytes:
            return None
        size = len(orjson.dumps(params)) + _REQUEST_WRAPPER_BYTES + _FRAME_BYTES
        if size <= self._spec.max_batch_bytes:
            return None
        return RowProblem(
            row_index,
            None,
            f"request is {_human_bytes(size)}, over the "
            f"{_human_bytes(self._spec.max_batch_bytes)} batch limit; shorten the prompt",
        )

    def request_bytes(self, custom_id: str, params: dict[str, Any]) -> bytes:
        """One request as it goes into a create body: ``{"custom_id":…,"params":…}``."""
        return orjson.dumps({"custom_id": custom_id, "params": params})

    def request_hash(self, params: dict[str, Any]) -> str:
        """A short hash of the params (keys sorted), stable across runs and processes."""
        canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(canonical, digest_size=8).hexdigest()

    def request_hash_and_size(self, custom_id: str, params: dict[str, Any]) -> tuple[str, int]:
        """``request_hash(params)`` and ``len(request_bytes(custom_id, params))``.

        One serialization for both: sorting the keys changes no length, and a custom_id
        (``[A-Za-z0-9_-]``) needs no escaping, so the request's size is the canonical
        params' size plus the wrapper's.
        """
        canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
        digest = hashlib.blake2b(canonical, digest_size=8).hexdigest()
        return digest, len(canonical) + len(custom_id) + _WRAPPER_BYTES


# ---------------------------------------------------------------- packing


def _body_file() -> IO[bytes]:
    # A 1 MiB write buffer: requests of ~1 KB are appended one at a time.
    body = tempfile.TemporaryFile(prefix="batchpipe-body-", buffering=1 << 20)  # noqa: SIM115
    body.write(_BODY_HEAD)
    return body


@dataclass
class PlannedBatch:
    """Requests that fit in one create call, with their (row_index, custom_id, attempt).

    The serialized requests are written, comma-separated, into an unnamed temporary file
    that already starts with the body's head; :meth:`body_file` writes the tail and hands
    the file to the upload, which streams it in 64 KiB reads. A batch of 100,000 requests
    is ~90 MB: held in memory (as it was, in one buffer) it was the largest part of the
    process's peak RSS while submitting. A list of orjson bytes per request once held
    780 MB of RSS for 75 MB of requests. :meth:`close` deletes the file.
    """

    items: list[tuple[int, str, int]] = field(default_factory=list)
    _file: IO[bytes] = field(default_factory=_body_file)
    _ends: list[int] = field(default_factory=list)  # end offset of each request in _file
    _sealed: bool = False

    def __enter__(self) -> PlannedBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the body's file (the batch cannot be sent after this)."""
        self._file.close()

    def append(self, payload: bytes) -> None:
        """Add one serialized request (its item goes into ``items`` separately)."""
        if self._sealed:
            raise ValueError("the batch's body was already built; it takes no more requests")
        # Offsets are counted here: tell() on the buffered file costs a seek each time.
        end = self._ends[-1] if self._ends else len(_BODY_HEAD)
        if self._ends:
            self._file.write(b",")
            end += 1
        self._file.write(payload)
        self._ends.append(end + len(payload))

    @property
    def payloads(self) -> list[bytes]:
        """The serialized requests, one bytes each (read back; for inspection and tests)."""
        if not self._ends:
            return []
        at = self._file.tell()
        self._file.seek(0)
        body = self._file.read(self._ends[-1])
        self._file.seek(at)
        starts = [len(_BODY_HEAD), *(end + 1 for end in self._ends[:-1])]
        return [body[a:b] for a, b in zip(starts, self._ends, strict=True)]

    @property
    def count(self) -> int:
        """Number of requests."""
        return len(self._ends)

    @property
    def nbytes(self) -> int:
        """The size of the full body, without building it."""
        return (self._ends[-1] if self._ends else len(_BODY_HEAD)) + len(_BODY_TAIL)

    def body_file(self) -> IO[bytes]:
        """The full create body ``{"requests":[…]}`` as a file positioned at its start.

        Seal the batch (no more requests can be added). Each call rewinds the file, so a
        refused create can be sent again from the same file.
        """
        if not self._sealed:
            self._file.seek(0, io.SEEK_END)
            self._file.write(_BODY_TAIL)
            self._file.flush()
            self._sealed = True
        self._file.seek(0)
        return self._file

    def body(self) -> bytes:
        """The full create body as bytes (a copy in memory: for tests and small batches)."""
        return self.body_file().read()


class BatchPacker:
    """Packs serialized requests into batches under a request-count and a byte limit.

    The byte limit counts the whole create body:
    ``b'{"requests":[' + b','.join(items) + b']}'``.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, not {max_requests}")
        if max_bytes <= _FRAME_BYTES:
            raise ValueError(f"max_bytes must exceed {_FRAME_BYTES}, not {max_bytes}")
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._current = PlannedBatch()

    def __enter__(self) -> BatchPacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the file of the batch being filled (batches handed out close themselves)."""
        self._current.close()

    def add(
        self, row_index: int, custom_id: str, attempt: int, payload: bytes
    ) -> PlannedBatch | None:
        """Add one request; returns the previous batch when this one would overflow it.

        Batches handed out are the caller's to close (``with batch: …``).
        """
        size = len(payload)
        if size + _FRAME_BYTES > self._max_bytes:
            # The renderer flags such rows first; reaching here is a bug upstream.
            raise ValueError(
                f"request {custom_id} is {size} bytes; no batch of {self._max_bytes} bytes holds it"
            )
        full = None
        current = self._current
        if current.count and (
            current.count >= self._max_requests or current.nbytes + 1 + size > self._max_bytes
        ):
            full = current
            current = self._current = PlannedBatch()
        current.items.append((row_index, custom_id, attempt))
        current.append(payload)
        return full

    def flush(self) -> PlannedBatch | None:
        """The batch being filled, if it has anything in it."""
        if not self._current.count:
            return None
        full, self._current = self._current, PlannedBatch()
        return full
