"""The command line as a user meets it: help, docs, bad input, and a whole run with --emulate."""

from __future__ import annotations

import bz2
import gzip
import json
import re
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchpipe.cli import cli
from batchpipe.db import Store
from batchpipe.emulator import Emulator, EmulatorServer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Classify: {{ body }}"


def invoke(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    db = f"sqlite:///{tmp_path / 'state.db'}"
    return CliRunner().invoke(
        cli,
        ["--db", db, "--log-format", "json", *args],
        env={"ANTHROPIC_API_KEY": "", **(env or {})},
    )


def run_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run", str(src), "--emulate", "--prompt", PROMPT, "--model", "claude-haiku-4-5",
        "--max-tokens", "64", "--id-column", "doc_id", "-o", str(out), *extra,
    ]  # fmt: skip


def with_prompt(args: list[str], prompt: str) -> list[str]:
    """``args`` (from run_args) with another --prompt."""
    changed = list(args)
    changed[changed.index(PROMPT)] = prompt
    return changed


def batches_created(tmp_path: Path) -> int:
    state = tmp_path / "state.db.emulator.json"
    return int(Emulator.load(state).stats()["batches_created"]) if state.exists() else 0


def all_commands() -> list[str]:
    names = []
    for name, command in cli.commands.items():
        sub = getattr(command, "commands", None)
        names += [f"{name} {s}" for s in sub] if sub else [name]
    return sorted(names)


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in all_commands():
        result = CliRunner().invoke(cli, [*name.split(), "--help"])
        assert result.exit_code == 0, name
        assert len(result.output.splitlines()) > 3, name
        assert f"batchpipe {name}" in readme, f"`batchpipe {name}` is not documented in README.md"


def test_readme_set_up_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^\./(scripts/\w+)", readme, re.M):
        assert (ROOT / script).stat().st_mode & 0o111, script
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def rows(n: int) -> list[dict[str, object]]:
    return [{"doc_id": f"d{i}", "body": f"text {i}"} for i in range(n)]


def test_run_with_emulate_writes_joined_output(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(30))
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out, "--max-batch-requests", "10"))
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("doc_id").to_pylist() == [f"d{i}" for i in range(30)]
    assert set(table.column("result_status").to_pylist()) == {"succeeded"}
    assert batches_created(tmp_path) == 3
    assert "finished job 1 (in-" in result.stderr
    assert "  rows: 30 succeeded\n" in result.stderr  # readable, not a Python dict
    assert "{" not in result.stderr.split("finished job 1", 1)[1]

    status = invoke(tmp_path, "status", "--json")
    assert status.exit_code == 0
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["status"] == "done"
    assert job["counts"]["succeeded"] == 30
    assert len(job["batches"]) == 3
    # Tokens are each row's last attempt; the cost counts every attempt: the text says so.
    text = invoke(tmp_path, "status").stdout
    assert "tokens (last attempts) in " in text
    assert re.search(r"cost \$\d+\.\d{4} \(every attempt, batch prices, table ", text), text


BAD_INPUTS = {
    "malformed JSON line": (
        b'{"doc_id": "a", "body": "x"}\n{"doc_id": "b", "body": \n{"doc_id": "c", "body": "z"}\n',
        r"in\.jsonl, line 2: invalid JSON",
    ),
    "not UTF-8": (b'{"doc_id": "a", "body": "caf\xe9"}\n', r"in\.jsonl, line 1: not valid UTF-8"),
    "missing template column": (
        b'{"doc_id": "a", "text": "x"}\n',
        r"the --prompt template uses column\(s\) 'body', which the input does not have",
    ),
    "null template value": (
        b'{"doc_id": "a", "body": "x"}\n{"doc_id": "b", "body": null}\n',
        r"1 row: column 'body' is null \(row 2 \(id 'b'\)\)",
    ),
    "duplicate ids": (
        b'{"doc_id": "a", "body": "x"}\n{"doc_id": "a", "body": "y"}\n',
        r"duplicates: 'a' in rows 1, 2; nothing was submitted\. Make the column unique, or "
        r"run without --id-column",
    ),
    "gzip without .gz": (
        gzip.compress(b'{"doc_id": "a", "body": "x"}\n'),
        r"in\.jsonl, line 1: this looks gzip-compressed; name the file \*\.jsonl\.gz",
    ),
    "result column clash": (b'{"doc_id": "a", "body": "x", "custom_id": 1}\n', r"custom_id"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(tmp_path: Path, case: str) -> None:
    content, message = BAD_INPUTS[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out))
    assert result.exit_code == 1, result.output
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert batches_created(tmp_path) == 0


def _lines(n: int) -> bytes:
    return b"".join(b'{"doc_id": "d%d", "body": "text %d"}\n' % (i, i) for i in range(n))


CORRUPT_COMPRESSED = {
    "gzip cut short": ("gz", gzip.compress(_lines(3))[:30], ": Truncated compressed stream"),
    "gzip cut after many lines": (
        "gz",
        gzip.compress(_lines(200_000))[:400_000],
        r" after [\d,]+ bytes of its text: Truncated compressed stream",
    ),
    "bz2 garbage": ("bz2", bz2.compress(_lines(3))[:12] + b"\x00" * 64, ": bz2 decompress"),
}


@pytest.mark.parametrize("case", CORRUPT_COMPRESSED)
def test_a_corrupt_compressed_input_fails_its_job_once_with_the_files_name(
    tmp_path: Path, case: str
) -> None:
    """Before: a traceback (pyarrow's bare OSError), and the job stayed running with 0
    rows, so every tick printed the traceback again."""
    suffix, content, message = CORRUPT_COMPRESSED[case]
    src = tmp_path / f"in.jsonl.{suffix}"
    src.write_bytes(content)
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out))
    assert result.exit_code == 1, result.output
    said = f"cannot read {re.escape(str(src))}{message}"
    assert re.search(said + r".*; is the compressed file whole and uncorrupted\?", result.stderr)
    assert "Traceback" not in result.output
    assert not out.exists()
    assert batches_created(tmp_path) == 0
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job["status"] == "failed"
    tick = invoke(tmp_path, "tick", "--emulate")
    assert tick.exit_code == 0, tick.output
    assert "Traceback" not in tick.output


