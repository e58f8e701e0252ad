"""What a user reads when rows fail validation, at the scale of a real dataset.

Thousands of rows failing for one reason (a template typo, a null column) read as one line
with their count and first rows, not as twenty rows one by one that hide the count and any
other cause; `estimate` lists the causes the same way.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchpipe.cli import cli
from batchpipe.emulator import Emulator
from batchpipe.emulator import model_limits as emulator_limits
from batchpipe.model_limits import MODEL_LIMITS
from batchpipe.pipeline.problems import MAX_CAUSES

PROMPT = "Classify: {{ body }}"


def invoke(tmp_path: Path, *args: str) -> Result:
    db = f"sqlite:///{tmp_path / 'state.db'}"
    return CliRunner().invoke(
        cli, ["--db", db, "--log-format", "json", *args], env={"ANTHROPIC_API_KEY": ""}
    )


def common(src: Path, *extra: str) -> list[str]:
    return [
        str(src), "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "64",
        "--id-column", "doc_id", *extra,
    ]  # fmt: skip


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_many_rows_with_one_cause_are_one_line_with_their_count_and_first_rows(
    tmp_path: Path,
) -> None:
    lines = []
    for i in range(3000):
        row: dict[str, object] = {"doc_id": f"d{i}", "body": None if i % 50 else "fine"}
        if i == 7:
            del row["doc_id"]
        lines.append(orjson.dumps(row))
    lines.insert(2, b"")  # a blank line: rows from the third on sit one line further down
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.parquet"
    ran = invoke(tmp_path, "run", *common(src, "--emulate", "-o", str(out)))
    assert ran.exit_code == 1, ran.output
    assert (
        f"{src}: 2,940 row(s) failed validation; nothing was submitted (2 causes):\n"
        "  2,939 rows: column 'body' is null (rows 2 (id 'd1'), 3 (line 4, id 'd2'), "
        "4 (line 5, id 'd3'), 5 (line 6, id 'd4'), 6 (line 7, id 'd5'), …)\n"
        "  1 row: column 'doc_id' (the id column) is missing (row 8 (line 9))\n"
        "fix them, or pass --skip-invalid"
    ) in ran.stderr
    assert not out.exists()

    estimated = invoke(tmp_path, "estimate", *common(src, "--offline"))
    assert estimated.exit_code == 0, estimated.output
    assert estimated.stdout.startswith("60 row(s) to send")
    assert (
        f"warning: {src}: 2,940 row(s) fail validation and are not priced; `run` refuses "
        "the job unless --skip-invalid:\n"
        "  2,939 rows: column 'body' is null (rows 2 (id 'd1'), 3 (line 4, id 'd2'), "
    ) in estimated.stderr
    assert "  1 row: column 'doc_id' (the id column) is missing (row 8 (line 9))" in (
        estimated.stderr
    )


def test_causes_beyond_the_kept_number_are_counted_as_other_causes(tmp_path: Path) -> None:
    """Every row absent in its own mix of five template columns: 242 distinct causes, of
    which MAX_CAUSES are listed and the rest counted, so memory does not grow with them."""
    names = ["a", "b", "c", "d", "e"]
    rows = []
    for i in range(1, 3**5):  # 0 would be the row with every column present
        row: dict[str, object] = {"doc_id": f"d{i}"}
        for n, name in enumerate(names):
            digit = i // 3**n % 3  # 0 present, 1 null, 2 missing
            if digit != 2:
                row[name] = None if digit else "x"
        rows.append(orjson.dumps(row))
    src = write_lines(tmp_path / "in.jsonl", rows)
    prompt = " ".join(f"{{{{ {name} }}}}" for name in names)
    args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"))
    args[args.index(PROMPT)] = prompt
    ran = invoke(tmp_path, "run", *args)
    assert ran.exit_code == 1, ran.output
    assert f"{src}: 242 row(s) failed validation; nothing was submitted " in ran.stderr
    causes = [line for line in ran.stderr.splitlines() if line.startswith("  ")]
    assert len(causes) == MAX_CAUSES + 1
    assert causes[0] == "  1 row: column 'a' is null (row 1 (id 'd1'))"
    other = 242 - MAX_CAUSES
    assert causes[-1].startswith(f"  {other} rows: other causes (rows 21 (id 'd21'), ")
    assert f"({MAX_CAUSES + 1} causes)" in ran.stderr


def test_a_parquet_input_names_rows_only(tmp_path: Path) -> None:
    """Parquet rows have no lines: the same rows, numbered from 1."""
    src = tmp_path / "in.parquet"
    bodies = [None] * 12 + [" "]
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": f"k{i}", "body": b} for i, b in enumerate(bodies)]),
        src,
    )
    args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"))
    args[args.index(PROMPT)] = "{{ body }}"
    ran = invoke(tmp_path, "run", *args)
    assert ran.exit_code == 1, ran.output
    assert (
        "\n  12 rows: column 'body' is null (rows 1 (id 'k0'), 2 (id 'k1'), 3 (id 'k2'), "
        "4 (id 'k3'), 5 (id 'k4'), …)\n"
        "  1 row: prompt renders to empty text (row 13 (id 'k12'))\n"
    ) in ran.stderr


@pytest.mark.parametrize("prompt", ["", "{# a note #}", "{% raw %}{% endraw %}"])
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_prompt_of_no_text_refuses_every_row_and_loses_none(
    tmp_path: Path, prompt: str, suffix: str
) -> None:
    """Before: the rows vanished (a job done with 0 rows, then an export that blamed a
    changed input), where a prompt of blanks refused every row."""
    rows = [{"doc_id": f"k{i}", "body": f"text {i}"} for i in range(3)]
    src = tmp_path / f"in.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), src)
    else:
        write_lines(src, [orjson.dumps(r) for r in rows])
    args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"))
    args[args.index(PROMPT)] = prompt
    ran = invoke(tmp_path, "run", *args)
    assert ran.exit_code == 1, ran.output
    assert f"{src}: 3 row(s) failed validation; nothing was submitted" in ran.stderr
    assert "3 rows: prompt renders to empty text (rows 1 (id 'k0'), 2 (id 'k1')" in ran.stderr
    assert not (tmp_path / "o.parquet").exists()
    assert batches_created(tmp_path) == 0


def batches_created(tmp_path: Path) -> int:
    state = tmp_path / "state.db.emulator.json"
    return int(Emulator.load(state).stats()["batches_created"]) if state.exists() else 0


def test_max_tokens_over_the_models_output_limit_is_refused_before_anything_is_stored(
    tmp_path: Path,
) -> None:
    src = write_lines(tmp_path / "in.jsonl", [b'{"doc_id": "a", "body": "x"}'])
    out = ["-o", str(tmp_path / "o.parquet")]
    args = common(src, "--emulate", *out)
    args[args.index("64")] = "100000"
    for command in ("run", "submit"):
        ran = invoke(tmp_path, command, *args)
        assert ran.exit_code == 2, ran.output
        assert (
            "--max-tokens 100000 is over claude-haiku-4-5's output limit of 64,000 tokens: "
            "every request would come back errored after the batch wait; nothing was stored "
            "or sent. Give --max-tokens 64000 or less"
        ) in ran.stderr
    assert "no jobs yet" in invoke(tmp_path, "jobs").stdout
    assert batches_created(tmp_path) == 0
    estimated = invoke(tmp_path, "estimate", *common(src, "--offline", "--max-tokens", "100000"))
    assert estimated.exit_code == 2, estimated.output
    assert "output limit of 64,000 tokens" in estimated.stderr
    # A dated snapshot has its alias' limit; the truncated-answer retry is held to it too.
    snapshot = [*args, "--model", "claude-haiku-4-5-20251001", "--max-tokens", "64000"]
    retried = invoke(tmp_path, "run", *snapshot, "--retry-truncated-max-tokens", "70000")
    assert retried.exit_code == 2, retried.output
    assert (
        "--retry-truncated-max-tokens 70000 is over claude-haiku-4-5-20251001's output limit"
    ) in retried.stderr
    assert "no jobs yet" in invoke(tmp_path, "jobs").stdout
    # At the limit the job runs.
    assert invoke(tmp_path, "run", *snapshot).exit_code == 0


def test_an_unknown_models_max_tokens_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [b'{"doc_id": "a", "body": "x"}'])
    args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"), "--model", "claude-new-9")
    submitted = invoke(tmp_path, "submit", *args)
    assert submitted.exit_code == 0, submitted.output
    assert '"event": "model.output_limit_unknown"' in submitted.stderr
    assert batches_created(tmp_path) == 1


def test_the_emulator_and_the_pipeline_share_one_table_of_limits() -> None:
    assert emulator_limits.MODEL_LIMITS is MODEL_LIMITS


def test_an_id_column_of_objects_or_arrays_is_refused_once_not_per_row(tmp_path: Path) -> None:
    """Before: every row was invalid ("column 'meta' (the id column) holds a dict"), listed
    one by one. The column can never hold ids, so it is refused once, naming it."""
    hint = (
        "; ids must be strings or whole numbers; nothing was submitted. Name a column of "
        "those with --id-column, or leave it out to key rows by their position"
    )
    rows = [orjson.dumps({"meta": {"n": i}, "tags": [i], "body": "x"}) for i in range(500)]
    src = write_lines(tmp_path / "in.jsonl", [b"", *rows])
    for column, shown in (("meta", 'an object ({"n":0})'), ("tags", "an array ([0])")):
        args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"), "--job", column)
        args[args.index("doc_id")] = column
        ran = invoke(tmp_path, "run", *args)
        assert ran.exit_code == 1, ran.output
        assert ran.stderr == (f"error: {src}, line 2: --id-column {column!r} holds {shown}{hint}\n")
    parquet = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"meta": {"n": i}, "tags": [i], "body": "x"} for i in range(5)]),
        parquet,
    )
    for column, kind in (("meta", "struct"), ("tags", "list")):
        args = common(parquet, "--offline")
        args[args.index("doc_id")] = column
        estimated = invoke(tmp_path, "estimate", *args)
        assert estimated.exit_code == 1, estimated.output
        assert estimated.stderr == (
            f"error: {parquet}: --id-column {column!r} is a {kind} column{hint}\n"
        )


def test_retry_with_max_tokens_over_the_models_limit_is_refused(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [b'{"doc_id": "a", "body": "x"}'])
    args = common(src, "--emulate", "-o", str(tmp_path / "o.parquet"), "--job", "j")
    assert invoke(tmp_path, "run", *args).exit_code == 0
    retried = invoke(tmp_path, "retry", "j", "--max-tokens", "100000")
    assert retried.exit_code == 2, retried.output
    assert "--max-tokens 100000 is over claude-haiku-4-5's output limit of 64,000" in (
        retried.stderr
    )


def test_a_job_refused_at_validation_is_fixed_under_the_name_its_advice_gives(
    tmp_path: Path,
) -> None:
    """Before: the advice was "run the same command again", but fixing a template typo
    changes the default job name, so the fixed command started a second job and the
    refused one stayed listed with 0 rows; `--job NAME` with the fixed settings failed
    ("the input has more rows than its items")."""
    src = write_lines(tmp_path / "in.jsonl", [b'{"doc_id": "a", "body": "x"}'])
    out = tmp_path / "o.parquet"
    typo = common(src, "--emulate", "-o", str(out))
    typo[typo.index(PROMPT)] = "Classify: {{ bdy }}"
    assert invoke(tmp_path, "run", *typo).exit_code == 1
    (job,) = orjson.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job["status"] == "failed"
    assert job["next_action"] == (
        "nothing was sent: fix the input or settings named in the error, then run the "
        f"command again with `--job {job['name']}`"
    )
    fixed = invoke(tmp_path, "run", *common(src, "--emulate", "-o", str(out)), "--job", job["name"])
    assert fixed.exit_code == 0, fixed.output
    (done,) = orjson.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert (done["name"], done["status"], done["rows"]) == (job["name"], "done", 1)
    assert pq.read_table(out).column("result_status").to_pylist() == ["succeeded"]


def test_row_numbers_count_from_one_and_custom_ids_from_zero_as_the_readme_says(
    tmp_path: Path,
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`{row}` there counts from 0, so row 1 of messages and `report` is `…-0-1`" in readme
    src = write_lines(
        tmp_path / "in.jsonl",
        [b'{"doc_id": "a", "body": null}', b'{"doc_id": "b", "body": "x"}'],
    )
    out = tmp_path / "o.jsonl"
    ran = invoke(tmp_path, "run", *common(src, "--emulate", "-o", str(out), "--skip-invalid"))
    assert ran.exit_code == 0, ran.output
    exported = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["result_status"] for r in exported] == ["invalid", "succeeded"]
    assert exported[1]["custom_id"].endswith("-1-1")  # the second row: row 2 in messages
    refused = invoke(tmp_path, "estimate", *common(src, "--offline"))
    assert "1 row: column 'body' is null (row 1 (id 'a'))" in refused.stderr


def test_parquet_chunks_read_by_column_give_what_jsonl_rows_give(tmp_path: Path) -> None:
    """Clean Parquet chunks are checked and rendered column by column, chunks with a null
    or a blank id row by row; either way the job sends and exports what the same rows
    as JSONL (always row by row) give."""
    rows = [{"doc_id": f"d{i}", "body": f"review {i} ✓"} for i in range(3000)]
    rows[700]["body"] = None
    rows[1800]["doc_id"] = " "
    rows[2500]["body"] = "   "  # fine: the prompt has text of its own
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=500)
    jsonl = write_lines(tmp_path / "in.jsonl", [orjson.dumps(r) for r in rows])
    exported = {}
    for src in (parquet, jsonl):
        out = tmp_path / f"out-{src.suffix[1:]}.parquet"
        args = common(src, "--emulate", "-o", str(out), "--skip-invalid", "--job", src.suffix)
        ran = invoke(tmp_path, "run", *args)
        assert ran.exit_code == 0, ran.output
        table = pq.read_table(out).to_pylist()
        exported[src.suffix] = [
            (
                r["doc_id"],
                r["result_status"],
                r["error_message"],
                r["response_text"],
                r["input_tokens"],
                r["custom_id"] and r["custom_id"].split("-", 1)[1],  # the job token differs
            )
            for r in table
        ]
    assert exported[".parquet"] == exported[".jsonl"]
    statuses = [r[1] for r in exported[".parquet"]]
    assert statuses.count("invalid") == 2
    assert statuses.count("succeeded") == 2998
