"""Input data correctness, end to end through the real CLI: big integers, id column types,
an input edited after submit, settings carried by a re-run, invalid rows' stand-in keys.

Each test runs `batchpipe` in a subprocess against the emulator served over loopback, on a
real SQLite file (PostgreSQL too where the state database's keys matter), and checks what a
user sees: exit codes, messages naming file, line and column, and the exported rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_args, run_batchpipe, write_rows

from batchpipe.dataset import Dataset
from batchpipe.db import Store
from batchpipe.errors import InputError
from batchpipe.models import JobSpec
from batchpipe.requests import RequestRenderer

PROMPT = ["--prompt", "Classify: {{ body }}", "--model", "claude-haiku-4-5", "--max-tokens", "16"]


def run_job(
    db: str, env: dict[str, str], src: Path, out: Path, *extra: str, name: str = "j"
) -> Any:
    return run_batchpipe(
        db, env, "run", str(src), "--job", name, *PROMPT, "--poll-interval", "0.1",
        "-o", str(out), *extra,
    )  # fmt: skip


# ---------------------------------------------------------------- 1. integers beyond 64 bits


BIG_IDS = [
    b'{"doc_id": 123456789012345678901234, "body": "a", "n": 98765432109876543210987654321}',
    b'{"doc_id": 123456789012345678901235, "body": "b", "n": -9223372036854775809}',
    b'{"doc_id": 7, "body": "c", "n": 1}',
]


def test_integers_beyond_64_bits_keep_every_digit(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "big.jsonl"
    src.write_bytes(b"\n".join(BIG_IDS) + b"\n")
    done = run_job(sqlite_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id")
    assert done.returncode == 0, done.stderr  # two distinct ids, not a duplicate "1e+23"
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    # Columns holding such integers are written as their digits (Parquet has no wider int).
    assert [r["doc_id"] for r in rows] == [
        "123456789012345678901234",
        "123456789012345678901235",
        "7",
    ]
    assert [r["n"] for r in rows] == ["98765432109876543210987654321", "-9223372036854775809", "1"]
    assert {r["result_status"] for r in rows} == {"succeeded"}

    jsonl = run_batchpipe(sqlite_url, cli_env, "export", "j", "-o", str(tmp_path / "out.jsonl"))
    assert jsonl.returncode == 0, jsonl.stderr
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    # JSONL keeps them numbers, exactly as written.
    assert b'"doc_id":123456789012345678901234,' in lines[0]
    assert b'"n":98765432109876543210987654321,' in lines[0]
    assert b'"n":-9223372036854775809,' in lines[1]


def test_integers_beyond_64_bits_are_read_and_prompted_exactly(tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    src.write_bytes(
        b'{"a": 123456789012345678901234, "b": [18446744073709551616], "f": 1.5e30,'
        b' "s": "12345678901234567890123", "c": 18446744073709551615}\n'
    )
    (row,) = next(Dataset(str(src)).iter_rows())
    assert row == {
        "a": 123456789012345678901234,
        "b": [18446744073709551616],
        "f": 1.5e30,  # a decimal literal stays a float
        "s": "12345678901234567890123",
        "c": 18446744073709551615,
    }
    spec = JobSpec(input=str(src), prompt="{{ a }} {{ b }}", model="m", max_tokens=1)
    params = RequestRenderer(spec).render(row, 0)
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "123456789012345678901234 [18446744073709551616]"


def test_an_integer_too_big_for_a_double_is_still_read_exactly(tmp_path: Path) -> None:
    """Before: 309 digits or more was "invalid JSON: number is infinity" (orjson reads an
    integer past 64 bits as a double); JSON has no such limit, and the README says an
    integer of any size stays an integer."""
    huge = int("9" * 309)
    src = tmp_path / "huge.jsonl"
    src.write_bytes(b'{"id": "a", "n": %d, "m": -%d}\n' % (huge, huge * 10))
    (row,) = next(Dataset(str(src)).iter_rows())
    assert row == {"id": "a", "n": huge, "m": -huge * 10}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"NaN", "invalid JSON: NaN is not a JSON value"),
        (b"1e400", "invalid JSON: 1e400 is beyond the largest float"),
        (b"}", "invalid JSON: Expecting value at column 345"),
        (b'"a\tb"', "invalid JSON: Invalid control character at column 347;"),
        (b'"a\\ud800b"', "invalid JSON: a lone surrogate (\\ud800-\\udfff) in a string"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply to read with its long integers exact"),
        (b"[" * 1000 + b"]" * 1000, "nested too deeply to read with its long integers exact"),
        (b"9" * 5000, "cannot read a number exactly (Exceeds the limit (4300 digits)"),
    ],
)
def test_a_line_with_a_huge_integer_and_a_real_fault_names_the_fault(
    tmp_path: Path, value: bytes, message: str
) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"id": "a", "n": %s, "x": %s}\n' % (b"9" * 320, value))
    with pytest.raises(InputError) as info:
        list(Dataset(str(src)).iter_rows())
    assert str(info.value).startswith(f"{src}, line 1: {message}")


# ---------------------------------------------------------------- 2. id column types


def test_ids_of_mixed_kinds_are_refused_naming_file_line_and_column(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "ids.jsonl"
    src.write_bytes(
        b'{"doc_id": 1, "body": "a"}\n\n{"doc_id": 2, "body": "b"}\n{"doc_id": 1.0, "body": "c"}\n'
    )
    refused = run_job(sqlite_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id")
    assert refused.returncode == 1
    assert f"{src}, line 4: column 'doc_id' (the id column) holds a number with a fraction" in (
        refused.stderr
    )
    assert "line 1 holds a whole number" in refused.stderr
    assert not (tmp_path / "out.parquet").exists()
    estimated = run_batchpipe(
        sqlite_url, cli_env, "estimate", str(src), *PROMPT, "--id-column", "doc_id", "--offline"
    )
    assert estimated.returncode == 1
    assert f"{src}, line 4: column 'doc_id' (the id column)" in estimated.stderr

    src.write_bytes(b'{"doc_id": "1", "body": "a"}\n{"doc_id": 1, "body": "b"}\n')
    refused = run_job(
        sqlite_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id", name="k"
    )
    assert refused.returncode == 1
    assert f"{src}, line 2: column 'doc_id' (the id column) holds a whole number" in refused.stderr
    assert "quote" in refused.stderr


def test_whole_number_ids_export_as_integers(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "ids.jsonl"
    src.write_bytes(b'{"doc_id": 1, "body": "a"}\n{"doc_id": 10, "body": "b"}\n')
    done = run_job(sqlite_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("doc_id").type == pa.int64()
    assert table.column("doc_id").to_pylist() == [1, 10]


# ---------------------------------------------------------------- 3. input changed after submit


def test_an_input_edited_after_submit(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "ch.jsonl"
    write_rows(src, 4)
    original = src.read_bytes()
    out = tmp_path / "out.parquet"
    submitted = run_batchpipe(sqlite_url, cli_env, "submit", *job_args(src, "ch", out))
    assert submitted.returncode == 0, submitted.stderr
    with src.open("ab") as fh:
        fh.write(b'{"doc_id": "late", "body": "added later"}\n')

    ticked = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "ch")
    for _ in range(50):
        if "changed since the job was ingested" in ticked.stderr:
            break
        ticked = run_batchpipe(sqlite_url, cli_env, "tick", "--job", "ch")
    assert ticked.returncode == 1
    (line,) = [x for x in ticked.stderr.splitlines() if x.startswith("error:")]
    assert line.count("job 1 (ch)") == 1, line
    # Rows were only added: the job's rows are the file's first bytes, and the cheapest way
    # on is to split the added lines off, not to pay for every row again.
    assert f"its first {len(original)} bytes are the file the job was ingested from" in line
    assert "--job NAME" not in line

    (job,) = json.loads(run_batchpipe(sqlite_url, cli_env, "status", "ch", "--json").stdout)["jobs"]
    assert job["status"] == "done"
    assert "changed since the job was ingested" in job["error"]
    assert "input changed" in job["next_action"]
    assert "`batchpipe export ch`" in job["next_action"]

    exported = run_batchpipe(sqlite_url, cli_env, "export", "ch")
    assert exported.returncode == 1
    assert exported.stderr.count("job 1 (ch)") == 1

    src.write_bytes(b'{"doc_id": "d00000", "body": "another text"}\n' + original[44:])
    edited = run_batchpipe(sqlite_url, cli_env, "export", "ch")
    assert edited.returncode == 1
    assert f"put the original back ({len(original)} bytes, sha256 " in edited.stderr

    src.write_bytes(original)
    restored = run_batchpipe(sqlite_url, cli_env, "export", "ch")
    assert restored.returncode == 0, restored.stderr
    assert pq.read_table(out).num_rows == 4
    (job,) = json.loads(run_batchpipe(sqlite_url, cli_env, "status", "ch", "--json").stdout)["jobs"]
    assert job["error"] is None
    assert job["next_action"] == f"none (output in {out})"


# ---------------------------------------------------------------- 4. a re-run keeps settings


def test_a_request_changing_rerun_keeps_the_settings_it_was_not_given(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "docs.jsonl"
    write_rows(src, 6)
    out = tmp_path / "out.parquet"
    kept = [
        "--max-cost", "5", "--result-prefix", "bp_", "--retry-truncated-max-tokens", "64",
        "--skip-invalid", "--max-failed", "2", "--max-batch-requests", "4",
    ]  # fmt: skip
    first = run_job(sqlite_url, cli_env, src, out, "--id-column", "doc_id", *kept)
    assert first.returncode == 0, first.stderr
    again = run_batchpipe(
        sqlite_url, cli_env, "run", str(src), "--job", "j", "--prompt", "Label: {{ body }}",
        "--model", "claude-haiku-4-5", "--max-tokens", "16", "--id-column", "doc_id",
        "--poll-interval", "0.1", "--yes",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    table = pq.read_table(out)
    assert "bp_result_status" in table.column_names  # the prefix was kept
    assert "result_status" not in table.column_names
    with Store.open(sqlite_url) as store:
        job = store.get_job("j")
    assert job is not None
    spec = job.spec
    assert spec["prompt"] == "Label: {{ body }}"
    assert spec["max_cost"] == 5.0
    assert spec["retry_truncated_max_tokens"] == 64
    assert spec["skip_invalid"] is True
    assert spec["max_failed"] == "2"
    assert spec["max_batch_requests"] == 4
    assert spec["output"] == str(out)


# ---------------------------------------------------------------- 5. stand-in keys


def test_an_id_spelled_like_an_invalid_rows_stand_in_is_no_duplicate(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "ids.jsonl"
    src.write_bytes(
        b'{"doc_id": "<row 1>", "body": "a"}\n'
        b'{"body": "no id"}\n'  # row index 1: invalid, without a key
        b'{"doc_id": "c", "body": "c"}\n'
    )
    assert run_batchpipe(db_url, cli_env, "db", "upgrade").returncode == 0  # PostgreSQL
    done = run_job(
        db_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id", "--skip-invalid"
    )
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["result_status"] for r in rows] == ["succeeded", "invalid", "succeeded"]
    assert [r["doc_id"] for r in rows] == ["<row 1>", None, "c"]
    report = run_batchpipe(db_url, cli_env, "report", "j", "--json")
    assert report.returncode == 0, report.stderr
    keys = {r["row"]: r["key"] for r in json.loads(report.stdout)["sample"]}
    assert keys == {1: "<row 1>", 2: None, 3: "c"}


# ---------------------------------------------------------------- 6. nanosecond times

NANOS = 1_700_000_000_123_456_789  # 2023-11-14 22:13:20.123456789 UTC


def _nanos_parquet(path: Path) -> Path:
    """Two rows with times in nanoseconds that Python's datetime cannot hold."""
    pq.write_table(
        pa.table(
            {
                "doc_id": ["a", "b"],
                "body": ["x", "y"],
                "at": pa.array([NANOS, 5], pa.timestamp("ns")),
                "utc": pa.array([NANOS, None], pa.timestamp("ns", tz="UTC")),
                "clock": pa.array([5, 86_399_999_999_999], pa.time64("ns")),
                "took": pa.array([1, 2_000], pa.duration("ns")),
            }
        ),
        path,
    )
    return path