@pytest.mark.parametrize("kind", ["empty JSONL", "blank JSONL", "empty Parquet"])
def test_an_input_without_rows_is_a_done_job_with_an_empty_output(
    tmp_path: Path, kind: str
) -> None:
    """A scheduled run over an empty partition succeeds, and downstream finds its file."""
    if kind == "empty Parquet":
        src = tmp_path / "in.parquet"
        empty = pa.array([], pa.string())
        pq.write_table(pa.table({"doc_id": empty, "body": empty}), src)
    else:
        src = tmp_path / "in.jsonl"
        src.write_bytes(b"" if kind == "empty JSONL" else b"\n  \n")
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out))
    assert result.exit_code == 0, result.output
    assert "job.empty_input" in result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 0
    inputs = ["doc_id", "body"] if kind == "empty Parquet" else []  # JSONL: no row, no column
    assert table.column_names[: len(inputs) + 2] == [*inputs, "custom_id", "result_status"]
    assert batches_created(tmp_path) == 0
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert (job["status"], job["rows"]) == ("done", 0)
    again = invoke(tmp_path, *run_args(src, out))  # the same command: nothing to do
    assert again.exit_code == 0, again.output
    assert batches_created(tmp_path) == 0


def test_an_empty_input_filled_later_is_sent_by_the_same_command(tmp_path: Path) -> None:
    """A partition looked at before it was written: the job had nothing to mislabel."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"")
    out = tmp_path / "out.parquet"
    assert invoke(tmp_path, *run_args(src, out)).exit_code == 0
    write_jsonl(src, rows(3))
    filled = invoke(tmp_path, *run_args(src, out))
    assert filled.exit_code == 0, filled.output
    table = pq.read_table(out)
    assert table.column("result_status").to_pylist() == ["succeeded"] * 3
    assert batches_created(tmp_path) == 1
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert (job["status"], job["rows"]) == ("done", 3)


def test_a_database_in_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'no-such-folder' / 'state.db'}"
    result = CliRunner().invoke(cli, ["--db", db, "jobs"])
    assert result.exit_code == 2
    assert "no-such-folder does not exist; create it or point --db" in result.stderr


def test_root_options_are_accepted_after_the_command_name(tmp_path: Path) -> None:
    """`batchpipe run … --db URL` is how a cron line gets written; click said "No such
    option '--db'. Did you mean '--job'?"."""
    state = tmp_path / "elsewhere.db"
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = [*run_args(src, tmp_path / "out.jsonl"), "--db", f"sqlite:///{state}"]
    ran = CliRunner().invoke(
        cli,
        ["--log-format", "json", *args, "--log-format", "console"],
        env={"ANTHROPIC_API_KEY": ""},
    )
    assert ran.exit_code == 0, ran.output
    assert state.exists()
    assert not (tmp_path / "batchpipe.db").exists()
    # --log-format after `run` wins over the one before it: console lines, not JSON.
    assert "job.finished" in ran.stderr
    assert '"event": "job.finished"' not in ran.stderr
    jobs = CliRunner().invoke(cli, ["status", "--json", "--db", f"sqlite:///{state}"])
    assert jobs.exit_code == 0, jobs.output
    assert [j["status"] for j in json.loads(jobs.stdout)["jobs"]] == ["done"]
    upgraded = CliRunner().invoke(cli, ["db", "upgrade", "--db", f"sqlite:///{state}"])
    assert upgraded.exit_code == 0, upgraded.output
    # Before and after the name, the later one counts, as for any option given twice.
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    later = CliRunner().invoke(cli, ["--db", missing, "jobs", "--db", f"sqlite:///{state}"])
    assert later.exit_code == 0, later.output
    assert not (tmp_path / "nope.db").exists()
    # --debug after the name shows the traceback of an error, as before it.
    debug = CliRunner().invoke(cli, ["export", "nope", "--db", f"sqlite:///{state}", "--debug"])
    assert debug.exit_code == 2
    assert "Traceback" in debug.stderr
    # The emulator keeps no state database, so it takes no --db.
    emulator = CliRunner().invoke(cli, ["emulator", "--help"])
    assert "--db" not in emulator.stdout
    assert "--debug" in emulator.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status"], ["status", "--json"], ["jobs"], ["report", "j"], ["export", "j"],
        ["cancel", "j"], ["retry", "j"], ["resume", "j"],
    ],
)  # fmt: skip
def test_commands_on_existing_jobs_do_not_create_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default database is batchpipe.db in the working folder
    result = CliRunner().invoke(cli, args, env={"BATCHPIPE_DATABASE_URL": None})
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: no database at {tmp_path / 'batchpipe.db'}; run `batchpipe run` (or "
        "`batchpipe submit`) first, or point --db (BATCHPIPE_DATABASE_URL) at the database "
        "your jobs are in\n"
    )
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_unreadable_path_names_it(tmp_path: Path) -> None:
    result = invoke(tmp_path, *run_args(tmp_path / "nope.parquet", tmp_path / "out.parquet"))
    assert result.exit_code == 1
    assert "nope.parquet" in result.stderr
    assert batches_created(tmp_path) == 0


