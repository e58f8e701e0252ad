"""Rows into Messages params: the row checks and the templates (jinja2's one home).

A job's prompt (and optional system prompt) are templates over the row's columns, compiled
once in a sandbox with ``StrictUndefined``. Rendering a row either gives the Messages params
or a :class:`RowProblem` saying what is wrong with that row, so pre-flight validation can
report every bad row before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any, NamedTuple, Protocol

import jinja2
import jinja2.meta
import orjson
from jinja2.sandbox import SandboxedEnvironment

from batchpipe.errors import InputError, UsageError
from batchpipe.jsontext import dumps
from batchpipe.models import RESULT_PREFIX_HINT, JobSpec
from batchpipe.requests.framing import FRAME_BYTES, REQUEST_WRAPPER_BYTES
from batchpipe.requests.lookups import (
    NULL,
    NullLookup,
    NullPrinted,
    StrictLookupUndefined,
    TemplateLookups,
)
from batchpipe.structured import OutputSchema

# Marks a column absent from the row (as opposed to present and null).
_MISSING: Any = object()


class RowProblem(NamedTuple):
    """Why one row cannot become a request. ``message`` names the column where one applies.

    ``row_index`` counts from 0; users read "row N+1 (id ...)" (``pipeline.describe_problem``).
    """

    row_index: int
    row_key: str | None
    message: str


def check_row_key(
    row: Mapping[str, Any], id_column: str | None, row_index: int
) -> str | RowProblem:
    """The row key as a string (the row index without an id column), or a RowProblem."""
    if id_column is None:
        return str(row_index)
    value = row.get(id_column)
    if type(value) is str and value and not value.isspace():
        return value  # the common case, in one test rather than the checks below
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


def chunk_keys(chunk: RowSource, id_column: str | None, first_row: int) -> list[str] | None:
    """:func:`check_row_key` of every row of ``chunk`` (whose first row is ``first_row``)
    from the id column as a whole, when every id is good; None when the chunk must go row
    by row (JSONL, a null or blank id, ids that are neither text nor whole numbers)."""
    if id_column is None:
        return [str(i) for i in range(first_row, first_row + len(chunk))]
    values = chunk.ids(id_column)
    if values is None:
        return None
    if values and type(values[0]) is int:  # a column of whole numbers: ints only
        return [str(v) for v in values]
    texts: list[str] = values  # type: ignore[assignment]  # a text column: strs only
    if "" in texts or any(map(str.isspace, texts)):
        return None
    return texts


# What a value of the id column is, for users: ids of two kinds are refused (IdKinds).
_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "a whole number",
    float: "a number with a fraction or exponent",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


def id_kind(value: object) -> str:
    """``value``'s kind, as :class:`IdKinds` names it in messages ("a whole number" …)."""
    return _KIND_NAMES.get(type(value), f"a {type(value).__name__}")


class MixedIds(NamedTuple):
    """Two rows whose ids are of different kinds (row indexes count from 0)."""

    first_row: int
    first_value: Any
    row: int
    value: Any


class IdKinds:
    """Holds the id column of one input to one kind of value (all strings, all whole
    numbers …), so that ids are exact: keys are ids as text, so the id 1 and the id "1"
    would be one key (a false duplicate), while 1 and 1.0 would pass as two ids and then be
    exported alike (a column of both is written as floats). JSONL can mix kinds; a Parquet
    column cannot. Nulls and missing ids are left to :func:`check_row_key`.
    """

    def __init__(self, id_column: str | None) -> None:
        self._column = id_column
        self._first: tuple[int, Any] | None = None
        self._type: type | None = None

    def check(self, row: Mapping[str, Any], row_index: int) -> MixedIds | NestedId | None:
        """None while ``row``'s id is of the kind of the first id seen (or null/missing);
        :class:`NestedId` when that first id is an object or array."""
        if self._column is None:
            return None
        value = row.get(self._column)
        if type(value) is self._type or value is None:
            return None
        if self._first is None:
            if isinstance(value, dict | list | tuple):
                return NestedId(row_index, value)
            self._first, self._type = (row_index, value), type(value)
            return None
        return MixedIds(*self._first, row_index, value)


