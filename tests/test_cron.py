"""jobs/cron: the crontab line and the tick wrapper, run as cron would run them (real processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchpipe.emulator import EmulatorServer

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "jobs" / "cron" / "batchpipe-tick.sh"
BATCHPIPE = str(Path(sys.executable).with_name("batchpipe"))
ROWS = 10
# minute hour day-of-month month day-of-week, each a number, range, list, step or '*'.
_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def _crontab() -> tuple[dict[str, str], str, str]:
    """The crontab's variables, its schedule and its command."""
    env: dict[str, str] = {}
    jobs = []
    for line in (REPO / "jobs" / "cron" / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            key, _, value = line.partition("=")
            env[key] = value
        else:
            jobs.append(line)
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(None, 5)
    return env, " ".join(fields[:5]), fields[5]


@pytest.fixture
def cron_env(tmp_path: Path, emulator_server: EmulatorServer) -> dict[str, str]:
    """The crontab's environment with its paths moved into tmp_path and the API at the emulator."""
    variables, _, _ = _crontab()
    home = tmp_path / "home"
    (home / ".config" / "batchpipe").mkdir(parents=True)
    (home / ".config" / "batchpipe" / "env").write_text(
        f"export ANTHROPIC_BASE_URL={emulator_server.url}\n"
        "export ANTHROPIC_API_KEY=sk-ant-test-cron\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPIPE", "ANTHROPIC"))}
    env["HOME"] = str(home)
    for key, value in variables.items():
        env[key] = value.replace("/var/", f"{tmp_path}/var/").replace("/opt/batchpipe", str(REPO))
    env["BATCHPIPE_BIN"] = BATCHPIPE  # the crontab's /opt path, here our venv's
    return env


def _submit(tmp_path: Path, env: dict[str, str], *extra: str) -> Path:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"doc_id": f"d{i}", "body": f"text {i}"}) + "\n" for i in range(ROWS))
    )
    out = tmp_path / "out.jsonl"
    subprocess.run(
        [BATCHPIPE, "submit", str(source), "--job", "nightly", "--prompt", "Label: {{ body }}",
         "--model", "claude-haiku-4-5", "--max-tokens", "8", "--id-column", "doc_id",
         "--max-batch-requests", "4", "-o", str(out), *extra],
        env={**env, **_api_env(env)}, check=True, capture_output=True,
    )  # fmt: skip
    return out


def _api_env(env: dict[str, str]) -> dict[str, str]:
    """What the crontab line sources from ~/.config/batchpipe/env, for direct CLI calls."""
    text = (Path(env["HOME"]) / ".config" / "batchpipe" / "env").read_text()
    return dict(re.findall(r"export (\w+)=(\S+)", text))


def _cron_command(env: dict[str, str]) -> list[str]:
    _, _, command = _crontab()
    return [env.get("SHELL", "/bin/sh"), "-c", command.replace("/opt/batchpipe", str(REPO))]


def test_crontab_line_is_a_valid_schedule_calling_the_wrapper() -> None:
    variables, schedule, command = _crontab()
    assert all(_CRON_FIELD.match(f) for f in schedule.split()), schedule
    assert command.endswith("jobs/cron/batchpipe-tick.sh")
    assert "ANTHROPIC_API_KEY" not in variables  # the key stays out of the crontab
    assert {"BATCHPIPE_DATABASE_URL", "BATCHPIPE_TICK_LOG"} <= variables.keys()


def test_overlapping_cron_runs_finish_the_job_without_double_submission(
    tmp_path: Path, cron_env: dict[str, str], emulator_server: EmulatorServer
) -> None:
    Path(cron_env["BATCHPIPE_DATABASE_URL"].removeprefix("sqlite:///")).parent.mkdir(parents=True)
    out = _submit(tmp_path, cron_env)
    created = emulator_server.emulator.stats()["batches_created"]
    assert created == 3  # 10 rows, 4 per batch

    codes: list[int] = []
    deadline = time.monotonic() + 60
    while not out.exists():
        assert time.monotonic() < deadline, "the job never finished under cron"
        # Two cron runs at the same moment, as when one run overlaps the next.
        procs = [subprocess.Popen(_cron_command(cron_env), env=cron_env) for _ in range(2)]
        codes += [p.wait(timeout=60) for p in procs]
        if 1 in codes or 2 in codes:
            break
        time.sleep(0.5)

    assert set(codes) <= {0, 75}, codes
    stats = emulator_server.emulator.stats()
    assert stats["batches_created"] == created
    assert stats["requests_received"] == ROWS
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["doc_id"] for r in lines] == [f"d{i}" for i in range(ROWS)]
    assert {r["result_status"] for r in lines} == {"succeeded"}
    # The log is JSON lines, one per event; overlapping runs left their mark in it.
    log_lines = Path(cron_env["BATCHPIPE_TICK_LOG"]).read_text().splitlines()
    events = [json.loads(x)["event"] for x in log_lines]
    assert "tick.skipped" in events
    assert "job.exported" in events
    assert events.count("tick.exit") == codes.count(0) + codes.count(1) + codes.count(2)