def test_an_output_that_cannot_be_written_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    (tmp_path / "a-file").write_text("not a folder")
    result = invoke(tmp_path, *run_args(src, tmp_path / "a-file" / "out.parquet"))
    assert result.exit_code == 2, result.output
    assert re.search(r"cannot write .*a-file/out\.parquet", result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert batches_created(tmp_path) == 0
    assert json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"] == []


def test_a_resumed_job_checks_the_output_it_was_given(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    first = run_args(src, tmp_path / "outdir" / "out.parquet")
    assert invoke(tmp_path, "submit", *first[1:]).exit_code == 0
    (tmp_path / "outdir").rmdir()
    (tmp_path / "outdir").write_text("now a file")
    # Without -o the job keeps its output, and that is what is checked.
    without_output = first[: first.index("-o")]
    result = invoke(tmp_path, *without_output)
    assert result.exit_code == 2, result.output
    assert re.search(r"cannot write .*outdir/out\.parquet", result.stderr), result.stderr
    # A new -o moves the job's output; the run finishes there, with nothing sent twice.
    result = invoke(tmp_path, *without_output, "-o", str(tmp_path / "good.parquet"))
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "good.parquet").num_rows == 5
    assert batches_created(tmp_path) == 1


@pytest.mark.parametrize("name", ["out.csv", "out.jsonl.gz", "out"])
def test_an_output_of_no_known_format_is_refused_before_anything_is_sent(
    tmp_path: Path, name: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    result = invoke(tmp_path, *run_args(src, tmp_path / name))
    assert result.exit_code == 2, result.output
    assert "end it in one of .parquet, .pq, .jsonl, .ndjson" in result.stderr
    assert batches_created(tmp_path) == 0
    assert not (tmp_path / name).exists()


def test_an_ndjson_output_is_jsonl(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    result = invoke(tmp_path, *run_args(src, tmp_path / "out.ndjson"))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "out.ndjson").read_text().splitlines()]
    assert [r["doc_id"] for r in lines] == ["d0", "d1", "d2"]


def test_an_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    before = src.read_bytes()
    result = invoke(tmp_path, *run_args(src, src))
    assert result.exit_code == 2, result.output
    assert "it is the job's input" in result.stderr
    assert src.read_bytes() == before
    assert batches_created(tmp_path) == 0


def test_an_export_that_fails_says_where_the_answers_are(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    assert invoke(tmp_path, *run_args(src, tmp_path / "out.parquet")).exit_code == 0
    (tmp_path / "a-file").write_text("not a folder")
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    result = invoke(tmp_path, "export", job["name"], "-o", str(tmp_path / "a-file" / "o.parquet"))
    assert result.exit_code == 2, result.output
    assert f"write them elsewhere with `batchpipe export {job['name']} -o PATH`" in result.stderr
    assert batches_created(tmp_path) == 1


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("out.csv", "out.parquet"), ("out.jsonl.gz", "out.jsonl"), ("out", "out.parquet")],
)
def test_an_export_to_no_known_format_suggests_a_command_that_works(
    tmp_path: Path, name: str, suggested: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    assert invoke(tmp_path, *run_args(src, tmp_path / "out.parquet"), "--job", "j").exit_code == 0
    refused = invoke(tmp_path, "export", "j", "-o", str(tmp_path / name))
    assert refused.exit_code == 2, refused.output
    assert "end it in one of .parquet, .pq, .jsonl, .ndjson" in refused.stderr
    hint = re.search(r"e\.g\. `batchpipe export j -o (\S+)`", refused.stderr)
    assert hint is not None, refused.stderr
    assert hint.group(1) == str(tmp_path / suggested)
    assert "-o PATH" not in refused.stderr
    # The suggested command does what the refused one meant.
    followed = invoke(tmp_path, "export", "j", "-o", hint.group(1))
    assert followed.exit_code == 0, followed.output
    assert f"wrote 3 rows to {tmp_path / suggested}" in followed.stderr


def test_a_parquet_input_without_columns_says_so(tmp_path: Path) -> None:
    src = tmp_path / "empty.parquet"
    pq.write_table(pa.table({}), src)
    result = invoke(tmp_path, *run_args(src, tmp_path / "out.parquet"))
    assert result.exit_code == 1, result.output
    assert (
        f"error: {src}: the --prompt template uses column(s) 'body', which the input does not "
        "have "
        "(the file has no columns at all)\n"
    ) in result.stderr
    assert "(it has: )" not in result.stderr
    assert batches_created(tmp_path) == 0


def test_a_missing_column_names_the_template_that_uses_it(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    args = run_args(src, tmp_path / "out.parquet")
    system = invoke(tmp_path, *args, "--system", "You label {{ nope }}.")
    assert system.exit_code == 1, system.output
    assert (
        f"error: {src}: the --system template uses column(s) 'nope', which the input does not "
        "have (it has: doc_id, body)"
    ) in system.stderr
    both = invoke(
        tmp_path,
        *with_prompt(args, "{{ body }} {{ lang }} {{ zz }}"),
        "--system", "In {{ lang }}.",
    )  # fmt: skip
    assert both.exit_code == 1, both.output
    assert (
        "the --prompt and --system templates use column(s) 'lang'; "
        "the --prompt template uses column(s) 'zz', which the input does not have"
    ) in both.stderr
    assert batches_created(tmp_path) == 0


def test_a_template_reads_a_column_with_a_space_through_row(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": "a", "product name": "lamp", "body": "bright"}]), src
    )
    out = tmp_path / "out.jsonl"
    args = with_prompt(run_args(src, out), 'About the {{ row["product name"] }}: {{ body }}')
    result = invoke(tmp_path, *args)
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["result_status"] == "succeeded"
    assert line["product name"] == "lamp"


def test_skip_invalid_exports_bad_rows_as_invalid(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": "a", "body": "x"}, {"doc_id": "b", "body": None}]), src
    )
    out = tmp_path / "out.jsonl"
    result = invoke(tmp_path, *run_args(src, out, "--skip-invalid"))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["result_status"] for r in lines] == ["succeeded", "invalid"]
    assert "column 'body' is null" in lines[1]["error_message"]
    # The summary for people, and the same counts as JSON in the job.finished log line.
    assert "  rows: 1 succeeded, 1 invalid\n" in result.stderr
    (finished,) = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"job.finished"' in line
    ]
    assert (finished["succeeded"], finished["invalid"], finished["errored"]) == (1, 1, 0)


def test_jobs_counts_answered_and_failed_rows_apart(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    bodies = ["x", None, "y", None, None]
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": f"d{i}", "body": b} for i, b in enumerate(bodies)]), src
    )
    ran = invoke(tmp_path, *run_args(src, tmp_path / "o.parquet", "--skip-invalid", "--job", "j"))
    assert ran.exit_code == 0, ran.output
    listed = invoke(tmp_path, "jobs")
    assert listed.exit_code == 0, listed.output
    header, line = listed.stdout.splitlines()
    assert header.split() == [
        "id", "name", "status", "rows", "answered", "failed", "canceled", "open", "age", "next",
    ]  # fmt: skip
    # 2 answered and 3 invalid (failed): a "done" column used to count all 5.
    assert line.split()[:8] == ["1", "j", "done", "5", "2", "3", "0", "0"]


def test_result_prefix_exports_beside_input_columns_of_the_same_name(tmp_path: Path) -> None:
    src = tmp_path / "phones.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"doc_id": "a", "body": "battery lasts", "model": "X100"},
                {"doc_id": "b", "body": "screen cracked", "model": "X200"},
            ]
        ),
        src,
    )
    out = tmp_path / "out.parquet"
    args = run_args(src, out, "--labels", "positive,negative")
    refused = invoke(tmp_path, *args)
    assert refused.exit_code == 1
    assert "already has column(s) 'model'" in refused.stderr
    assert "give the job --result-prefix (e.g. bp_) on its command" in refused.stderr
    assert batches_created(tmp_path) == 0

    # What the error suggests, on the same command: the same job goes on.
    result = invoke(tmp_path, *args, "--result-prefix", "bp_")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names[:3] == ["doc_id", "body", "model"]
    assert {"bp_result_status", "bp_model", "bp_label", "bp_cost_usd"} <= set(table.column_names)
    assert not {"result_status", "label"} & set(table.column_names)
    rows = table.to_pylist()
    assert [r["model"] for r in rows] == ["X100", "X200"]  # the input's, untouched
    assert {r["bp_model"] for r in rows} == {"claude-haiku-4-5"}
    assert {r["bp_label"] for r in rows} <= {"positive", "negative"}
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    again = tmp_path / "again.jsonl"
    assert invoke(tmp_path, "export", job["name"], "-o", str(again)).exit_code == 0
    first = json.loads(again.read_text().splitlines()[0])
    assert (first["model"], first["bp_result_status"]) == ("X100", "succeeded")


def test_a_result_prefix_that_is_not_a_plain_name_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    result = invoke(tmp_path, *run_args(src, tmp_path / "o.parquet", "--result-prefix", "bp-"))
    assert result.exit_code == 2
    assert "result_prefix 'bp-': use letters, digits and _ only" in result.stderr