class NestedId(NamedTuple):
    """The first id of the input is an object or array (row index from 0): the column is
    no id column, and every row would fail alike, so the input is refused once."""

    row: int
    value: Any


# Binary digits as blanks, for stand-in keys (see standin_key).
_BLANK_BITS = str.maketrans("01", " \t")


def standin_key(row_index: int) -> str:
    """The key stored for a row without a usable id (an invalid row), unique per row and
    never equal to a real id: every real key has a character that is not blank
    (:func:`check_row_key` refuses blank ids), and this one is blanks only, the row index
    in binary with a space for 0 and a tab for 1. (A readable ``<row 7>`` was the key of
    a real id "<row 7>" too, and made it a false duplicate.)"""
    return format(row_index, "b").translate(_BLANK_BITS)


def check_result_column_clash(columns: Iterable[str], result_columns: Iterable[str]) -> None:
    """InputError if the input already has columns the export adds (e.g. ``custom_id``)."""
    added = set(result_columns)
    clash = [c for c in columns if c in added]
    if clash:
        names = ", ".join(repr(c) for c in clash)
        raise InputError(
            f"the input already has column(s) {names}, which batchpipe adds to the output; "
            f"{RESULT_PREFIX_HINT}"
        )


# The name a template uses for the whole row (see RequestRenderer).
ROW_NAME = "row"


