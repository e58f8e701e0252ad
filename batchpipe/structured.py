"""Structured output: a JSON Schema (or a list of labels) in, typed answer columns out.

A job may carry an output schema. Each request then asks for it in one of two ways:

- ``tool`` (default): one tool, ``record_answer``, whose ``input_schema`` is the schema, forced
  with ``tool_choice = {"type": "tool", "name": "record_answer"}``; the answer is the tool
  call's ``input``.
- ``json``: the API's JSON output format, ``output_config.format = {"type": "json_schema",
  "schema": …}``; the answer is the text block, parsed as JSON.

Every answer is validated against the schema (``jsonschema``, draft 2020-12). A valid answer is
stored as compact JSON in ``response_text``; one that does not fit (no tool call, not JSON,
a missing field, a label outside the enum, an answer cut off at ``max_tokens``, an integer
field outside its int64 column's range) becomes ``invalid_output`` with the reason in
``error_message`` and the raw answer kept.

Each top-level property becomes one export column named after it, typed by the schema:
string and an enum of strings → ``string``, integer → ``int64``, number → ``float64``,
boolean → ``bool``, an array of one of those → a list column (``list<string>`` …). A field
that may also be null (``"type": [T, "null"]``, or ``anyOf``/``oneOf`` of one schema and
``{"type": "null"}``, as pydantic writes ``Optional[T]``) is typed as T, null where the
answer is; a local ``$ref`` (``#/$defs/…``, ``#/definitions/…``) is typed as what it points
to. Anything else (objects, mixed arrays, unions of two types, a cycle of refs) → a
``string`` column holding each value's JSON text. The JSONL export writes the same values
(a typed field as its JSON value, the rest as JSON text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema
import orjson

from batchpipe.errors import UsageError

TOOL_NAME = "record_answer"
LABEL_FIELD = "label"
_SCALAR_TYPES = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}
_MAX_REASON = 300
# An int64 column's range; JSON Schema's "integer" has none.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT64_KINDS = frozenset({"int64", "list<int64>"})
_FLOAT_LOW, _FLOAT_HIGH = float(_INT64_MIN), float(2**63)


def labels_schema(labels: Sequence[str]) -> dict[str, Any]:
    """The schema for ``--labels a,b,c``: one required field ``label`` from that enum."""
    clean = [label.strip() for label in labels if label.strip()]
    if not clean:
        raise UsageError("--labels needs at least one label, e.g. --labels positive,negative")
    if len(set(clean)) != len(clean):
        raise UsageError(f"--labels has duplicates: {', '.join(clean)}")
    return {
        "type": "object",
        "properties": {LABEL_FIELD: {"type": "string", "enum": clean}},
        "required": [LABEL_FIELD],
        "additionalProperties": False,
    }


def read_schema_file(path: Path, what: str) -> dict[str, Any]:
    """The output schema in the JSON file ``path``, checked (:func:`check_schema`);
    UsageError naming ``what`` gave the path (``--output-schema x.json``, a job file …)."""
    try:
        schema = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    check_schema(schema)
    return schema


def check_schema(schema: dict[str, Any]) -> None:
    """UsageError unless ``schema`` is a valid JSON Schema for an object with properties."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UsageError(f"output schema is not a valid JSON Schema: {exc.message}") from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise UsageError(
            'output schema must be {"type": "object", "properties": {...}}: each property '
            "becomes an output column"
        )
    if not schema["properties"]:
        raise UsageError("output schema has no properties; name at least one field")
    for ref in _refs(schema):
        # jsonschema resolves refs only when an answer reaches them: a broken one would fail
        # collect, after the batch was paid for.
        if _local_target(schema, ref) is None:
            raise UsageError(
                f"output schema refers to {ref!r}, which is not in the schema: only refs into "
                'the schema itself are followed (e.g. "#/$defs/Name" with the definition '
                "under $defs)"
            )