def test_skip_invalid_given_after_a_failed_validation_resumes_the_job(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": "a", "body": "x"}, {"doc_id": "b", "body": None}]), src
    )
    out = tmp_path / "out.jsonl"
    failed = invoke(tmp_path, *run_args(src, out))
    assert failed.exit_code == 1
    assert "--skip-invalid" in failed.stderr
    # The flag the error suggests, on the same command: the same job, now sent.
    result = invoke(tmp_path, *run_args(src, out, "--skip-invalid"))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["result_status"] for r in lines] == ["succeeded", "invalid"]
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job["status"] == "done"


def test_duplicate_ids_name_their_file_lines_where_blank_lines_shift_them(
    tmp_path: Path,
) -> None:
    """Validation says `row 2 (line 3, id 'b')`; the duplicate check gave row numbers only."""
    src = tmp_path / "d.jsonl"
    src.write_text(
        '{"doc_id":"a","body":"1"}\n\n\n{"doc_id":"b","body":"2"}\n\n{"doc_id":"a","body":"3"}\n'
    )
    args = run_args(src, tmp_path / "o.jsonl")
    said = "duplicates: 'a' in rows 1, 3 (line 6); nothing was submitted"
    estimated = invoke(tmp_path, "estimate", *args[1:], "--offline")
    assert estimated.exit_code == 1
    assert said in estimated.stderr
    ran = invoke(tmp_path, *args)
    assert ran.exit_code == 1
    assert said in ran.stderr