class _Environment(SandboxedEnvironment):
    """The sandbox, with lookups that treat nulls as nulls. A null field read is NULL, so
    that a filter cannot turn it into "None" (`{{ meta.lang | upper }}`), and a field read
    from a null is a NullLookup, absent and false: `{{ meta.info.lang or 'unknown' }}` and
    `| default('unknown')` give the default when ``meta`` is null. A missing field stays
    strictly undefined (a typo fails the row)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _read(obj, attribute, super().getattr)

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _read(obj, argument, super().getitem)


def _read(obj: Any, key: Any, lookup: Callable[[Any, Any], Any]) -> Any:
    """``lookup(obj, key)`` (the sandbox's own), with a null read as NULL, and anything read
    from a null as a NullLookup."""
    if obj is None or obj is NULL or isinstance(obj, NullLookup):
        return NullLookup(obj=obj, name=key)
    value = lookup(obj, key)
    return NULL if value is None else value


def _is_none(value: Any) -> bool:
    """Jinja's `none` test, true for a null column too (`{% if body is none %}`)."""
    return value is None or value is NULL or isinstance(value, NullLookup)


def _finalize(value: Any) -> Any:
    # Objects and arrays go into prompts as JSON, which models read better than Python's
    # repr ({'a': 1}); everything else renders with str() as jinja2 normally does.
    if isinstance(value, dict | list):
        return dumps(value, default=str).decode()  # integers of any size exactly
    if value is None or value is NULL:
        # Not the text "None" (sent, and paid for): a null is missing data, as it is for a
        # column a plain template prints, which render() refuses before it renders.
        raise NullPrinted
    return value


def _human_bytes(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.0f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.0f} kB"
    return f"{n} bytes"


class RowSource(Protocol):
    """Consecutive input rows, as dicts and, where the input keeps them so, as whole text
    columns (``dataset.RowChunk``)."""

    def __len__(self) -> int: ...

    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts."""
        ...

    def texts(self, name: str) -> list[str] | None:
        """Column ``name`` as str values, or None unless it is text without a null."""
        ...

    def ids(self, name: str) -> list[str] | list[int] | None:
        """Column ``name`` as str or int values, or None unless it is text or whole
        numbers without a null."""
        ...


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

    def columns(self) -> list[str]:
        """The columns the template prints, in order of appearance (repeats included)."""
        return [text for text, is_column in self._parts if is_column]

    def literal(self) -> str:
        """The template's literal text, all of it."""
        return "".join(text for text, is_column in self._parts if not is_column)

    def render_columns(self, values: Mapping[str, Sequence[str]], count: int) -> list[str]:
        """:meth:`render` of ``count`` rows given as text columns (``values[name][i]``)."""
        parts: list[Iterable[str]] = [
            values[text] if is_column else repeat(text, count) for text, is_column in self._parts
        ]
        if not parts:  # a template of no text at all ('' or only a comment): blank rows
            return [""] * count
        if len(parts) == 1:
            return list(parts[0])
        if len(parts) == 2:  # literal + column, or column + literal: the commonest prompts
            return [a + b for a, b in zip(*parts)]  # noqa: B905 (repeat() is endless)
        return ["".join(p) for p in zip(*parts)]  # noqa: B905

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
        self._env = _Environment(
            undefined=StrictLookupUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=_finalize,
        )
        self._env.tests["none"] = _is_none
        self._prompt = self._compile("prompt", spec.prompt)
        self._system = self._compile("system", spec.system) if spec.system is not None else None
        referenced = {"prompt": self._referenced(spec.prompt)}
        if spec.system is not None:
            referenced["system"] = self._referenced(spec.system)
        self._columns = set().union(*referenced.values())
        # Each template's own columns, to say which one names a column the input lacks.
        self._by_template = {name: cols - {ROW_NAME} for name, cols in referenced.items()}
        # `row` is the whole row, for columns whose names are not identifiers
        # ({{ row["product name"] }}); an input column of that name still wins.
        self._whole_row = ROW_NAME in self._columns
        self._columns.discard(ROW_NAME)
        # To name the nested field at fault when a row fails (meta.langg is missing …).
        sources = [spec.prompt] if spec.system is None else [spec.prompt, spec.system]
        self._lookups = TemplateLookups(
            [self._env.parse(s) for s in sources], ROW_NAME if self._whole_row else None
        )
        # Checked in sorted order so a row with several problems always reports the same one.
        self._column_order = sorted(self._columns)
        # A column only Jinja templates print may be null: the template may say what to
        # print instead ({{ body or 'none' }}, {% if body %}), as for a nested field, and
        # a null it prints is refused as it renders (_finalize). One a plain template prints
        # is refused before it renders, as it always was.
        plain_printed: set[str] = set()
        for name, template in (("prompt", self._prompt), ("system", self._system)):
            if isinstance(template, _SimpleTemplate):
                plain_printed |= self._by_template[name]
        self._nullable = frozenset(self._columns - plain_printed)
        self._head: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens}
        self._tail: dict[str, Any] = {}
        if spec.temperature is not None:
            self._tail["temperature"] = spec.temperature
        self._tail.update(spec.params)
        if spec.output_schema is not None:
            # After params: the schema's tool or JSON format is what the answer is read from.
            self._tail.update(OutputSchema(spec.output_schema, spec.output_mode).request_params())
        # Templates of plain text and columns render a chunk column by column (render_chunk).
        self._plain: tuple[_SimpleTemplate, _SimpleTemplate | None] | None = None
        self._frame: tuple[bytes, bytes] | None = None  # see _plain_payloads
        system = self._system
        plain_system = system is None or isinstance(system, _SimpleTemplate)
        if isinstance(self._prompt, _SimpleTemplate) and plain_system and not self._whole_row:
            self._plain = (self._prompt, system if isinstance(system, _SimpleTemplate) else None)
        # Largest params JSON that still fits one request into one batch body.
        self._max_params_bytes = spec.max_batch_bytes - FRAME_BYTES - REQUEST_WRAPPER_BYTES
        fixed = {**self._head, "messages": [{"role": "user", "content": ""}], **self._tail}
        # The system prompt in the shape it is sent: a cacheable one is a whole text block.
        self._fixed_bytes = len(orjson.dumps({**fixed, "system": self._system_param("")}))

    def _compile(self, name: str, source: str) -> _SimpleTemplate | jinja2.Template:
        try:
            # Rows only hold valid text (Arrow and orjson check it), so a request can only
            # fail to serialize through the template: refuse it here, not at submit.
            source.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(
                f"{name} template is not valid text ({exc.reason} at character {exc.start}); "
                f"fix the --{name} template"
            ) from None
        try:
            ast = self._env.parse(source)
            # A bare {{ row }} is the whole row unless the input has a column so named:
            # only the jinja2 path decides that, row by row.
            referenced = self._referenced(ast) - {ROW_NAME}
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
        """The columns the templates reference by name (not through ``row[...]``)."""
        return set(self._columns)

    def templates_using(self, column: str) -> list[str]:
        """Which templates (``prompt``, ``system``) reference ``column`` by name."""
        return [name for name, columns in self._by_template.items() if column in columns]

    def columns_to_read(self) -> set[str] | None:
        """The input columns rendering needs; None for all of them (``row`` is used)."""
        return None if self._whole_row else set(self._columns)

    def render(self, row: Mapping[str, Any], row_index: int) -> dict[str, Any] | RowProblem:
        """The Messages params for one row, or the RowProblem that stops it.

        The returned dict shares ``spec.params`` values with every other request; treat it
        as read-only.
        """
        nulls = []
        for column in self._column_order:
            value = row.get(column, _MISSING)
            if value is None and column in self._nullable:
                nulls.append(column)
            elif value is None or value is _MISSING:
                return self._absent_columns(row, row_index)
        context = row if not nulls else {**row, **dict.fromkeys(nulls, NULL)}
        if self._whole_row and ROW_NAME not in row:
            context = {**context, ROW_NAME: row}
        try:
            text = self._prompt.render(context)
            system = self._system.render(context) if self._system is not None else None
        except jinja2.UndefinedError as exc:
            return RowProblem(row_index, None, self._lookups.missing_field(row, exc))
        except NullPrinted:
            return RowProblem(row_index, None, self._lookups.null_field(row, nulls))
        except Exception as exc:
            # User template code (filters, arithmetic on row values) can raise anything;
            # whatever it is, it is this row's problem, not the run's.
            return RowProblem(row_index, None, f"template failed: {type(exc).__name__}: {exc}")
        if not text.strip():
            return RowProblem(row_index, None, "prompt renders to empty text")
        params = self._params(text, system)
        problem = self._check_size(params, text, system, row_index)
        return problem if problem is not None else params

    def render_chunk(
        self, chunk: RowSource, first_row: int, positions: Sequence[int] | None = None
    ) -> list[dict[str, Any] | RowProblem]:
        """:meth:`render` of the chunk's rows at ``positions`` (every row by default), in
        that order; ``first_row`` is the row index of the chunk's first row.

        Templates of only literal text and columns, over text columns without a null,
        render column by column, without a dict per row; anything else goes row by row.
        The results are the same either way.
        """
        columns = self._plain_columns(chunk)
        if columns is None:
            rows = chunk.rows()
            picks = range(len(rows)) if positions is None else positions
            return [self.render(rows[p], first_row + p) for p in picks]
        if positions is None:
            return self._render_plain(columns, first_row, range(len(chunk)))
        picked = {name: [values[p] for p in positions] for name, values in columns.items()}
        return self._render_plain(picked, first_row, positions)

    def check_chunk(self, chunk: RowSource, first_row: int) -> list[RowProblem | None]:
        """What :meth:`render_chunk` says of each row of the chunk, without the requests:
        its RowProblem, or None for a row that renders.

        Validation needs no request: where the chunk goes column by column, no row is
        blank and even the longest one fits at its worst case, every row is good, and
        that is known from the columns' lengths alone.
        """
        columns = self._plain_columns(chunk)
        if columns is None:
            rendered = self.render_chunk(chunk, first_row)
        elif self._all_fit(columns):
            return [None] * len(chunk)
        else:
            rendered = self._render_plain(columns, first_row, range(len(chunk)))
        return [p if isinstance(p, RowProblem) else None for p in rendered]

    def request_payloads(
        self,
        chunk: RowSource,
        first_row: int,
        positions: Sequence[int] | None,
        custom_ids: Sequence[str],
    ) -> list[bytes | RowProblem]:
        """:meth:`request_bytes` of each row :meth:`render_chunk` renders, under the
        custom_id at the same place in ``custom_ids``; a row that does not render stays
        its RowProblem.

        Column by column, each request's bytes are put together around its prompt's JSON
        string, without a params dict per row to build and serialize: the same bytes
        orjson writes for the dict (a test compares them).
        """
        columns = self._plain_columns(chunk)
        if columns is not None and positions is not None:
            columns = {name: [values[p] for p in positions] for name, values in columns.items()}
        picks = range(len(chunk)) if positions is None else positions
        if columns is None:
            rendered = self.render_chunk(chunk, first_row, positions)
        else:
            payloads = self._plain_payloads(columns, custom_ids)
            if payloads is not None:
                return payloads
            rendered = self._render_plain(columns, first_row, picks)
        return [
            p if isinstance(p, RowProblem) else self.request_bytes(custom_id, p)
            for custom_id, p in zip(custom_ids, rendered, strict=True)
        ]

    def _plain_payloads(
        self, columns: Mapping[str, Sequence[str]], custom_ids: Sequence[str]
    ) -> list[bytes | RowProblem] | None:
        """The requests of rows given as text columns, when every one of them renders (as
        :meth:`_all_fit` decides); None otherwise, for :meth:`_render_plain` to say which
        do not."""
        if not self._all_fit(columns):
            return None
        assert self._plain is not None
        prompt, system = self._plain
        count = len(custom_ids)
        texts = prompt.render_columns(columns, count)
        if self._frame is None:
            # Serialized once per renderer, on first use: the params around the prompt.
            head = orjson.dumps(self._head)[:-1] + b',"messages":[{"role":"user","content":'
            tail = orjson.dumps(self._tail)[1:-1]
            self._frame = (b',"params":' + head, (b"," + tail if tail else b"") + b"}}")
        before, after = self._frame
        dumps_text = orjson.dumps
        if system is None:
            return [
                b'{"custom_id":' + dumps_text(custom_id) + before + dumps_text(text) + b"}]" + after
                for custom_id, text in zip(custom_ids, texts, strict=True)
            ]
        systems = system.render_columns(columns, count)
        out: list[bytes | RowProblem] = []
        for custom_id, text, system_text in zip(custom_ids, texts, systems, strict=True):
            # A system prompt that renders to nothing is left out, as in _params.
            extra = b""
            if system_text.strip():
                extra = b',"system":' + dumps_text(self._system_param(system_text))
            out.append(
                b'{"custom_id":'
                + dumps_text(custom_id)
                + before
                + dumps_text(text)
                + b"}]"
                + extra
                + after
            )
        return out

    def _all_fit(self, columns: Mapping[str, Sequence[str]]) -> bool:
        """Whether every row of these columns renders (plain templates only): the prompt
        cannot be blank, and the longest row fits a batch even with every character
        escaped (an upper bound: each column's longest value, wherever it is printed)."""
        assert self._plain is not None
        if not self._plain[0].literal().strip():
            return False
        longest = {name: max(map(len, values), default=0) for name, values in columns.items()}
        bound = sum(
            len(template.literal()) + sum(longest[name] for name in template.columns())
            for template in self._plain
            if template is not None
        )
        return self._fixed_bytes + 6 * bound <= self._max_params_bytes

    def _render_plain(
        self, columns: Mapping[str, Sequence[str]], first_row: int, positions: Sequence[int]
    ) -> list[dict[str, Any] | RowProblem]:
        """The rows at ``positions`` from their text columns (``columns[name][i]`` is the
        value of the i-th of them), as :meth:`render` would give them."""
        assert self._plain is not None
        prompt, system = self._plain
        count = len(positions)
        texts = prompt.render_columns(columns, count)
        systems = system.render_columns(columns, count) if system is not None else None
        # The size check's worst case for the longest row covers every row, as in render().
        longest = max(map(len, texts), default=0)
        if systems is not None:
            longest += max(map(len, systems), default=0)
        all_fit = self._fixed_bytes + 6 * longest <= self._max_params_bytes
        out: list[dict[str, Any] | RowProblem] = []
        for i, text in enumerate(texts):
            row_index = first_row + positions[i]
            if not text.strip():
                out.append(RowProblem(row_index, None, "prompt renders to empty text"))
                continue
            system_text = systems[i] if systems is not None else None
            params = self._params(text, system_text)
            problem = None if all_fit else self._check_size(params, text, system_text, row_index)
            out.append(problem if problem is not None else params)
        return out

    def _plain_columns(self, chunk: RowSource) -> dict[str, list[str]] | None:
        """The columns the templates print, as text, when the chunk can be rendered column
        by column (plain templates, text columns without nulls); else None."""
        if self._plain is None:
            return None
        columns: dict[str, list[str]] = {}
        for name in self._column_order:
            values = chunk.texts(name)
            if values is None:
                return None
            columns[name] = values
        return columns

    def _params(self, text: str, system: str | None) -> dict[str, Any]:
        """The Messages params of a rendered prompt and system prompt (keys in one order:
        the request's bytes are compared across runs)."""
        params = {**self._head, "messages": [{"role": "user", "content": text}]}
        # A system prompt that renders to nothing is left out: the API rejects empty text.
        if system is not None and system.strip():
            params["system"] = self._system_param(system)
        params.update(self._tail)
        return params

    def _absent_columns(self, row: Mapping[str, Any], row_index: int) -> RowProblem:
        # Every absent column of the row at once, so one fix of the data covers them all.
        absent = []
        for column in self._column_order:
            value = row.get(column, _MISSING)
            if value is _MISSING or (value is None and column not in self._nullable):
                what = "missing" if value is _MISSING else "null"
                absent.append(f"column {column!r} is {what}")
        return RowProblem(row_index, None, "; ".join(absent))

    def _system_param(self, system: str) -> str | list[dict[str, Any]]:
        # A cacheable system prompt is sent as one text block marked for the prompt cache,
        # so rows sharing it pay the cache-read price for it after the first.
        if self._spec.cache_system:
            return [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        return system

    def _check_size(
        self, params: dict[str, Any], text: str, system: str | None, row_index: int
    ) -> RowProblem | None:
        # Exact size needs a serialisation; skip it when even the worst case (every char
        # escaped to 6 bytes) fits, which is every row of any realistic dataset.
        chars = len(text) + (len(system) if system else 0)
        if self._fixed_bytes + 6 * chars <= self._max_params_bytes:
            return None
        size = len(orjson.dumps(params)) + REQUEST_WRAPPER_BYTES + FRAME_BYTES
        if size <= self._spec.max_batch_bytes:
            return None
        most = self._spec.max_batch_bytes
        shown, limit = _human_bytes(size), _human_bytes(most)
        if size < most * 1.1 or shown == limit:  # not "1 MB, over the 1 MB limit": exact
            shown, limit = f"{size:,} bytes", f"{most:,}-byte"
        return RowProblem(
            row_index,
            None,
            f"request is {shown}, over the {limit} batch limit; shorten the prompt",
        )

    def request_bytes(self, custom_id: str, params: dict[str, Any]) -> bytes:
        """One request as it goes into a create body: ``{"custom_id":…,"params":…}``."""
        return orjson.dumps({"custom_id": custom_id, "params": params})

    def canonical_request(self, params: dict[str, Any]) -> bytes:
        """The params as JSON with keys sorted: equal for the same request however the
        code built it (what a re-run compares; nothing is stored, so nothing is hashed)."""
        return orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
