"""What people and machines watch: logs, progress bars, `status`, and what must never leak.

Every test runs the real CLI in a subprocess, against an emulator over loopback or --emulate.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow.parquet as pq
import pytest

from batchpipe.emulator import Emulator, EmulatorServer

REPO = Path(__file__).resolve().parent.parent
BATCHPIPE = str(Path(sys.executable).with_name("batchpipe"))
SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
ROWS = 12


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(
            json.dumps({"doc_id": f"d{i}", "body": f"review number {i} says fine"}) + "\n"
            for i in range(ROWS)
        )
    )
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPIPE", "ANTHROPIC"))}
    env.update(extra)
    return env


def _run_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        BATCHPIPE, "--db", f"sqlite:///{tmp_path / 'state.db'}", "run", str(_input(tmp_path)),
        "--prompt", "Sort this into a bucket: {{ body }}", "--model", "claude-haiku-4-5",
        "--max-tokens", "8", "--id-column", "doc_id", "--max-batch-requests", "5",
        "-o", str(tmp_path / "out.jsonl"), *extra,
    ]  # fmt: skip


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- logs


def test_logs_are_json_lines_off_a_tty_with_one_canonical_line_per_step(tmp_path: Path) -> None:
    proc = subprocess.run(
        _run_args(tmp_path, "--emulate"), env=_env(), capture_output=True, text=True, check=True
    )
    assert proc.stdout == ""  # data goes to stdout only when asked for; logs never
    assert "\r" not in proc.stderr  # no progress bars when stderr is not a terminal
    events = _json_lines(proc.stderr)
    assert events, proc.stderr
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_name.setdefault(e["event"], []).append(e)

    (ingested,) = by_name["job.ingested"]
    assert ingested["rows"] == ROWS
    submitted = by_name["batch.submitted"]
    assert sum(e["requests"] for e in submitted) == ROWS
    assert all(e["api_batch_id"].startswith("msgbatch_") and e["job_id"] == 1 for e in submitted)
    # The step lines name the API request that settled them, like the api.* lines do.
    assert all(e["request_id"].startswith("req_") for e in [*submitted, *by_name["batch.ended"]])
    # … and how long that call took, retries included: at least the api.create line's time.
    created = {e["batch_id"]: e["latency_ms"] for e in by_name["api.create"]}
    assert all(e["latency_ms"] >= created[e["api_batch_id"]] for e in submitted)
    assert all(e["latency_ms"] >= 0 for e in by_name["batch.ended"])
    collected = by_name["batch.collected"]
    assert all(e["elapsed_ms"] >= 0 for e in collected)
    assert sum(e["applied"] for e in collected) == ROWS
    assert all(e["output_tokens"] > 0 for e in collected)
    (finished,) = by_name["job.finished"]
    assert finished["succeeded"] == ROWS
    assert finished["input_tokens"] > 0
    (exported,) = by_name["job.exported"]
    assert exported["rows"] == ROWS
    # Every API call: one line with its latency and request id.
    calls = [e for e in events if e["event"].startswith("api.")]
    assert {"api.create", "api.retrieve", "api.results"} <= {e["event"] for e in calls}
    assert all(e["request_id"].startswith("req_") and e["latency_ms"] >= 0 for e in calls)


def test_a_run_logs_the_apis_request_counts_once_per_poll(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """While batches process, each poll logs one `job.waiting` line with the API's
    request_counts summed over the job's batches in flight (not a line per row)."""
    emulator.configure(processing_seconds=0.6)
    env = _env(ANTHROPIC_BASE_URL=emulator_server.url, ANTHROPIC_API_KEY="sk-test")
    proc = subprocess.run(
        _run_args(tmp_path, "--poll-interval", "0.1"),
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = _json_lines(proc.stderr)
    waiting = [e for e in events if e["event"] == "job.waiting"]
    assert waiting
    assert all(
        {"processing", "succeeded", "errored", "canceled", "expired"} <= set(e) for e in waiting
    )
    assert waiting[0]["processing"] == ROWS  # 3 batches of 5, 5, 2, all in flight
    polls = [e for e in events if e["event"] == "api.retrieve"]
    assert len(waiting) <= len(polls)  # one per poll (of every batch), not one per row


def test_log_format_flag_wins_over_the_guess(tmp_path: Path) -> None:
    args = _run_args(tmp_path, "--emulate")
    proc = subprocess.run(
        [args[0], "--log-format", "console", *args[1:]],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert not _json_lines(proc.stderr)
    assert re.search(r"\[info\s*\] batch\.submitted\s+\[batchpipe\.pipeline\.submit\]", proc.stderr)


def test_console_logs_show_counts_readably_not_as_python_dicts(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`failures=expired:12`, not `failures={'expired': 12}`; JSON lines keep the object."""
    emulator.configure(expired_rate=1.0, processing_seconds=0)
    env = _env(ANTHROPIC_BASE_URL=emulator_server.url, ANTHROPIC_API_KEY="sk-test")
    args = _run_args(tmp_path, "--poll-interval", "0.05", "--max-attempts", "1")
    args[args.index("--max-batch-requests") + 1] = str(ROWS)
    console = subprocess.run(
        [args[0], "--log-format", "console", *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert console.returncode == 1, console.stderr  # every row expired: nothing answered
    assert re.search(rf"batch\.collected .*failures=expired:{ROWS}\b", console.stderr)
    assert "{'" not in console.stderr
    as_json = subprocess.run(
        [args[0], "--log-format", "json", *args[1:], "--job", "again"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    collected = [e for e in _json_lines(as_json.stderr) if e["event"] == "batch.collected"]
    assert collected[0]["failures"] == {"expired": ROWS}


def test_estimate_logs_one_summary_line_for_its_token_counts(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    """`estimate` counts tokens for a sample of 50 rows: one `estimate.tokens_counted` line
    (calls, tokens, latency), not 50 `api.count_tokens` lines; those show with --debug."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": f"row {i} is fine"}) + "\n" for i in range(80)))
    env = _env(ANTHROPIC_BASE_URL=emulator_server.url, ANTHROPIC_API_KEY="sk-test")
    args = [str(src), "--prompt", "Say: {{ body }}", "--model", "claude-haiku-4-5"]
    args += ["--max-tokens", "8"]

    def estimate(*flags: str) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [BATCHPIPE, "--db", f"sqlite:///{tmp_path / 'state.db'}", "--log-format", "json",
             *flags, "estimate", *args],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return _json_lines(proc.stderr)

    events = estimate()
    (summary,) = [e for e in events if e["event"] == "estimate.tokens_counted"]
    assert summary["calls"] == 50
    assert summary["input_tokens"] > 0
    assert summary["latency_ms"] >= 0
    assert not [e for e in events if e["event"] == "api.count_tokens"]
    debug = [e for e in estimate("--debug") if e["event"] == "api.count_tokens"]
    assert len(debug) == 50
    assert {e["level"] for e in debug} == {"debug"}


