"""Jobs whose rows were never validated, as cron's `tick` meets them.

A job is recorded before its rows are validated; when the command that started it fails or
dies in between (a killed `submit`, a database locked past its timeout), or `resume` puts
back a job whose input had been refused, the job is running with no rows. `tick` validates
it from the stored settings, as that command would have, or fails it with the reason (exit
1, once) when its input cannot be used: never "running, 0 rows" with exit 0 forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from batchpipe.cli import cli

PROMPT = "Classify: {{ body }}"


def invoke(tmp_path: Path, *args: str) -> Result:
    db = f"sqlite:///{tmp_path / 'state.db'}"
    return CliRunner().invoke(
        cli, ["--db", db, "--log-format", "json", *args], env={"ANTHROPIC_API_KEY": ""}
    )


def write_rows(path: Path, bodies: list[str | None]) -> Path:
    rows = ({"doc_id": f"d{i}", "body": body} for i, body in enumerate(bodies))
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def submit_args(src: Path, out: Path) -> list[str]:
    return [
        "submit", str(src), "--emulate", "--job", "j", "--prompt", PROMPT,
        "--model", "claude-haiku-4-5", "--max-tokens", "16", "--id-column", "doc_id",
        "--poll-interval", "0.1", "-o", str(out),
    ]  # fmt: skip


def status(tmp_path: Path) -> dict[str, object]:
    (job,) = json.loads(invoke(tmp_path, "status", "--json").stdout)["jobs"]
    assert isinstance(job, dict)
    return job


def tick_until_exported(tmp_path: Path, out: Path) -> None:
    for _ in range(30):
        ticked = invoke(tmp_path, "tick", "--emulate")
        assert ticked.exit_code == 0, ticked.output
        if out.exists():
            return
        time.sleep(0.3)
    raise AssertionError(f"{out} was never written")


def test_a_submit_killed_while_storing_rows_is_finished_by_tick(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", [f"text {i}" for i in range(4)])
    out = tmp_path / "out.parquet"
    db = f"sqlite:///{tmp_path / 'state.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHPIPE_")}
    killed = subprocess.run(
        [sys.executable, "-m", "batchpipe", "--db", db, *submit_args(src, out)],
        env={**env, "BATCHPIPE_FAILPOINT": "after_insert_items"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr  # died like kill -9 after storing the rows
    job = status(tmp_path)
    assert job["status"] == "running"
    assert job["rows"] == 0
    assert job["next_action"] == (
        "validate and submit its rows (the next `tick` does, or the job's command)"
    )

    tick_until_exported(tmp_path, out)
    table = pq.read_table(out).to_pylist()
    assert [r["doc_id"] for r in table] == ["d0", "d1", "d2", "d3"]
    assert {r["result_status"] for r in table} == {"succeeded"}


def test_resume_of_a_job_refused_at_validation_fails_again_until_the_input_is_fixed(
    tmp_path: Path,
) -> None:
    src = write_rows(tmp_path / "in.jsonl", ["fine", None, "fine too"])
    out = tmp_path / "out.parquet"
    refused = invoke(tmp_path, *submit_args(src, out))
    assert refused.exit_code == 1
    assert "(row 2 (id 'd1'))" in refused.stderr
    assert status(tmp_path)["status"] == "failed"

    # resume puts it back to running, its rows still not validated. Before: every tick
    # said "running, 0 rows" and exited 0, and nothing ever happened.
    assert invoke(tmp_path, "resume", "j").exit_code == 0
    ticked = invoke(tmp_path, "tick", "--emulate")
    assert ticked.exit_code == 1, ticked.output
    assert "(row 2 (id 'd1'))" in ticked.stderr
    assert "nothing was submitted" in ticked.stderr
    job = status(tmp_path)
    assert job["status"] == "failed"
    assert job["next_action"] == (
        "nothing was sent: fix the input or settings named in the error, then run the "
        "command again with `--job j`"
    )
    # Said once: a failed job is not ticked again until someone acts.
    again = invoke(tmp_path, "tick", "--emulate")
    assert again.exit_code == 0, again.output

    write_rows(src, ["fine", "fixed", "fine too"])
    assert invoke(tmp_path, "resume", "j").exit_code == 0
    tick_until_exported(tmp_path, out)
    assert pq.read_table(out).num_rows == 3


def test_a_job_whose_input_is_gone_fails_at_tick_naming_the_file(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", ["a", None])
    out = tmp_path / "out.parquet"
    assert invoke(tmp_path, *submit_args(src, out)).exit_code == 1
    assert invoke(tmp_path, "resume", "j").exit_code == 0
    src.unlink()
    ticked = invoke(tmp_path, "tick", "--emulate")
    assert ticked.exit_code == 1, ticked.output
    assert str(src) in ticked.stderr
    job = status(tmp_path)
    assert job["status"] == "failed"
    assert str(src) in str(job["error"])