def test_times_in_nanoseconds_reach_templates_and_jsonl_whole(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    """Before: pyarrow refused to turn them into datetimes ("Install pandas"): a template
    printing one crashed validation, and a JSONL export crashed after the batch was paid."""
    src = _nanos_parquet(tmp_path / "nanos.parquet")
    (rows,) = Dataset(str(src)).iter_rows()
    assert rows[0] == {
        "doc_id": "a",
        "body": "x",
        "at": "2023-11-14 22:13:20.123456789",
        "utc": "2023-11-14 22:13:20.123456789Z",
        "clock": "00:00:00.000000005",
        "took": 1,
    }
    assert rows[1]["utc"] is None
    assert rows[1]["clock"] == "23:59:59.999999999"
    spec = JobSpec(input=str(src), prompt="{{ at }} / {{ took }}", model="m", max_tokens=1)
    (chunk,) = Dataset(str(src)).iter_chunks()
    (params, _) = RequestRenderer(spec).render_chunk(chunk, 0)
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "2023-11-14 22:13:20.123456789 / 1"

    out = tmp_path / "out.jsonl"
    done = run_job(sqlite_url, cli_env, src, out, "--id-column", "doc_id")
    assert done.returncode == 0, done.stderr
    first = json.loads(out.read_text().splitlines()[0])
    assert (first["at"], first["took"], first["result_status"]) == (
        "2023-11-14 22:13:20.123456789",
        1,
        "succeeded",
    )
    # Parquet keeps the input's own types, nanoseconds and all.
    parquet = run_batchpipe(sqlite_url, cli_env, "export", "j", "-o", str(tmp_path / "o.parquet"))
    assert parquet.returncode == 0, parquet.stderr
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.schema.field("at").type == pa.timestamp("ns")
    assert table.column("at").cast(pa.int64()).to_pylist() == [NANOS, 5]


def test_nanosecond_times_inside_nested_values_refuse_a_jsonl_job_before_it_is_sent(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "nested.parquet"
    times = pa.array([{"t": NANOS}], pa.struct([("t", pa.timestamp("ns"))]))
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"], "s": times}), src)
    refused = run_job(sqlite_url, cli_env, src, tmp_path / "out.jsonl", "--id-column", "doc_id")
    assert refused.returncode == 1
    assert (
        f"{src}: column 's' holds times with nanoseconds inside its struct<t: timestamp[ns]> "
        "values, which cannot become Python values for a template or a JSONL output; round "
        "them to microseconds or store them as text"
    ) in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "out.jsonl").exists()
    # To Parquet the column is written as it is, never turned into Python values.
    done = run_job(
        sqlite_url, cli_env, src, tmp_path / "out.parquet", "--id-column", "doc_id", name="k"
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "out.parquet").column("s").type == times.type


def test_nanosecond_columns_of_whole_microseconds_stay_times(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    """pandas writes every timestamp in nanoseconds, nearly always whole microseconds: those
    reach templates and JSONL as the times they are, nested ones too, not as text."""
    src = tmp_path / "pandas.parquet"
    whole = 1_700_000_000_123_456_000
    pq.write_table(
        pa.table(
            {
                "doc_id": ["a"],
                "body": ["x"],
                "at": pa.array([whole], pa.timestamp("ns", tz="UTC")),
                "took": pa.array([5_000], pa.duration("ns")),
                "s": pa.array([{"t": whole}], pa.struct([("t", pa.timestamp("ns"))])),
            }
        ),
        src,
    )
    (rows,) = Dataset(str(src)).iter_rows()
    assert rows[0]["at"] == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert rows[0]["took"] == timedelta(microseconds=5)
    assert rows[0]["s"] == {"t": datetime(2023, 11, 14, 22, 13, 20, 123456)}
    spec = JobSpec(input=str(src), prompt="{{ at.year }} {{ s.t }}", model="m", max_tokens=1)
    (chunk,) = Dataset(str(src)).iter_chunks()
    (params,) = RequestRenderer(spec).render_chunk(chunk, 0)
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "2023 2023-11-14 22:13:20.123456"
    out = tmp_path / "out.jsonl"
    done = run_job(sqlite_url, cli_env, src, out, "--id-column", "doc_id")
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["at"] == "2023-11-14T22:13:20.123456+00:00"


def test_a_nanosecond_column_is_converted_alike_in_every_row(tmp_path: Path) -> None:
    """Decided per chunk, one real nanosecond in the second chunk made the column text
    there and times in the first: `{{ at.year }}` rendered one chunk and refused the other,
    and a JSONL export mixed two formats in one column."""
    whole = 1_700_000_000_123_456_000
    rows = 20_000  # three chunks of 8,192 rows; the one nanosecond is in the last
    src = tmp_path / "mixed.parquet"
    at = pa.array([whole] * (rows - 1) + [NANOS], pa.timestamp("ns"))
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(rows)], "at": at}), src)
    kinds = {type(row["at"]) for chunk in Dataset(str(src)).iter_rows() for row in chunk}
    assert kinds == {str}
    spec = JobSpec(input=str(src), prompt="{{ at }}", model="m", max_tokens=1)
    renderer = RequestRenderer(spec)
    first = next(Dataset(str(src)).iter_chunks())
    params = renderer.render_chunk(first, 0)[0]
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "2023-11-14 22:13:20.123456000"