# ---------------------------------------------------------------- progress on a terminal


def _run_on_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `args` with stdout and stderr on a fresh pseudo-terminal; return (code, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the follower side closed when the process exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_cover_every_long_step(tmp_path: Path) -> None:
    code, out = _run_on_pty(_run_args(tmp_path, "--emulate"), _env(TERM="xterm"))
    assert code == 0, out
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out)
    for step in ("validating rows", "uploading", "waiting", "downloading", "exporting"):
        assert re.search(rf"{step}: \d", plain), f"no {step!r} bar in:\n{plain}"
    assert f"uploading: {ROWS}/{ROWS} (100%)" in plain
    # While the batches run, the API's request_counts show beside the bar.
    assert re.search(rf"waiting: \d+/{ROWS} \(\d+%\) · API: \d+ processing", plain), plain
    assert f"exporting: {ROWS}/{ROWS} (100%)" in plain
    assert "\r\x1b[2K" in out  # bars redraw in place
    # Readable console logs on a terminal, not JSON.
    assert not [line for line in plain.splitlines() if line.strip().startswith('{"')]
    assert "job.finished" in plain


# ---------------------------------------------------------------- status


def _status(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BATCHPIPE, "--db", f"sqlite:///{tmp_path / 'state.db'}", *args],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.slow
def test_status_json_matches_the_documented_schema(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    # One finished job and one still in flight, so both shapes of batch appear.
    subprocess.run(_run_args(tmp_path, "--emulate"), env=_env(), capture_output=True, check=True)
    submit = [a if a != "run" else "submit" for a in _run_args(tmp_path, "--job", "inflight")]
    subprocess.run(
        submit,
        env=_env(ANTHROPIC_BASE_URL=emulator_server.url, ANTHROPIC_API_KEY="sk-ant-test-s"),
        capture_output=True,
        check=True,
    )

    status = json.loads(_status(tmp_path, "status", "--json").stdout)
    jsonschema.validate(status, SCHEMA)
    jobs = {j["name"]: j for j in status["jobs"]}
    assert jobs["inflight"]["status"] == "running"
    assert jobs["inflight"]["next_action"] == "wait for the API to finish processing"
    flying = jobs["inflight"]["batches"]
    assert len(flying) == 3
    assert all(b["status"] == "in_progress" for b in flying)
    assert all(23 * 3600 < b["expires_in_seconds"] <= 24 * 3600 for b in flying)
    done = next(j for j in status["jobs"] if j["name"] != "inflight")
    assert done["status"] == "done"
    assert done["counts"]["succeeded"] == ROWS
    jsonschema.validate(json.loads(_status(tmp_path, "jobs", "--json").stdout), SCHEMA)
    jsonschema.validate(
        json.loads(_status(tmp_path, "status", "inflight", "--json").stdout), SCHEMA
    )

    # The README documents every field of the schema.
    readme = (REPO / "README.md").read_text()
    assert "docs/status.schema.json" in readme
    for defn in ("job", "batch"):
        for field in SCHEMA["$defs"][defn]["properties"]:
            assert f"`{field}`" in readme, f"README does not document status field {field!r}"

    table = _status(tmp_path, "status", "inflight").stdout
    assert "job 2 (inflight): running" in table
    assert re.search(r"batch\s+api id\s+status\s+round\s+requests\s+age\s+expires in", table)
    assert re.search(r"msgbatch_\w+\s+in_progress\s+1\s+5\s+\d+s\s+2[34]h", table)
    assert "next: wait for the API to finish processing" in table


# ---------------------------------------------------------------- secrets and prompts


def _all_db_text(db: Path) -> str:
    """Every value of every row of every table, as text, plus the file's raw bytes."""
    parts = [db.read_bytes().decode("latin-1")]
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"jobs", "batches", "items", "attempts"} <= set(tables)
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):  # names from sqlite_master
                parts.extend(str(v) for v in row)
    finally:
        con.close()
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("output", ["out.jsonl", "out.parquet"])
def test_api_key_and_rendered_prompts_appear_in_no_log_table_or_export(
    tmp_path: Path, emulator_server: EmulatorServer, output: str
) -> None:
    key = f"sk-ant-test-{uuid.uuid4()}"
    env = _env(ANTHROPIC_BASE_URL=emulator_server.url, ANTHROPIC_API_KEY=key)
    args = [a if a != str(tmp_path / "out.jsonl") else str(tmp_path / output)
            for a in _run_args(tmp_path, "--poll-interval", "0.3")]  # fmt: skip
    # --debug: the most verbose logs there are.
    args.insert(1, "--debug")
    logs = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    more = [
        subprocess.run(
            [BATCHPIPE, "--debug", "--db", f"sqlite:///{tmp_path / 'state.db'}", *cmd],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        for cmd in (["status"], ["status", "--json"], ["jobs"], ["tick"])
    ]
    log_text = "\n".join([logs.stdout, logs.stderr, *(p.stdout + p.stderr for p in more)])
    assert "batch.collected" in log_text  # the run really logged its steps
    db_text = _all_db_text(tmp_path / "state.db")
    export = (tmp_path / output).read_bytes().decode("latin-1")
    if output.endswith(".parquet"):  # compressed: scan its values, too
        export += json.dumps(pq.read_table(tmp_path / output).to_pylist(), default=str)
    assert "review number 3 says fine" in export  # input columns are exported, as promised

    rendered = [f"Sort this into a bucket: review number {i} says fine" for i in range(ROWS)]
    for where, text in (("logs", log_text), ("database", db_text), ("export", export)):
        assert key not in text, f"the API key leaked into the {where}"
        assert key.removeprefix("sk-ant-") not in text, f"part of the key is in the {where}"
        leaked = [p for p in rendered if p in text]
        assert not leaked, f"rendered prompts in the {where}: {leaked[:2]}"