# Keywords whose values are data, not schemas: a "$ref" key in them is no reference.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _refs(schema: Any) -> list[str]:
    """Every ``$ref`` in ``schema``, at any depth, outside the data of enum, const etc."""
    found: list[str] = []
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                found.append(ref)
            pending += [v for k, v in node.items() if k not in _DATA_KEYWORDS]
        elif isinstance(node, list):
            pending += node
    return found


def _column_type(prop: Any, root: dict[str, Any], seen: frozenset[str] = frozenset()) -> str:
    """The export type of a field whose schema is ``prop`` (``root``: the whole schema, which
    local ``$ref``s point into); ``json`` unless every valid value has one type.

    Every keyword of a schema applies to the value, so the first that settles the type
    decides: ``type`` (a nullable ``[T, "null"]`` is typed as T), an all-string ``enum``,
    a local ``$ref`` (typed as its target), ``anyOf``/``oneOf`` of one schema and
    ``{"type": "null"}`` (as pydantic writes ``Optional[T]``). ``seen`` holds the refs
    followed so far, so a cycle of refs ends as ``json`` rather than recursing forever.
    """
    if not isinstance(prop, dict):
        return "json"
    kind = prop.get("type")
    if isinstance(kind, list):
        # ["integer", "null"]: null is just a missing cell; two real types have no one column.
        real = [t for t in kind if t != "null"]
        kind = real[0] if len(real) == 1 else None
    if kind is None and "enum" in prop:
        values = [v for v in prop["enum"] if v is not None]
        kind = "string" if values and all(isinstance(v, str) for v in values) else None
    if isinstance(kind, str) and kind in _SCALAR_TYPES:
        return _SCALAR_TYPES[kind]
    if kind == "array":
        inner = _column_type(prop.get("items"), root, seen)
        if inner in _SCALAR_TYPES.values():
            return f"list<{inner}>"
        return "json"
    if kind is not None:
        return "json"  # an object, or null alone
    ref = prop.get("$ref")
    if isinstance(ref, str):
        target = _local_target(root, ref)
        if target is not None and ref not in seen:
            return _column_type(target, root, seen | {ref})
    for key in ("anyOf", "oneOf"):
        branches = prop.get(key)
        if isinstance(branches, list):
            real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            if len(real) == 1 and len(branches) == 2:
                return _column_type(real[0], root, seen)
    return "json"


def _local_target(root: dict[str, Any], ref: str) -> Any:
    """The subschema a ``$ref`` into this document points at (``#/$defs/Name``, a JSON
    pointer in a URI fragment); None for a ref elsewhere or to nothing."""
    if not ref.startswith("#/"):
        return None  # another document (or a bare "#", the whole object): not followed
    target: Any = root
    for part in ref[2:].split("/"):
        key = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
        else:
            return None
    return target


