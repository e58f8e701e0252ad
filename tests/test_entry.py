"""The `batchpipe` command's entry point: Ctrl-C is one line and exit 130, from the first moment.

Real subprocesses get a real SIGINT. ``-X importtime`` makes Python report each import as it
finishes, so the test can send the signal right after the CLI's first import (click) and know
it lands while pyarrow, sqlalchemy and the SDK are still being imported (retried otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import batchpipe_argv, job_args, write_rows

from batchpipe import entry
from batchpipe.db import Store
from batchpipe.emulator import Emulator

QUIET_LINE = "interrupted; no work was in progress, run the same command again"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BATCHPIPE_")}


def _start_importing(db: str, **popen: Any) -> subprocess.Popen[str]:
    """`python -X importtime -m batchpipe status`, stopped right after the CLI imported click."""
    argv = [sys.executable, "-X", "importtime", *batchpipe_argv(db, "status")[1:]]
    proc = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if _imported(line) == "click":  # imported by the CLI, after the handler is in place
            return proc
    raise AssertionError(f"click never imported; exit {proc.wait()}")


def _imported(line: str) -> str:
    """The module an ``-X importtime`` line reports ("import time: 220 | 16390 |   click")."""
    return line.rsplit("|", 1)[-1].strip() if line.startswith("import time:") else ""


def test_ctrl_c_while_importing_says_one_line_and_exits_130(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'state.db'}"
    for _attempt in range(5):
        proc = _start_importing(db)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        if stdout or "state is saved" in stderr or "no database at" in stderr:
            continue  # the command's body ran before the signal came: try again
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert "KeyboardInterrupt" not in stderr
        assert [ln for ln in stderr.splitlines() if not ln.startswith("import time:")] == [
            QUIET_LINE
        ]
        assert not (tmp_path / "state.db").exists()  # nothing was done
        return
    pytest.fail("SIGINT never landed while the CLI was being imported")


def test_an_ignored_sigint_stays_ignored_while_importing(tmp_path: Path) -> None:
    # A shell starts background jobs (`batchpipe tick &` in a script) with SIGINT ignored.
    db = f"sqlite:///{tmp_path / 'state.db'}"
    Store.open(db).close()  # `status` does not create a database; give it an empty one
    proc = _start_importing(db, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("no jobs yet"), stdout


def test_ctrl_c_in_a_running_job_still_saves_state_and_resumes(
    tmp_path: Path, cli_env: dict[str, str], emulator: Emulator
) -> None:
    # The start-up handler exits at once; a command's body must unwind instead, so the
    # job's lease is released and the next run takes over without waiting for it to expire.
    emulator.configure(processing_seconds=3600)  # the batch stays in progress: run waits
    src = tmp_path / "in.jsonl"
    write_rows(src, 5)
    db = f"sqlite:///{tmp_path / 'state.db'}"
    args = job_args(src, "sigint", tmp_path / "out.jsonl")
    proc = subprocess.Popen(
        batchpipe_argv(db, "run", *args), env=cli_env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while emulator.stats()["batches_created"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # now it is polling
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; state is saved, run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    with Store.open(db) as store:
        (job,) = store.list_jobs()
        assert job.lease_owner is None

    emulator.configure(processing_seconds=0)
    emulator.advance(3600)
    done = subprocess.run(batchpipe_argv(db, "run", *args), env=cli_env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert emulator.stats()["batches_created"] == 1
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_the_entry_function_runs_the_cli_and_puts_the_sigint_handler_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    db = f"sqlite:///{tmp_path / 'state.db'}"
    Store.open(db).close()  # `status` does not create a database; give it an empty one
    # The CLI points structlog at this test's captured stderr, closed after the test: put
    # back what later tests log through.
    logging_before = structlog.get_config()
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main(["--db", db, "--log-format", "json", "status", "--json"])
    finally:
        structlog.configure(**logging_before)
    assert exited.value.code == 0
    assert json.loads(capsys.readouterr().out) == {"jobs": []}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_while_importing_says_one_line_and_exits_130(tmp_path: Path) -> None:
    # Airflow's timeout or systemd's stop may come before the command's body starts; that
    # used to kill the process by the signal (exit -15), outside the documented exit codes.
    db = f"sqlite:///{tmp_path / 'state.db'}"
    for _attempt in range(5):
        proc = _start_importing(db)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        if stdout or "state is saved" in stderr:
            continue  # the command's body ran before the signal came: try again
        assert proc.returncode == 130, stderr
        assert [ln for ln in stderr.splitlines() if not ln.startswith("import time:")] == [
            QUIET_LINE
        ]
        assert not (tmp_path / "state.db").exists()  # nothing was done
        return
    pytest.fail("SIGTERM never landed while the CLI was being imported")