def test_ticks_that_bypass_the_lock_still_never_submit_twice(
    tmp_path: Path, cron_env: dict[str, str], emulator_server: EmulatorServer
) -> None:
    """Without the wrapper's lock (e.g. two machines), batchpipe's job lease keeps them apart."""
    Path(cron_env["BATCHPIPE_DATABASE_URL"].removeprefix("sqlite:///")).parent.mkdir(parents=True)
    out = _submit(tmp_path, cron_env)
    deadline = time.monotonic() + 60
    codes: list[int] = []
    while not out.exists():
        assert time.monotonic() < deadline
        procs = [
            subprocess.Popen(
                [str(WRAPPER), "--job", "nightly"],
                env={**cron_env, **_api_env(cron_env), "BATCHPIPE_TICK_LOCK": str(tmp_path / n)},
            )
            for n in ("a.lock", "b.lock")
        ]
        codes += [p.wait(timeout=60) for p in procs]
        if 1 in codes or 2 in codes:
            break
        time.sleep(0.5)
    assert set(codes) <= {0, 75}, codes
    assert emulator_server.emulator.stats()["batches_created"] == 3
    assert len(out.read_text().splitlines()) == ROWS


def test_wrapper_passes_the_exit_code_through_and_logs_the_error(
    tmp_path: Path, cron_env: dict[str, str]
) -> None:
    Path(cron_env["BATCHPIPE_DATABASE_URL"].removeprefix("sqlite:///")).parent.mkdir(parents=True)
    proc = subprocess.run(
        [str(WRAPPER), "--job", "no-such-job"], env=cron_env, capture_output=True, check=False
    )
    assert proc.returncode == 2  # usage error, as `batchpipe tick` itself exits
    assert proc.stdout == b""
    # What cron mails: the error, and where the log is.
    message = "error: no job 'no-such-job'; `batchpipe jobs` lists them"
    log_path = cron_env["BATCHPIPE_TICK_LOG"]
    assert proc.stderr.decode().splitlines() == [
        message,
        f"batchpipe tick exited 2; its log is {log_path}",
    ]
    log = [json.loads(x) for x in Path(log_path).read_text().splitlines()]
    (said,) = [x for x in log if x["event"] == "cli.message"]
    assert (said["message"], said["level"]) == (message, "error")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", said["timestamp"])
    assert log[-1]["event"] == "tick.exit"
    assert (log[-1]["exit_code"], log[-1]["level"]) == (2, "error")


def test_a_job_that_fails_under_cron_is_mailed_once_and_logged_as_an_error(
    tmp_path: Path, cron_env: dict[str, str], emulator_server: EmulatorServer
) -> None:
    """A job ending with more failed rows than --max-failed allows: the tick that finds it
    exits 1 and says why on stderr (cron mails it); the ticks after it say nothing. Before,
    everything went to the log, as level "info", and cron never mailed."""
    Path(cron_env["BATCHPIPE_DATABASE_URL"].removeprefix("sqlite:///")).parent.mkdir(parents=True)
    emulator_server.emulator.configure(invalid_rate=0.5)
    out = _submit(tmp_path, cron_env, "--max-failed", "0")
    runs: list[subprocess.CompletedProcess[str]] = []
    deadline = time.monotonic() + 60
    while not out.exists():  # the tick that finishes the job exports it
        assert time.monotonic() < deadline, "the job never finished under cron"
        runs.append(subprocess.run(_cron_command(cron_env), env=cron_env, capture_output=True,
                                   text=True, check=False))  # fmt: skip
        time.sleep(0.3)
    failed = runs[-1]
    assert failed.returncode == 1, failed
    assert all(r.stderr == "" for r in runs[:-1])
    mailed = failed.stderr.splitlines()
    assert mailed[0].startswith("error: job 1 (nightly): ")
    assert "more than --max-failed" in mailed[0]
    assert mailed[-1] == f"batchpipe tick exited 1; its log is {cron_env['BATCHPIPE_TICK_LOG']}"
    after = subprocess.run(_cron_command(cron_env), env=cron_env, capture_output=True, text=True,
                           check=False)  # fmt: skip
    assert (after.returncode, after.stderr) == (0, "")
    log = [json.loads(x) for x in Path(cron_env["BATCHPIPE_TICK_LOG"]).read_text().splitlines()]
    errors = [x for x in log if x["event"] == "cli.message" and x["level"] == "error"]
    assert [x["message"] for x in errors] == [mailed[0]]
    exits = [(x["exit_code"], x["level"]) for x in log if x["event"] == "tick.exit"]
    assert (1, "error") in exits
    assert exits[-1] == (0, "info")


@pytest.mark.parametrize("job_file", sorted((REPO / "jobs" / "examples").glob("*.toml")))
def test_example_job_files_run_to_the_end(tmp_path: Path, job_file: Path) -> None:
    """The job files in jobs/examples run as the README shows (--emulate, output elsewhere)."""
    out = tmp_path / "out.jsonl"
    db = f"sqlite:///{tmp_path / 'state.db'}"
    subprocess.run(
        [BATCHPIPE, "--db", db, "run", "--config", str(job_file), "--emulate", "-o", str(out)],
        env={k: v for k, v in os.environ.items() if not k.startswith("BATCHPIPE")},
        capture_output=True,
        check=True,
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    source = (REPO / "examples" / "reviews.jsonl").read_text().splitlines()
    assert [r["doc_id"] for r in rows] == [json.loads(x)["doc_id"] for x in source]
    assert {r["result_status"] for r in rows} == {"succeeded"}
    assert all(r["response_text"] for r in rows)
    status = subprocess.run(
        [BATCHPIPE, "--db", db, "status", "--json"], capture_output=True, text=True, check=True
    )
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["name"] == job_file.stem.replace("_", "-")  # the file's `name`