def test_run_of_a_known_job_without_o_names_the_output_it_wrote(tmp_path: Path) -> None:
    """The summary printed -o from the command line, so `run --job NAME` (which writes the
    output the job holds) left the `output:` line out."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    out = tmp_path / "out.jsonl"
    first = invoke(tmp_path, *run_args(src, out, "--job", "j"))
    assert first.exit_code == 0, first.output
    assert f"  output: {out}\n" in first.stderr
    out.unlink()
    again = invoke(
        tmp_path, "run", "--job", "j", "--emulate", "--prompt", "Again: {{ body }}", "--yes"
    )
    assert again.exit_code == 0, again.output
    assert f"  output: {out}\n" in again.stderr
    assert len(out.read_text().splitlines()) == 5


def test_export_of_a_job_that_failed_validation_says_it_failed_not_to_wait(
    tmp_path: Path,
) -> None:
    """It said "not finished (0 rows still pending)" and advised `tick`, which does nothing
    for a failed job."""
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"doc_id": "a", "body": "x"}, {"doc_id": "b", "body": None}]), src
    )
    failed = invoke(tmp_path, *run_args(src, tmp_path / "out.jsonl", "--job", "f"))
    assert failed.exit_code == 1
    export = invoke(tmp_path, "export", "f", "-o", str(tmp_path / "x.jsonl"))
    assert export.exit_code == 2
    assert "job 1 (f) failed and cannot be exported until it finishes: " in export.stderr
    assert "row(s) failed validation" in export.stderr
    assert "`batchpipe status f` says what to do next" in export.stderr
    assert "tick" not in export.stderr
    assert not list(tmp_path.glob("*x.jsonl*"))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("template", r"prompt template, line 1"),
        ("extension", r"cannot tell the format of .*in\.txt"),
        ("missing", r"cannot read .*nope\.jsonl: no such file"),
    ],
)
def test_a_command_refused_at_the_start_records_no_job(
    tmp_path: Path, case: str, message: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = run_args(src, tmp_path / "out.parquet")
    if case == "template":
        args = with_prompt(args, "Classify: {{ body ")
    elif case == "extension":
        args[1] = str(src.rename(tmp_path / "in.txt"))
    else:
        args[1] = str(tmp_path / "nope.jsonl")
    result = invoke(tmp_path, *args)
    assert result.exit_code in (1, 2), result.output
    assert re.search(message, result.stderr), result.stderr
    assert json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"] == []
    # So cron's tick has nothing to trip over.
    tick = invoke(tmp_path, "tick", "--emulate")
    assert tick.exit_code == 0, tick.output
    assert "nothing to do" in tick.stderr


def test_dry_run_of_a_new_job_checks_what_the_command_would(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = run_args(src, tmp_path / "out.parquet", "--job", "j", "--dry-run")
    result = invoke(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert "dry run: no job j yet; this command would start it" in result.stderr
    assert result.stdout.strip() == "0"
    result = invoke(tmp_path, *with_prompt(args, "Classify: {{ body "))
    assert result.exit_code == 2, result.output
    assert "prompt template, line 1" in result.stderr
    assert json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"] == []
    # A known job: the same settings change nothing; a new prompt changes every row.
    assert invoke(tmp_path, *args[:-1]).exit_code == 0
    result = invoke(tmp_path, *args)
    assert "dry run: job j's requests would not change; none sent again" in result.stderr
    assert result.stdout.strip() == "0"
    result = invoke(tmp_path, *with_prompt(args, "Label: {{ body }}"))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "3"
    assert batches_created(tmp_path) == 1  # a dry run sends nothing


def test_a_job_held_by_another_process_names_it_and_how_to_go_on(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    assert invoke(tmp_path, *run_args(src, tmp_path / "out.parquet"), "--job", "j").exit_code == 0
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        job = store.get_job("j")
        assert job is not None
        assert store.acquire_lease(job.id, "worker-7:4242:abcd", 600)
    result = invoke(tmp_path, "retry", "j")
    assert result.exit_code == 75, result.output
    assert "being worked on by another process (worker-7:4242:abcd)" in result.stderr
    assert "a `batchpipe run` stops with Ctrl-C and resumes later" in result.stderr
    (job_status,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job_status["status"] == "done"  # untouched


def test_next_action_to_export_asks_for_a_path_only_without_one(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    with_output = [*run_args(src, tmp_path / "out.parquet"), "--job", "a"]
    without = [*run_args(src, tmp_path / "unused.parquet")[:-2], "--job", "b"]
    assert invoke(tmp_path, *with_output).exit_code == 0
    assert invoke(tmp_path, *without).exit_code == 0
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        job = store.get_job("a")
        assert job is not None
        store.update_job(job.id, exported_at=None)  # as after a retry, before the export
    jobs = {j["name"]: j for j in json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]}
    assert jobs["a"]["next_action"] == "`batchpipe export a`"
    assert jobs["b"]["next_action"] == "`batchpipe export b -o PATH`"


def test_tick_without_an_api_key_is_a_usage_error_like_run(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    emulator_server.emulator.configure(processing_seconds=3600)  # the job stays unfinished
    api = {"ANTHROPIC_BASE_URL": emulator_server.url}
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = [a for a in run_args(src, tmp_path / "out.parquet", "--job", "j") if a != "--emulate"]
    submitted = invoke(tmp_path, "submit", *args[1:], env={**api, "ANTHROPIC_API_KEY": "sk-x"})
    assert submitted.exit_code == 0, submitted.output
    result = invoke(tmp_path, "tick", env=api)  # ANTHROPIC_API_KEY is empty
    assert result.exit_code == 2, result.output
    assert "ANTHROPIC_API_KEY is not set" in result.stderr


def test_estimate_checks_the_columns_as_the_run_would(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = run_args(src, tmp_path / "out.parquet")
    args[args.index("doc_id")] = "nope"
    result = invoke(tmp_path, "estimate", *args[1:], "--offline")
    assert result.exit_code == 1, result.output
    assert "--id-column 'nope' is not a column of the input" in result.stderr
    good = invoke(tmp_path, "estimate", *run_args(src, tmp_path / "out.parquet")[1:], "--offline")
    assert good.exit_code == 0, good.output
    assert "warning" not in good.stderr


def test_estimate_counts_the_rows_the_run_would_refuse(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [*rows(3), {"doc_id": "d9", "body": None}])
    result = invoke(tmp_path, "estimate", *run_args(src, tmp_path / "o.parquet")[1:], "--offline")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("3 row(s) to send")
    assert (
        f"warning: {src}: 1 row(s) fail validation and are not priced; `run` refuses the "
        "job unless --skip-invalid:\n  1 row: column 'body' is null (row 4 (id 'd9'))"
    ) in result.stderr
    # A bad id is a bad row too, as ingest says.
    src = write_jsonl(tmp_path / "ids.jsonl", [*rows(2), {"doc_id": None, "body": "x"}])
    result = invoke(tmp_path, "estimate", *run_args(src, tmp_path / "o.parquet")[1:], "--offline")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("2 row(s) to send")
    assert "1 row: column 'doc_id' (the id column) is null (row 3)" in result.stderr


def test_estimate_refuses_duplicate_ids_as_the_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch = tmp_path / "scratch"  # where estimate's temporary file of ids goes
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    twice = [*rows(4), {"doc_id": "d1", "body": "again"}, {"doc_id": "d3", "body": None}]
    src = write_jsonl(tmp_path / "in.jsonl", twice)
    args = run_args(src, tmp_path / "o.parquet", "--skip-invalid")
    estimated = invoke(tmp_path, "estimate", *args[1:], "--offline")
    assert estimated.exit_code == 1, estimated.output
    expected = (
        f"error: {src}: column 'doc_id' must identify rows uniquely, but has duplicates: "
        "'d1' in rows 2, 5; 'd3' in rows 4, 6; nothing was submitted. Make the column "
        "unique, or run without --id-column to key rows by their position\n"
    )
    assert estimated.stderr.endswith(expected), estimated.stderr
    assert estimated.stdout == ""
    ran = invoke(tmp_path, *args)  # ingest says the very same
    assert ran.exit_code == 1, ran.output
    assert ran.stderr.endswith(expected), ran.stderr
    assert list(scratch.iterdir()) == []  # the temporary file is gone

    unique = write_jsonl(tmp_path / "unique.jsonl", rows(6))
    fine = invoke(tmp_path, "estimate", *run_args(unique, tmp_path / "u.parquet")[1:], "--offline")
    assert fine.exit_code == 0, fine.output
    assert fine.stdout.startswith("6 row(s) to send")
    assert list(scratch.iterdir()) == []


def test_retry_and_cancel_of_a_job_with_nothing_to_do_say_so(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    assert invoke(tmp_path, *run_args(src, tmp_path / "o.parquet")).exit_code == 0
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    retried = invoke(tmp_path, "retry", job["name"])
    assert retried.exit_code == 0, retried.output
    assert f"job 1 ({job['name']}): no errored/expired rows to send again\n" in retried.stderr
    typed = invoke(tmp_path, "retry", job["name"], "--error-type", "overloaded_error")
    assert typed.exit_code == 0, typed.output
    assert "no errored rows of error type overloaded_error to send again" in typed.stderr
    # Expired rows have no error type: asking for both used to say "no expired rows".
    both = invoke(
        tmp_path, "retry", job["name"], "--status", "expired", "--error-type", "overloaded_error"
    )
    assert both.exit_code == 2, both.output
    assert "--status expired leaves errored rows out; add --status errored" in both.stderr
    canceled = invoke(tmp_path, "cancel", job["name"])
    assert canceled.exit_code == 0, canceled.output
    assert "is already done; nothing to cancel" in canceled.stderr
    (after,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert after["status"] == "done"


def test_debug_adds_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    assert invoke(tmp_path, "db", "upgrade").exit_code == 0
    plain = invoke(tmp_path, "status", "no-such-job")
    debugging = invoke(tmp_path, "--debug", "status", "no-such-job")
    assert plain.exit_code == debugging.exit_code == 2  # cron and Airflow act on it
    assert "Traceback (most recent call last)" in debugging.stderr
    assert "Traceback" not in plain.stderr
    for result in (plain, debugging):
        assert "error: no job 'no-such-job'" in result.stderr


def test_a_param_that_is_broken_json_is_refused_before_sending(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "o.parquet"
    broken = invoke(tmp_path, *run_args(src, out, "--param", 'stop_sequences=["a"'))
    assert broken.exit_code == 2
    assert "--param stop_sequences: '[\"a\"' is not valid JSON" in broken.stderr
    assert batches_created(tmp_path) == 0
    # A bare word is still a string, and valid JSON its value.
    ok = invoke(tmp_path, *run_args(src, out, "--param", 'stop_sequences=["a"]'))
    assert ok.exit_code == 0, ok.output


def test_missing_options_are_a_usage_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    result = invoke(tmp_path, "run", str(src), "--emulate", "--prompt", PROMPT)
    assert result.exit_code == 2
    assert "--model" in result.stderr
    assert "--max-tokens" in result.stderr


def test_a_schema_field_named_like_a_result_column_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"label": {}, "model": {}}}')
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out, "--output-schema", str(schema)))
    assert result.exit_code == 2
    assert "'model' would repeat result column" in result.stderr
    assert "rename" in result.stderr
    assert not out.exists()
    assert batches_created(tmp_path) == 0


@pytest.mark.parametrize(
    "ref",
    [
        "#/$defs/Sentiment",  # a definition that is not there
        "other.json#/Sentiment",  # another document: never fetched
    ],
)
def test_a_schema_ref_that_leads_nowhere_is_refused_before_anything_is_sent(
    tmp_path: Path, ref: str
) -> None:
    """It used to pass the schema check and fail every answer's validation at collect,
    after the batch was paid for ("Unresolvable")."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {"type": "object", "properties": {"sentiment": {"$ref": ref}},
             "$defs": {"Other": {"enum": ["a"]}}}
        )
    )  # fmt: skip
    out = tmp_path / "out.parquet"
    result = invoke(tmp_path, *run_args(src, out, "--output-schema", str(schema)))
    assert result.exit_code == 2, result.output
    assert f"output schema refers to {ref!r}, which is not in the schema" in result.stderr
    assert not out.exists()
    assert batches_created(tmp_path) == 0


