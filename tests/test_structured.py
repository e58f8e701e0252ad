"""Structured output end to end: schema → request → emulator answer → checked → typed columns.

Runs the real pipeline through the SDK against the loopback emulator (the Harness of
test_pipeline), on SQLite.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import env_for, run_batchpipe
from test_pipeline import Harness, spec_for, write_docs

from batchpipe import pipeline
from batchpipe.db.items import EXPORT_FIELDS
from batchpipe.errors import UsageError
from batchpipe.models import RESULT_COLUMNS
from batchpipe.structured import OutputSchema, labels_schema

# The module, not the function pipeline.export that shadows its name.
export_module = importlib.import_module("batchpipe.pipeline.export")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "sarcastic": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "extra": {"type": "object", "properties": {"note": {"type": "string"}}},
    },
    "required": ["label", "score", "rating", "sarcastic", "topics"],
    "additionalProperties": False,
}


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    with Harness.serving(sqlite_url, seed=7, processing_seconds=0.1) as h:
        yield h


@pytest.mark.parametrize("mode", ["tool", "json"])
def test_schema_fields_become_typed_columns(harness: Harness, tmp_path: Path, mode: str) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    spec = spec_for(tmp_path, src, output_schema=SCHEMA, output_mode=mode, max_tokens=400)
    job = harness.run(spec)
    assert job.status == "done"
    table = pq.read_table(tmp_path / "out.parquet")
    types = {f.name: f.type for f in table.schema}
    assert types["label"] == pa.string()
    assert types["score"] == pa.float64()
    assert types["rating"] == pa.int64()
    assert types["sarcastic"] == pa.bool_()
    assert types["topics"] == pa.list_(pa.string())
    assert types["extra"] == pa.string()  # objects are exported as JSON text
    rows = table.to_pylist()
    assert {r["result_status"] for r in rows} == {"succeeded"}
    for r in rows:
        assert r["label"] in {"positive", "negative", "mixed"}
        assert 0 <= r["score"] <= 1
        assert 1 <= r["rating"] <= 5
        assert isinstance(r["sarcastic"], bool)
        assert isinstance(r["topics"], list)
        assert len(r["topics"]) <= 3
        assert json.loads(r["response_text"])["label"] == r["label"]
        assert r["truncated"] is False
        if r["extra"] is not None:
            assert isinstance(json.loads(r["extra"]), dict)


def test_labels_make_a_single_enum_column(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 60)
    schema = labels_schema(["positive", "negative", "mixed"])
    harness.run(spec_for(tmp_path, src, output_schema=schema, max_tokens=64))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    labels = {r["label"] for r in rows}
    assert labels <= {"positive", "negative", "mixed"}
    assert len(labels) > 1  # the emulator draws labels from the prompt hash


def test_answers_that_do_not_fit_are_invalid_output(harness: Harness, tmp_path: Path) -> None:
    """A tool call cut off at max_tokens carries no label: invalid_output, with the reason."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 10)
    spec = spec_for(tmp_path, src, output_schema=SCHEMA, max_tokens=5)
    job = harness.run(spec)
    assert job.status == "done"
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 10  # nothing dropped
    for r in rows:
        assert r["result_status"] == "invalid_output"
        assert r["error_type"] == "invalid_output"
        assert "cut off at max_tokens" in r["error_message"]
        assert "'label' is a required property" in r["error_message"]
        assert r["truncated"] is True
        assert r["label"] is None
        assert r["cost_usd"] > 0  # a cut-off answer is still paid for


def test_extract_reports_why_an_answer_does_not_fit() -> None:
    schema = OutputSchema(labels_schema(["yes", "no"]), "json")
    assert schema.extract(None, '{"label": "yes"}', "end_turn") == ('{"label":"yes"}', None)
    _, reason = schema.extract(None, '{"label": "maybe"}', "end_turn")
    assert reason is not None
    assert "label: 'maybe' is not one of ['yes', 'no']" in reason
    _, reason = schema.extract(None, "not json", "end_turn")
    assert reason is not None
    assert "not JSON" in reason
    tool = OutputSchema(labels_schema(["yes", "no"]), "tool")
    _, reason = tool.extract([{"type": "text", "text": "hi"}], "hi", "end_turn")
    assert reason is not None
    assert "no record_answer tool call" in reason


