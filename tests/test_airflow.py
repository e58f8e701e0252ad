"""The Airflow DAG in jobs/airflow, run by real Airflow 3 (`airflow dags test`) in its own venv.

Airflow lives in `.venv-airflow` (built once per machine by jobs/airflow/setup-venv.sh; its
pins clash with ours), with a SQLite metadata database in a temporary AIRFLOW_HOME. The DAG
calls the batchpipe CLI from our venv by subprocess and talks to an emulator on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchpipe.emulator import Emulator, EmulatorConfig, EmulatorServer
from batchpipe.pipeline.context import LEASE_TTL_SECONDS

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-airflow"
BATCHPIPE = str(Path(sys.executable).with_name("batchpipe"))
ROWS = sum(1 for _ in (REPO / "examples" / "reviews.jsonl").open())


@pytest.fixture(scope="session")
def airflow_bin() -> Path:
    """The `airflow` executable, installing Airflow into .venv-airflow on first use."""
    subprocess.run([str(REPO / "jobs" / "airflow" / "setup-venv.sh"), str(VENV)], check=True)
    return VENV / "bin" / "airflow"


@pytest.fixture(scope="module")
def airflow_env(airflow_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for an Airflow whose metadata database is migrated and dags folder is ours."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "BATCHPIPE", "ANTHROPIC"))
    }
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "jobs" / "airflow"),
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        BATCHPIPE_BIN=BATCHPIPE,
        BATCHPIPE_POKE_SECONDS="1",
        BATCHPIPE_RETRY_SECONDS="1",
    )
    subprocess.run(
        [str(airflow_bin), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300
    )
    return env


@pytest.fixture
def slow_emulator() -> Iterator[tuple[Emulator, str]]:
    """An emulator on loopback whose batches take 6 s, so the sensor has to reschedule."""
    emulator = Emulator(EmulatorConfig(seed=0, processing_seconds=6))
    with EmulatorServer(emulator, host="127.0.0.1", port=0) as server:
        yield emulator, server.url


def _dags_test(airflow_bin: Path, env: dict[str, str], log_path: Path) -> tuple[int, str]:
    """Run the DAG once; return the exit code and the whole log (also kept in `log_path`)."""
    proc = subprocess.run(
        [str(airflow_bin), "dags", "test", "classify_reviews"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    log_path.write_text(proc.stdout)
    return proc.returncode, proc.stdout


def _run_env(
    airflow_env: dict[str, str], tmp_path: Path, emulator_url: str
) -> tuple[dict[str, str], Path]:
    out_dir = tmp_path / "out"
    env = {
        **airflow_env,
        "ANTHROPIC_BASE_URL": emulator_url,
        "ANTHROPIC_API_KEY": "sk-ant-test-airflow",
        "BATCHPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "BATCHPIPE_OUTPUT_DIR": str(out_dir),
    }
    return env, out_dir


def _wrapper(tmp_path: Path, command: str, body: str) -> str:
    """A stand-in for the batchpipe executable that runs ``body`` (sh) the first time it is
    called for ``command`` (its third argument, after --log-format json), else batchpipe."""
    marker = tmp_path / f"{command}-wrapped"
    wrapper = tmp_path / "batchpipe"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$3" = {command} ] && [ ! -e "{marker}" ]; then\n'
        f'  touch "{marker}"; {body}\n'
        "fi\n"
        f'exec "{BATCHPIPE}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def _only_parquet(out_dir: Path) -> Path:
    files = list(out_dir.glob("*.parquet"))
    assert len(files) == 1, files
    assert files[0].name.startswith("classify_reviews-manual")  # named after the DAG run
    return files[0]


def test_dag_runs_to_success_and_writes_the_output(
    airflow_bin: Path,
    airflow_env: dict[str, str],
    slow_emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    emulator, url = slow_emulator
    env, out_dir = _run_env(airflow_env, tmp_path, url)
    by_hand = REPO / "out" / "classify-reviews.parquet"  # the job file's own output
    by_hand_before = by_hand.stat().st_mtime_ns if by_hand.exists() else None
    # The batch ends only once the sensor has looked twice (two retrieves), however slow the
    # machine: then the emulator's clock jumps past the batch's processing time.
    emulator.configure(processing_seconds=3600)
    stop = threading.Event()

    def end_after_two_pokes() -> None:
        while not stop.wait(0.2):
            if emulator.stats()["calls"].get("retrieve", 0) >= 2:
                emulator.advance(3600)
                return

    watcher = threading.Thread(target=end_after_two_pokes, daemon=True)
    watcher.start()
    try:
        rc, logs = _dags_test(airflow_bin, env, tmp_path / "airflow.log")
    finally:
        stop.set()

    assert rc == 0, f"DAG run failed; log in {tmp_path / 'airflow.log'}"
    assert "state=success" in logs
    # Each run writes its own file in the output folder, never the job file's shared one.
    assert (by_hand.stat().st_mtime_ns if by_hand.exists() else None) == by_hand_before
    # Reschedule mode: the sensor is started afresh for each poke, holding no slot between.
    assert "new_state=up_for_reschedule" in logs
    assert logs.count("[DAG TEST] starting task_id=wait") >= 2
    table = pq.read_table(_only_parquet(out_dir))
    assert table.num_rows == ROWS
    assert set(table.column("result_status").to_pylist()) == {"succeeded"}
    assert emulator.stats()["batches_created"] == 1


def test_submit_killed_after_create_is_retried_without_a_second_submission(
    airflow_bin: Path,
    airflow_env: dict[str, str],
    slow_emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    """The first submit dies (kill -9) right after a batch was created; Airflow retries it."""
    emulator, url = slow_emulator
    env, out_dir = _run_env(airflow_env, tmp_path, url)
    env["BATCHPIPE_MAX_BATCH_REQUESTS"] = "200"  # 3 batches: the kill lands after the first
    # A stand-in for the batchpipe executable that arms the failpoint for the first submit only.
    env["BATCHPIPE_BIN"] = _wrapper(
        tmp_path, "submit", "export BATCHPIPE_FAILPOINT=after_mark_created"
    )
    marker = tmp_path / "submit-wrapped"

    rc, logs = _dags_test(airflow_bin, env, tmp_path / "airflow.log")

    assert rc == 0, f"DAG run failed; log in {tmp_path / 'airflow.log'}"
    assert marker.exists()
    assert "batchpipe submit exited -9" in logs
    assert logs.count("[DAG TEST] starting task_id=submit") == 2
    assert "state=success" in logs
    stats = emulator.stats()
    assert stats["batches_created"] == 3  # 500 rows / 200 per batch: none sent twice
    assert stats["requests_received"] == ROWS
    table = pq.read_table(_only_parquet(out_dir))
    assert table.num_rows == ROWS
    assert set(table.column("attempts").to_pylist()) == {1}
    status = subprocess.run(
        [BATCHPIPE, "status", "--json"], env=env, capture_output=True, text=True, check=True
    )
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["status"] == "done"
    assert len(job["batches"]) == 3


def test_an_output_folder_that_cannot_be_written_fails_the_submit_before_any_batch(
    airflow_bin: Path,
    airflow_env: dict[str, str],
    slow_emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    emulator, url = slow_emulator
    emulator.configure(processing_seconds=0)
    env, _ = _run_env(airflow_env, tmp_path, url)
    (tmp_path / "a-file").write_text("not a folder")
    env["BATCHPIPE_OUTPUT_DIR"] = str(tmp_path / "a-file" / "out")

    rc, logs = _dags_test(airflow_bin, env, tmp_path / "airflow.log")

    assert rc != 0, f"DAG run should fail; log in {tmp_path / 'airflow.log'}"
    assert "batchpipe submit failed (exit 2)" in logs
    assert "a-file/out" in logs  # the message names the path
    # Exit 2 is terminal: the submit ran once, not once per retry, and sent nothing.
    assert logs.count("[DAG TEST] starting task_id=submit") == 1
    assert "starting task_id=export" not in logs
    assert emulator.stats()["batches_created"] == 0


def test_a_status_that_cannot_reach_the_database_is_looked_at_again_not_retried(
    airflow_bin: Path,
    airflow_env: dict[str, str],
    slow_emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    """`status` exits 75 while the state database restarts: the sensor pokes again. It used
    to raise, and three such pokes in a 24 h wait failed the run (a new run pays again)."""
    emulator, url = slow_emulator
    emulator.configure(processing_seconds=0)
    env, out_dir = _run_env(airflow_env, tmp_path, url)
    env["BATCHPIPE_BIN"] = _wrapper(
        tmp_path, "status", "echo 'error: cannot reach database' >&2; exit 75"
    )

    rc, logs = _dags_test(airflow_bin, env, tmp_path / "airflow.log")

    assert rc == 0, f"DAG run failed; log in {tmp_path / 'airflow.log'}"
    assert (tmp_path / "status-wrapped").exists()
    assert "error: cannot reach database" in logs
    assert "new_state=up_for_retry" not in logs  # no retry spent on it
    assert logs.count("[DAG TEST] starting task_id=wait") >= 2
    assert pq.read_table(_only_parquet(out_dir)).num_rows == ROWS


def test_a_canceled_job_fails_the_wait_and_the_run(
    airflow_bin: Path,
    airflow_env: dict[str, str],
    slow_emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    """Someone cancels the run's job while the sensor waits. The run used to go green and
    hand downstream a file whose canceled rows have no answers."""
    emulator, url = slow_emulator
    emulator.configure(processing_seconds=3600)
    env, out_dir = _run_env(airflow_env, tmp_path, url)
    stop = threading.Event()

    def cancel_after_a_poke() -> None:
        while not stop.wait(0.2):
            if emulator.stats()["calls"].get("retrieve", 0) >= 1:
                listed = subprocess.run(
                    [BATCHPIPE, "status", "--json"], env=env, capture_output=True, text=True,
                    check=True,
                )  # fmt: skip
                (job,) = json.loads(listed.stdout)["jobs"]
                subprocess.run([BATCHPIPE, "cancel", job["name"]], env=env, check=True)
                return

    canceler = threading.Thread(target=cancel_after_a_poke, daemon=True)
    canceler.start()
    try:
        rc, logs = _dags_test(airflow_bin, env, tmp_path / "airflow.log")
    finally:
        stop.set()

    assert rc != 0, f"DAG run should fail; log in {tmp_path / 'airflow.log'}"
    assert "was canceled" in logs
    assert "`batchpipe export classify_reviews-manual" in logs  # how to get what it answered
    assert "starting task_id=export" not in logs
    assert not list(out_dir.glob("*.parquet"))


def test_submit_retries_outlast_a_lease_left_by_a_worker_killed_elsewhere(
    airflow_bin: Path, airflow_env: dict[str, str]
) -> None:
    """A submit killed on one machine holds its job for the lease's 5 minutes; a retry on
    another machine exits 75 until then. With 2 retries a minute apart the run failed, and
    the way out a user would take (a new run) sends every row again."""
    env = {k: v for k, v in airflow_env.items() if k != "BATCHPIPE_RETRY_SECONDS"}
    code = (
        "from airflow.models.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'jobs' / 'airflow')!r}, include_examples=False)\n"
        "task = bag.dags['classify_reviews'].get_task('submit')\n"
        "print(task.retries * task.retry_delay.total_seconds())\n"
    )
    python = airflow_bin.with_name("python")
    proc = subprocess.run(
        [str(python), "-c", code], env=env, capture_output=True, text=True, check=True
    )
    budget = float(proc.stdout.strip().splitlines()[-1])
    assert budget > LEASE_TTL_SECONDS