@pytest.mark.parametrize("command", ["run", "submit", "estimate"])
def test_no_api_key_is_refused_before_any_work(tmp_path: Path, command: str) -> None:
    """Without a key, a command that will call the API stops at once (exit 2) saying what
    to set: before the input is read (a bad row would otherwise be reported first) and
    with no job, nor even a database, left behind."""
    src = write_jsonl(tmp_path / "in.jsonl", [*rows(2), {"doc_id": "d9"}])  # d9: no body
    args = [a for a in run_args(src, tmp_path / "out.parquet") if a != "--emulate"]
    result = invoke(tmp_path, command, *args[1:], env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "error: ANTHROPIC_API_KEY is not set, and this command calls the API at "
        "ANTHROPIC_BASE_URL: set ANTHROPIC_API_KEY (any value will do for a local emulator "
        "at ANTHROPIC_BASE_URL), or pass --emulate to use the built-in emulator; nothing was "
        "read or stored"
    )
    assert "body" not in result.stderr  # the input was not validated
    assert not (tmp_path / "state.db").exists()
    # What needs no API still works without a key.
    if command != "estimate":
        dry = invoke(tmp_path, command, *args[1:], "--dry-run")
        assert dry.exit_code == 0, dry.output


def test_job_file_with_flags_overriding(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", rows(4))
    (tmp_path / "job.toml").write_text(
        'name = "nightly"\ninput = "in.jsonl"\nprompt = "Say: {{ body }}"\n'
        'model = "claude-haiku-4-5"\n'
        'max_tokens = 8\nid_column = "doc_id"\noutput = "out.jsonl"\n'
    )
    result = invoke(tmp_path, "run", "--emulate", "--config", str(tmp_path / "job.toml"),
                    "--max-tokens", "32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4
    job = json.loads(invoke(tmp_path, "status", "nightly", "--json").stdout)["jobs"][0]
    assert job["name"] == "nightly"
    assert job["status"] == "done"


def test_labels_and_schemas_in_a_job_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`labels` in a job file was refused as an unknown key, `output_schema = "x.json"` as
    not a table, and BATCHPIPE_LABELS was dropped without a word: the job paid for
    free-text answers with no label column."""
    write_jsonl(tmp_path / "in.jsonl", rows(3))
    base = (
        'input = "in.jsonl"\nprompt = "Say: {{ body }}"\nmodel = "claude-haiku-4-5"\n'
        'max_tokens = 32\nid_column = "doc_id"\n'
    )
    schema = {"type": "object", "properties": {"tone": {"type": "string"}}, "required": ["tone"]}
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "tone.json").write_text(json.dumps(schema))
    cases = {
        "list": ('labels = ["yes", "no"]\n', {}, "label"),
        "text": ('labels = "yes,no"\n', {}, "label"),
        "schema file": ('output_schema = "schemas/tone.json"\n', {}, "tone"),
        "env labels": ("", {"BATCHPIPE_LABELS": "yes,no"}, "label"),
        # The environment is over the job file: its labels replace the file's schema.
        "env over file": (
            'output_schema = "schemas/tone.json"\n',
            {"BATCHPIPE_LABELS": "yes,no"},
            "label",
        ),
    }
    for n, (extra, env, column) in enumerate(cases.values()):
        job = tmp_path / f"job{n}.toml"
        out = tmp_path / f"out{n}.jsonl"
        job.write_text(f'{base}output = "{out.name}"\n{extra}')
        ran = invoke(tmp_path, "run", "--emulate", "--job", f"j{n}", "--config", str(job), env=env)
        assert ran.exit_code == 0, (extra, env, ran.output)
        first = json.loads(out.read_text().splitlines()[0])
        assert column in first, (extra, env, sorted(first))
    monkeypatch.chdir(tmp_path)  # BATCHPIPE_OUTPUT_SCHEMA is relative to the working directory
    job = tmp_path / "plain.toml"
    job.write_text(f'{base}output = "plain.jsonl"\n')
    env = {"BATCHPIPE_OUTPUT_SCHEMA": "schemas/tone.json", "BATCHPIPE_PARAMS": '{"top_k": 3}'}
    ran = invoke(tmp_path, "run", "--emulate", "--job", "p", "--config", str(job), env=env)
    assert ran.exit_code == 0, ran.output
    assert "tone" in json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])
    both = tmp_path / "both.toml"
    both.write_text(f'{base}labels = ["a"]\noutput_schema = "schemas/tone.json"\n')
    refused = invoke(tmp_path, "run", "--emulate", "--job", "b", "--config", str(both))
    assert refused.exit_code == 2
    assert f"job file {both}: give labels or output_schema, not both" in refused.stderr
    missing = invoke(
        tmp_path, "run", "--emulate", "--job", "m", "--config", str(job),
        env={"BATCHPIPE_OUTPUT_SCHEMA": "nope.json"},
    )  # fmt: skip
    assert missing.exit_code == 2
    assert f"BATCHPIPE_OUTPUT_SCHEMA {tmp_path / 'nope.json'} does not exist" in missing.stderr


def test_sigterm_exits_130_releases_the_lease_and_the_job_resumes(
    tmp_path: Path, cli_env: dict[str, str], emulator: Emulator
) -> None:
    import signal
    import subprocess
    import time

    from conftest import batchpipe_argv

    from batchpipe.db import Store

    emulator.configure(processing_seconds=3600)  # the batch stays in progress: run waits
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    db = f"sqlite:///{tmp_path / 'state.db'}"
    args = [
        a
        for a in run_args(src, tmp_path / "out.parquet", "--poll-interval", "0.2")
        if a != "--emulate"
    ]
    proc = subprocess.Popen(
        batchpipe_argv(db, *args), env=cli_env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while emulator.stats()["batches_created"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # now it is polling
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    with Store.open(db) as store:
        (job,) = store.list_jobs()
        assert job.lease_owner is None

    emulator.configure(processing_seconds=0)
    emulator.advance(3600)
    done = subprocess.run(batchpipe_argv(db, *args), env=cli_env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert emulator.stats()["batches_created"] == 1
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 5


def test_tick_from_another_directory_finds_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    write_jsonl(work / "in.jsonl", rows(3))
    monkeypatch.chdir(work)
    submitted = invoke(
        tmp_path, "submit", "in.jsonl", "--emulate", "--prompt", PROMPT,
        "--model", "claude-haiku-4-5", "--max-tokens", "8", "-o", "out.jsonl", "--job", "rel",
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    monkeypatch.chdir(tmp_path)  # cron starts somewhere else
    for _ in range(20):
        ticked = invoke(tmp_path, "tick", "--emulate")
        assert ticked.exit_code == 0, ticked.output
        if (work / "out.jsonl").exists():
            break
        __import__("time").sleep(0.3)
    assert len((work / "out.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "--config", "/nonexistent/job.toml"], {}, "cannot read job file"),
        (["tick"], {"BATCHPIPE_ORPHAN_GRACE": "soon"}, "BATCHPIPE_ORPHAN_GRACE"),
        (["--db", "nosuch://x", "status"], {}, "cannot use database"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = invoke(tmp_path, *args, env=env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_resume_of_a_canceled_job_points_at_retry_status_canceled(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    emulator.configure(processing_seconds=3600, cancel_seconds=0.1)
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    args = [a for a in run_args(src, tmp_path / "o.parquet") if a != "--emulate"]
    submitted = invoke(tmp_path, "submit", *args[1:], "--job", "stopme", env=env)
    assert submitted.exit_code == 0, submitted.output
    assert invoke(tmp_path, "cancel", "stopme", env=env).exit_code == 0
    emulator.advance(1)  # the cancel has ended at the API
    assert invoke(tmp_path, "tick", "--job", "stopme", env=env).exit_code == 0
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job["status"] == "canceled"
    assert job["counts"]["canceled"] == 4

    resumed = invoke(tmp_path, "resume", "stopme", env=env)
    assert resumed.exit_code == 2
    assert (
        "error: job 1 (stopme) is canceled; nothing to resume. To send its canceled rows "
        "again: `batchpipe retry stopme --status canceled`, then `batchpipe tick`"
    ) in resumed.stderr
    # The hint is a command that works.
    retried = invoke(tmp_path, "retry", "stopme", "--status", "canceled", env=env)
    assert retried.exit_code == 0, retried.output
    assert "job 1 (stopme): 4 row(s) queued again" in retried.stderr


def test_run_with_only_the_job_name_continues_a_known_job(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`--job NAME: the same name resumes the job`: after a retry the analyst runs
    `run --job NAME`, without the settings, which the job already holds."""
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    emulator.configure(processing_seconds=3600, cancel_seconds=0.1)
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    out = tmp_path / "o.parquet"
    args = [a for a in run_args(src, out) if a != "--emulate"]
    assert invoke(tmp_path, "submit", *args[1:], "--job", "j", env=env).exit_code == 0
    assert invoke(tmp_path, "cancel", "j", env=env).exit_code == 0
    emulator.advance(1)
    assert invoke(tmp_path, "tick", "--job", "j", env=env).exit_code == 0
    retried = invoke(tmp_path, "retry", "j", "--status", "canceled", env=env)
    assert retried.exit_code == 0, retried.output
    assert "`batchpipe run --job j` sends them and waits for the answers" in retried.stderr
    emulator.configure(processing_seconds=0)
    started = time.monotonic()
    before = emulator.stats()["batches_created"]
    ran = invoke(
        tmp_path, "run", "--job", "j", "--poll-interval", "0.05", "--max-batch-requests", "2",
        env=env,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    # This run's --poll-interval, not the job's (unset: a first wait of 30 s), and its
    # batch limit: 4 rows in batches of 2 (it was dropped, and 1 batch sent).
    assert time.monotonic() - started < 15
    assert emulator.stats()["batches_created"] - before == 2
    assert "finished job 1 (j): done, 4 rows\n  rows: 4 succeeded\n" in ran.stderr
    assert pq.read_table(out).column("result_status").to_pylist() == ["succeeded"] * 4
    # Stored with the job for later commands, as every setting given that changes no request.
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        job = store.get_job("j")
    assert job is not None
    assert (job.spec["poll_interval"], job.spec["max_batch_requests"]) == (0.05, 2)
    # No such job: the message names what is missing (INPUT is an argument, not a flag).
    unknown = invoke(tmp_path, "run", "--job", "nosuch", env=env)
    assert unknown.exit_code == 2
    assert unknown.stderr == (
        "error: missing INPUT, --prompt, --model, --max-tokens (give them on the command "
        "line, in --config or as BATCHPIPE_* variables); there is no job 'nosuch' to continue "
        "(`batchpipe jobs` lists them)\n"
    )


def test_requests_over_a_models_limits_fail_at_once_and_are_never_resent(
    tmp_path: Path,
) -> None:
    """The emulator answers them as the API does (errored, invalid_request_error); batchpipe
    treats that as final: one attempt, no second batch, the API's message in the output."""
    huge = "x" * (4 * 200_000)  # with "Classify: " around it, over haiku's 200,000 tokens
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"doc_id": "short", "body": "fine"}, {"doc_id": "long", "body": huge}],
    )
    out = tmp_path / "out.jsonl"
    long_prompt = invoke(tmp_path, *run_args(src, out, "--max-failed", "1", "--job", "a"))
    assert long_prompt.exit_code == 0, long_prompt.output
    short, long = (json.loads(line) for line in out.read_text().splitlines())
    assert short["result_status"] == "succeeded"
    assert (long["result_status"], long["error_type"], long["attempts"]) == (
        "errored", "invalid_request_error", 1,
    )  # fmt: skip
    assert long["error_message"] == "prompt is too long: 200003 tokens > 200000 maximum"
    assert batches_created(tmp_path) == 1

    args = run_args(src, out, "--job", "b")
    args[args.index("--max-tokens") + 1] = "100000"
    too_many = invoke(tmp_path, *args)
    # A max_tokens over the model's known output limit is refused before anything is sent
    # (the emulator's errored result for it is tested in test_emulator).
    assert too_many.exit_code == 2, too_many.output
    assert "--max-tokens 100000 is over claude-haiku-4-5's output limit of 64,000" in (
        too_many.stderr
    )
    assert batches_created(tmp_path) == 1  # nothing sent for job b