def test_truncated_answers_are_retried_once_with_more_tokens(
    harness: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 12)
    spec = spec_for(
        tmp_path, src, output_schema=SCHEMA, max_tokens=5, retry_truncated_max_tokens=400
    )
    job = harness.run(spec)
    assert job.status == "done"
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["result_status"] for r in rows} == {"succeeded"}
    assert all(r["attempts"] == 2 and r["truncated"] is False for r in rows)
    assert harness.emulator.stats()["requests_received"] == 24  # each row sent exactly twice
    # The retry's cost is added to the first, cut-off attempt's.
    summary = harness_summary(harness, job)
    assert summary["truncated"] == 0
    assert summary["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))


def test_a_retry_that_is_cut_again_stays_truncated(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 6)
    spec = spec_for(tmp_path, src, output_schema=SCHEMA, max_tokens=4, retry_truncated_max_tokens=8)
    job = harness.run(spec)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert all(r["attempts"] == 2 and r["truncated"] is True for r in rows)
    assert {r["result_status"] for r in rows} == {"invalid_output"}
    assert harness_summary(harness, job)["truncated"] == 6


def test_labels_and_schema_options_are_checked() -> None:
    with pytest.raises(UsageError, match="duplicates"):
        labels_schema(["a", "a"])
    with pytest.raises(UsageError, match="must be"):
        OutputSchema({"type": "string"})


def harness_summary(harness: Harness, job: Any) -> dict[str, Any]:
    from batchpipe import pipeline

    ctx = harness.context()
    try:
        return pipeline.job_summary(ctx, job, with_batches=False)
    finally:
        ctx.close()


def _expected_results(harness: Harness, job: Any, outputs: OutputSchema | None) -> list[Any]:
    """Each row's result columns worked out one row at a time from what the store holds."""
    api_ids = {b.id: b.api_batch_id for b in harness.store.list_batches(job.id)}
    expected = []
    for row in harness.store.export_rows(job.id):
        fields = dict(zip(EXPORT_FIELDS, row, strict=True))
        stop = fields["stop_reason"]
        values = {
            **{c: fields[c] for c in RESULT_COLUMNS if c in fields},
            "result_status": fields["status"],
            "batch_id": api_ids.get(fields["batch_id"]),
            "truncated": None if stop is None else stop == "max_tokens",
        }
        if outputs is not None:
            answer = fields["response_text"] if fields["status"] == "succeeded" else None
            values.update(zip(outputs.field_names(), outputs.row_values(answer), strict=True))
        expected.append(values)
    return expected


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["plain", "schema"])
def test_exported_results_are_the_stored_items_whatever_the_paging(
    harness: Harness, tmp_path: Path, schema: dict[str, Any] | None, monkeypatch: Any
) -> None:
    """Failed, expired, truncated and answered rows: the result columns hold each item's
    stored fields, its batch's API id and ``truncated`` (None without a stop reason), in the
    Parquet and the JSONL output, whether the store's pages line up with the writer's row
    groups (the result arrays handed over whole) or not (sliced and joined)."""
    src = tmp_path / "docs.parquet"
    write_docs(src, 3000)
    harness.emulator.configure(errored_rate=0.15, expired_rate=0.1, invalid_rate=0.05)
    # max_tokens cuts some answers short (with the schema: invalid_output, no fields).
    spec = spec_for(tmp_path, src, output_schema=schema, max_tokens=30, max_attempts=1)
    job = harness.run(spec)
    assert job.status == "done"
    outputs = None if schema is None else OutputSchema(schema, spec.output_mode)
    expected = _expected_results(harness, job, outputs)
    statuses = {r["result_status"] for r in expected}
    assert {"succeeded", "errored", "expired"} <= statuses
    assert {True, False, None} <= {r["truncated"] for r in expected}
    if outputs is not None:
        assert "invalid_output" in statuses
        assert any(r["label"] is not None for r in expected)
    names = list(expected[0])
    ctx = harness.context()
    try:
        for page in (4096, 8192, 7, 2500):  # 2048-row reads, 8192-row groups
            monkeypatch.setattr(export_module, "_PAGE", page)
            for fmt in ("parquet", "jsonl"):
                out = tmp_path / f"out-{page}.{fmt}"
                pipeline.export(ctx, job, str(out))
                if fmt == "parquet":
                    got = pq.read_table(out, columns=names).to_pylist()
                else:
                    lines = [json.loads(line) for line in out.read_text().splitlines()]
                    got = [{n: line[n] for n in names} for line in lines]
                assert got == expected, (page, fmt)
    finally:
        ctx.close()