class OutputSchema:
    """One job's output schema: the request params that ask for it, validation, columns."""

    def __init__(self, schema: dict[str, Any], mode: str = "tool") -> None:
        check_schema(schema)
        if mode not in {"tool", "json"}:
            raise UsageError(f"output mode must be tool or json, not {mode!r}")
        self.schema = schema
        self.mode = mode
        self._validator = jsonschema.Draft202012Validator(schema)
        self._fields: list[tuple[str, str]] = [
            (name, _column_type(prop, schema)) for name, prop in schema["properties"].items()
        ]

    def request_params(self) -> dict[str, Any]:
        """What every request adds to ask for this schema."""
        if self.mode == "json":
            return {"output_config": {"format": {"type": "json_schema", "schema": self.schema}}}
        tool = {
            "name": TOOL_NAME,
            "description": "Record the answer for this input. Always call this tool.",
            "input_schema": self.schema,
        }
        return {"tools": [tool], "tool_choice": {"type": "tool", "name": TOOL_NAME}}

    def columns(self) -> list[tuple[str, str]]:
        """``(name, export type)`` per field; ``json`` fields are exported as JSON strings."""
        return [(name, "string" if kind == "json" else kind) for name, kind in self._fields]

    def field_names(self) -> list[str]:
        """The answer's top-level fields, in schema order."""
        return [name for name, _ in self._fields]

    def extract(
        self, content: list[dict[str, Any]] | None, text: str | None, stop_reason: str | None
    ) -> tuple[str | None, str | None]:
        """``(answer as JSON text, None)`` if it fits the schema, else ``(raw answer, reason)``."""
        raw: Any = None
        reason: str | None = None
        if self.mode == "tool":
            calls = [
                b
                for b in content or []
                if b.get("type") == "tool_use" and b.get("name") == TOOL_NAME
            ]
            if calls:
                raw = calls[0].get("input")
            else:
                reason = f"the answer has no {TOOL_NAME} tool call"
        elif text is None:
            reason = "the answer has no text"
        else:
            try:
                raw = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                reason = f"the answer is not JSON ({exc})"
        what = "the output schema"
        if reason is None:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(raw))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path)
                reason = f"{where + ': ' if where else ''}{error.message}"
            else:
                # Valid, but JSON Schema's integers have no bound and the column has.
                reason = self._too_wide(raw)
                what = "its int64 column"
        stored = text if raw is None else orjson.dumps(raw).decode()
        if reason is None:
            return stored, None
        if stop_reason == "max_tokens":
            reason = f"cut off at max_tokens before the answer was complete ({reason})"
        return stored, f"answer does not fit {what}: {reason}"[:_MAX_REASON]

    def _too_wide(self, answer: Any) -> str | None:
        """Why a valid answer's integer field does not fit its int64 column, if one does not."""
        if not isinstance(answer, dict):
            return None
        for name, kind in self._fields:
            value = answer.get(name)
            if value is None or kind not in _INT64_KINDS:
                continue
            listed = kind == "list<int64>" and isinstance(value, list)
            items = list(enumerate(value)) if listed else [(None, value)]
            for index, item in items:
                if item is not None and _as_int64(item) is None:
                    where = name if index is None else f"{name}/{index}"
                    return (
                        f"{where}: {orjson.dumps(item).decode()} is outside the signed 64-bit "
                        f"range ({_INT64_MIN} to {_INT64_MAX})"
                    )
        return None

    def row_values(
        self, answer: str | None, left_empty: dict[str, int] | None = None
    ) -> tuple[Any, ...]:
        """The typed column values of a stored valid answer (Nones when there is none).

        An integer its int64 column cannot hold (only in answers collected before
        :meth:`extract` refused them) leaves that cell None, counted per field in
        ``left_empty``: the answer is still in ``response_text``, and the export must not
        fail on it each time it is tried.
        """
        if answer is None:
            return (None,) * len(self._fields)
        try:
            obj = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return (None,) * len(self._fields)
        if not isinstance(obj, dict):
            return (None,) * len(self._fields)
        out: list[Any] = []
        for name, kind in self._fields:
            value = obj.get(name)
            if value is None:
                out.append(None)
            elif kind == "json":
                out.append(orjson.dumps(value).decode())
            elif kind == "float64" and isinstance(value, int | float):
                out.append(float(value))
            elif kind in _INT64_KINDS:
                typed = _int64_cell(value, kind)
                if typed is None and left_empty is not None:
                    left_empty[name] = left_empty.get(name, 0) + 1
                out.append(typed)
            else:
                out.append(value)
        return tuple(out)


def _as_int64(value: Any) -> int | None:
    """``value`` as an int if it is a whole number an int64 holds, else None.

    orjson reads integers past 64 bits as floats (10000000000000000000000 arrives as 1e22),
    and rounds the few just below -2**63 to the float -2**63, while -2**63 written as an
    integer arrives as an int: so a float must lie strictly inside the range.
    """
    if type(value) is float:
        return int(value) if _FLOAT_LOW < value < _FLOAT_HIGH and value.is_integer() else None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    return None


def _int64_cell(value: Any, kind: str) -> Any:
    """A non-null answer value as its int64 or list<int64> cell; None if it does not fit."""
    if kind == "int64":
        return _as_int64(value)
    if not isinstance(value, list):
        return None
    items = [None if item is None else _as_int64(item) for item in value]
    fits = all(got is not None or item is None for got, item in zip(items, value, strict=True))
    return items if fits else None