def test_run_ends_with_the_cost_and_how_to_retry_failed_rows(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """Rows that failed within --max-failed: the run exits 0, and its summary says what the
    job cost, how many rows failed, and the retry command, which then works."""
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    # Which rows fail depends on the job's random token: at 0.2 of 40 rows, some (P of none
    # ~1e-4) and under half (P of 20 or more ~1e-5). At 0.3 of 20, 10 or more failed in
    # about one run of twenty, and the run stopped over --max-failed. Overloaded and API
    # errors, one try each: errors that sending again may fix.
    emulator.configure(errored_rate=0.2, processing_seconds=0, seed=4)
    src = write_jsonl(tmp_path / "in.jsonl", rows(40))
    args = [a for a in run_args(src, tmp_path / "o.parquet") if a != "--emulate"]
    args += ["--job", "j", "--max-failed", "50%", "--poll-interval", "0.05", "--max-attempts", "1"]
    ran = invoke(tmp_path, *args, env=env)
    assert ran.exit_code == 0, ran.output
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    errored = job["counts"]["errored"]
    assert 0 < errored < 20
    assert f"  rows: {40 - errored} succeeded, {errored} errored\n" in ran.stderr
    assert f"  cost: ${job['cost_usd']:,.4f} (every attempt, batch prices, table " in ran.stderr
    assert job["cost_usd"] > 0
    assert (
        f"  failed: {errored} row(s) without an answer ({errored} errored); to send the "
        f"{errored} errored/expired again: `batchpipe retry j`, then `batchpipe run --job j`\n"
    ) in ran.stderr
    retried = invoke(tmp_path, "retry", "j", env=env)
    assert retried.exit_code == 0, retried.output
    assert f"job 1 (j): {errored} row(s) queued again" in retried.stderr


def test_run_summary_does_not_offer_retry_for_errors_a_retry_cannot_fix(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """Every row refused as an invalid request (a bad --param, say): the summary used to
    suggest `retry`, which sends the same requests to fail again after another wait."""
    env = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-test"}
    emulator.configure(invalid_rate=1.0, processing_seconds=0, seed=4)
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    args = [a for a in run_args(src, tmp_path / "o.parquet") if a != "--emulate"]
    ran = invoke(tmp_path, *args, "--job", "j", "--poll-interval", "0.05", env=env)
    assert ran.exit_code == 1, ran.output  # no row answered
    assert (
        "  failed: 5 row(s) without an answer (5 errored); 5 errored for good (5 "
        "invalid_request_error): sending them again cannot help; `batchpipe report j` shows "
        "why, then change what is wrong (the model, a --param, the input) and re-run with "
        "`batchpipe run --job j ... --yes`\n"
    ) in ran.stderr
    assert "batchpipe retry" not in ran.stderr


def test_run_summary_of_a_model_without_a_price_says_cost_unknown(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    args = run_args(src, tmp_path / "o.parquet")
    args[args.index("claude-haiku-4-5")] = "claude-mythos-preview"
    ran = invoke(tmp_path, *args)
    assert ran.exit_code == 0, ran.output
    assert "  cost unknown: model 'claude-mythos-preview' is not in the price table" in ran.stderr
    assert "failed:" not in ran.stderr


def test_run_summary_is_the_same_from_the_finishing_run_and_a_later_one(tmp_path: Path) -> None:
    """The first run shows the counts taken as it finished the job, the second (nothing
    left to do) counts the items: the same summary."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(40))
    out = tmp_path / "out.parquet"
    first = invoke(tmp_path, *run_args(src, out, "--job", "j"))
    again = invoke(tmp_path, *run_args(src, out, "--job", "j"))
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    summary = first.stderr[first.stderr.index("finished job 1 (j)") :]
    assert "  rows: 40 succeeded\n  cost: $" in summary
    assert again.stderr[again.stderr.index("finished job 1 (j)") :] == summary


def test_an_emulated_job_is_never_taken_for_the_real_one(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    """`run --emulate` to try a job, then the same command for real (a job file fixes the
    name): the real run used to find the job done, send nothing, and export the emulator's
    stand-in answers as the model's. `emulator_server` stands in for the real API here."""
    api = emulator_server.emulator
    real = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-ant-test"}
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    out = tmp_path / "out.parquet"
    tried = run_args(src, out, "--job", "fixed")
    assert invoke(tmp_path, *tried).exit_code == 0
    for_real = [a for a in tried if a != "--emulate"]

    refused = invoke(tmp_path, *for_real, env=real)
    assert refused.exit_code == 2, refused.output
    assert "job 1 (fixed) was run on the built-in emulator (--emulate)" in refused.stderr
    assert "give the real run another --job name" in refused.stderr
    assert api.stats()["batches_created"] == 0

    # Without --job the names differ: the real run is a job of its own, and sends every row.
    default = run_args(src, tmp_path / "tried.parquet")
    assert invoke(tmp_path, *default).exit_code == 0
    sent = invoke(tmp_path, *[a for a in default if a != "--emulate"], env=real)
    assert sent.exit_code == 0, sent.output
    assert api.stats()["requests_received"] == 5
    jobs = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert len(jobs) == 3


def test_emulate_never_steps_a_job_sent_to_the_api(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    """The reverse: `tick --emulate` in a folder of real jobs asked the emulator for their
    batches, found none, and stopped each job as needs_attention (blaming the API key)."""
    emulator_server.emulator.configure(processing_seconds=3600)
    real = {"ANTHROPIC_BASE_URL": emulator_server.url, "ANTHROPIC_API_KEY": "sk-ant-test"}
    src = write_jsonl(tmp_path / "in.jsonl", rows(5))
    args = [a for a in run_args(src, tmp_path / "out.parquet", "--job", "j") if a != "--emulate"]
    assert invoke(tmp_path, "submit", *args[1:], env=real).exit_code == 0

    ticked = invoke(tmp_path, "tick", "--emulate")
    assert ticked.exit_code == 0, ticked.output
    assert "no unfinished jobs; nothing to do" in ticked.stderr
    asked = invoke(tmp_path, "tick", "--emulate", "--job", "j")
    assert asked.exit_code == 2, asked.output
    assert "job 1 (j) was sent to the API: the built-in emulator has none of its batches" in (
        asked.stderr
    )
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert job["status"] == "running"
    assert batches_created(tmp_path) == 0  # the built-in emulator was never sent anything


def test_a_template_that_prints_no_column_is_warned_about(tmp_path: Path) -> None:
    """`{body}` (Python's braces) for `{{ body }}`: every row got the same prompt, and was
    paid for, without a word."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    result = invoke(tmp_path, *with_prompt(run_args(src, tmp_path / "o.parquet"), "C: {body}"))
    assert result.exit_code == 0, result.output
    (warned,) = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if '"job.same_prompt_for_every_row"' in line
    ]
    assert warned["level"] == "warning"
    assert warned["hint"] == "the templates print no column; a column is written {{ column }}"
    good = invoke(tmp_path, *run_args(src, tmp_path / "p.parquet", "--job", "other"))
    assert "same_prompt_for_every_row" not in good.stderr


def test_a_misspelt_job_file_setting_is_named_with_the_likely_one(tmp_path: Path) -> None:
    """`modle = ...` was reported only as "missing --model"."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        f'input = "{src}"\nprompt = "C: {{{{ body }}}}"\nmodle = "claude-haiku-4-5"\n'
        "max_tokens = 8\n"
    )
    result = invoke(tmp_path, "run", "--config", str(job_file), "--emulate")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: job file {job_file}: unknown setting 'modle'; did you mean 'model'?\n"
    )