# As pydantic's model_json_schema() writes a model: an enum as a $ref to $defs, Optional[T] as
# anyOf T | null, and the same in the other spellings a hand-written schema uses.
PYDANTIC_SCHEMA: dict[str, Any] = {
    "$defs": {"Sentiment": {"enum": ["positive", "negative", "mixed"], "type": "string"}},
    "definitions": {"Rating": {"type": "integer", "minimum": 1, "maximum": 5}},
    "properties": {
        "sentiment": {"$ref": "#/$defs/Sentiment"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "note2": {"type": ["string", "null"]},
        "maybe_int": {"type": ["integer", "null"]},
        "rating": {"$ref": "#/definitions/Rating", "description": "1 to 5"},
        "score": {"oneOf": [{"type": "number"}, {"type": "null"}]},
        "flag": {"type": ["null", "boolean"]},
        "mood": {"anyOf": [{"$ref": "#/$defs/Sentiment"}, {"type": "null"}]},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 3},
        # Two non-null types: no one column type fits, so JSON text as before.
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": [
        "sentiment", "note", "note2", "maybe_int", "rating", "score", "flag", "mood", "tags",
        "either",
    ],
    "type": "object",
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_pydantic_schema_gets_typed_columns(harness: Harness, tmp_path: Path, fmt: str) -> None:
    """$refs to local definitions are typed as what they refer to, and T-or-null fields as a
    nullable T column, in the Parquet output and as plain values in the JSONL output (they
    used to be JSON text: sentiment ``"\\"positive\\""``, maybe_int ``"94"``)."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 40)
    out = tmp_path / f"out.{fmt}"
    spec = spec_for(tmp_path, src, output_schema=PYDANTIC_SCHEMA, max_tokens=400, output=str(out))
    job = harness.run(spec)
    assert job.status == "done"
    if fmt == "parquet":
        table = pq.read_table(out)
        types = {f.name: f.type for f in table.schema}
        assert types["sentiment"] == pa.string()
        assert types["note"] == pa.string()
        assert types["note2"] == pa.string()
        assert types["maybe_int"] == pa.int64()
        assert types["rating"] == pa.int64()
        assert types["score"] == pa.float64()
        assert types["flag"] == pa.bool_()
        assert types["mood"] == pa.string()
        assert types["tags"] == pa.list_(pa.string())
        assert types["either"] == pa.string()
        rows = table.to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["result_status"] for r in rows} == {"succeeded"}
    for r in rows:
        answer = json.loads(r["response_text"])
        assert r["sentiment"] in {"positive", "negative", "mixed"}
        assert r["mood"] in {"positive", "negative", "mixed"}
        assert 1 <= r["rating"] <= 5
        for name in ("note", "note2", "maybe_int", "score", "flag", "tags"):
            assert r[name] == answer[name]  # the value itself, null as null
        assert r["note"] is None or isinstance(r["note"], str)
        assert r["maybe_int"] is None or type(r["maybe_int"]) is int
        assert r["flag"] is None or isinstance(r["flag"], bool)
        assert r["either"] == json.dumps(answer["either"])  # JSON text, as before
    # The emulator leaves a nullable field empty now and then: those are nulls, not "null".
    assert any(r["maybe_int"] is None for r in rows)
    assert any(r["maybe_int"] is not None for r in rows)


def test_ambiguous_fields_stay_json_text() -> None:
    """Only a type that every valid answer has becomes a typed column; the rest stay JSON."""
    schema: dict[str, Any] = {
        "$defs": {
            "A": {"$ref": "#/$defs/B"},  # a cycle of refs
            "B": {"$ref": "#/$defs/A"},
            "Word": {"type": "string"},
        },
        "type": "object",
        "properties": {
            "cycle": {"$ref": "#/$defs/A"},
            "two": {"type": ["string", "integer", "null"]},
            "nulls": {"anyOf": [{"type": "null"}, {"type": "null"}]},
            "three": {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            "word": {"$ref": "#/$defs/Word"},
            "words": {"type": "array", "items": {"$ref": "#/$defs/Word"}},
            "maybe_words": {
                "anyOf": [{"type": "null"}, {"items": {"type": "string"}, "type": "array"}]
            },
            "obj": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "escaped": {"$ref": "#/$defs/W~1x%20y"},
        },
    }
    schema["$defs"]["W/x y"] = {"type": "boolean"}
    columns = dict(OutputSchema(schema).columns())
    assert columns == {
        "cycle": "string",
        "two": "string",
        "nulls": "string",
        "three": "string",
        "word": "string",
        "words": "list<string>",
        "maybe_words": "list<string>",
        "obj": "string",
        "escaped": "bool",
    }
    # The string columns above but word hold JSON text.
    values = OutputSchema(schema).row_values(
        '{"cycle": 1, "two": 2, "three": "x", "word": "w", "obj": {"a": 1}, "escaped": true}'
    )
    got = dict(zip(OutputSchema(schema).field_names(), values, strict=True))
    assert got["cycle"] == "1"
    assert got["two"] == "2"
    assert got["three"] == '"x"'
    assert got["word"] == "w"
    assert got["obj"] == '{"a":1}'
    assert got["escaped"] is True


INT64_MAX = 2**63 - 1
# The emulator answers the least integer a field allows: here one just past 64 bits.
WIDE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "big": {"type": "integer", "minimum": 10_000_000_000_000_000_000},
        "label": {"type": "string", "enum": ["yes", "no"]},
    },
    "required": ["big", "label"],
}


@pytest.mark.parametrize("mode", ["tool", "json"])
def test_an_integer_wider_than_64_bits_is_invalid_output(
    harness: Harness, tmp_path: Path, mode: str
) -> None:
    """JSON Schema's integer has no bound, an int64 column has: such an answer is
    invalid_output, saying which field and why, its text kept; the export is written (it
    used to fail on every try with "Python int too large to convert to C long")."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 8)
    spec = spec_for(tmp_path, src, output_schema=WIDE_SCHEMA, output_mode=mode, max_tokens=200)
    job = harness.run(spec)
    assert job.status == "done"
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("big").type == pa.int64()
    rows = table.to_pylist()
    assert len(rows) == 8
    for r in rows:
        assert r["result_status"] == "invalid_output"
        assert r["error_type"] == "invalid_output"
        assert r["error_message"].startswith(
            "answer does not fit its int64 column: big: 10000000000000000000 is outside the "
            "signed 64-bit range"
        )
        assert json.loads(r["response_text"])["big"] == 10_000_000_000_000_000_000
        assert r["big"] is None
        assert r["label"] is None
        assert r["cost_usd"] > 0  # answered, so paid for


def test_extract_refuses_integers_an_int64_column_cannot_hold() -> None:
    schema = OutputSchema(
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "ns": {"type": "array", "items": {"type": ["integer", "null"]}},
                "nested": {"type": "object"},  # JSON text: any size is fine
            },
        },
        "json",
    )
    fits = f'{{"n": {INT64_MAX}, "ns": [{-(2**63)}, null, 3.0], "nested": {{"x": 1e30}}}}'
    stored, reason = schema.extract(None, fits, "end_turn")
    assert reason is None
    assert schema.row_values(stored) == (INT64_MAX, [-(2**63), None, 3], '{"x":1e+30}')
    for answer, where, shown in [
        (f'{{"n": {INT64_MAX + 1}}}', "n", str(INT64_MAX + 1)),
        ('{"n": -9223372036854775809}', "n", "-9.223372036854776e+18"),
        # The tester's answer: orjson reads integers past 64 bits as floats.
        ('{"n": 10000000000000000000000}', "n", "1e+22"),
        (f'{{"n": 1, "ns": [1, {2**64 - 1}]}}', "ns/1", str(2**64 - 1)),
    ]:
        _, reason = schema.extract(None, answer, "end_turn")
        assert reason == (
            f"answer does not fit its int64 column: {where}: {shown} is outside the signed "
            "64-bit range (-9223372036854775808 to 9223372036854775807)"
        ), answer


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_old_wide_answer_is_exported_with_its_cell_empty(
    harness: Harness, tmp_path: Path, sqlite_url: str, fmt: str
) -> None:
    """A database written before answers were checked against int64 holds such an answer
    as succeeded: the export writes the file (that cell empty, the answer in response_text)
    and warns, instead of a traceback on every export and tick."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 6)
    schema = {
        "type": "object",
        "properties": {
            "big": {"type": "integer"},
            "many": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["big", "many"],
    }
    job = harness.run(spec_for(tmp_path, src, output_schema=schema, max_tokens=200))
    assert job.status == "done"
    wide = {1: '{"big":10000000000000000037,"many":[1]}', 2: '{"big":1e22,"many":[2,1e22]}'}
    db_path = sqlite_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        for row, answer in wide.items():
            conn.execute(
                "UPDATE items SET response_text = ? WHERE job_id = ? AND row_index = ?",
                (answer, job.id, row),
            )
    out = tmp_path / f"again.{fmt}"
    done = run_batchpipe(sqlite_url, env_for(harness.server.url), "export", "job", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    warnings = [
        json.loads(line) for line in done.stderr.splitlines() if "export.values_left_empty" in line
    ]
    assert [(w["field"], w["rows"]) for w in warnings] == [("big", 2), ("many", 1)]
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["result_status"] for r in rows] == ["succeeded"] * 6
    for i, r in enumerate(rows):
        if i in wide:
            assert r["response_text"] == wide[i]
            assert r["big"] is None
        else:
            assert type(r["big"]) is int
    assert rows[1]["many"] == [1]
    assert rows[2]["many"] is None
