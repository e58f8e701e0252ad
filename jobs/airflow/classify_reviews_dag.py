"""Airflow 3 DAG: classify product reviews through the Message Batches API with batchpipe.

submit → wait (a sensor in reschedule mode: no worker slot is held while the API works,
which takes minutes to 24 hours) → export.

- batchpipe runs as a subprocess (``$BATCHPIPE_BIN``, default ``batchpipe`` on PATH), so
  Airflow's interpreter never imports it and the two can pin different libraries.
- The job name derives from the DAG run (dag_id + run_id, sanitised). batchpipe's database is
  the source of truth: a retried or re-run ``submit`` with the same name resumes the job (and
  recovers a batch whose create was interrupted) instead of submitting again, so Airflow
  retries never pay twice.
- Settings come from the environment, else Airflow Variables: ``BATCHPIPE_CLASSIFY_INPUT`` /
  ``batchpipe_classify_input`` (default: the job file's input), ``BATCHPIPE_OUTPUT_DIR`` /
  ``batchpipe_output_dir`` (default ``/tmp/batchpipe``). ``BATCHPIPE_POKE_SECONDS`` (env,
  default 300) sets how often the sensor looks and ``BATCHPIPE_RETRY_SECONDS`` (default 60)
  how long a failed task waits before its retry; both are read when the DAG is parsed, where
  Variables are best left alone. The subprocess inherits the environment:
  ``BATCHPIPE_DATABASE_URL`` (use PostgreSQL when workers run on several machines),
  ``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``.
- Exit codes: 75 means "try again later": the sensor pokes again (``tick`` or ``status``: the
  API or the database is away for a while), ``submit`` is retried. 1 means the job failed
  for good (or finished with more failed rows than the job file's ``max_failed`` allows;
  its output is written all the same) and 2 that the command or its settings are wrong (e.g.
  an output folder that cannot be written, found by ``submit`` before anything is sent):
  either way the task fails without retrying. A job canceled with ``batchpipe cancel``
  fails ``wait`` too: its output would miss the canceled rows.
- ``submit``'s retries outlast batchpipe's job lease (5 minutes): a submit killed on one
  machine holds the job until its lease runs out, and a retry on another machine must
  still be trying then, or the run fails and a new run pays for every row again.
- Each run writes ``<output dir>/<job name>.parquet``; the job file's own ``output`` is
  only for running it by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.exceptions import AirflowFailException
from airflow.sdk import PokeReturnValue, Variable, dag, get_current_context, task

JOB_FILE = Path(__file__).resolve().parent.parent / "examples" / "classify_reviews.toml"
EXIT_TEMPFAIL = 75
RETRY_DELAY = timedelta(seconds=float(os.environ.get("BATCHPIPE_RETRY_SECONDS", "60")))
# batchpipe's job lease (LEASE_TTL_SECONDS in batchpipe/pipeline/context.py), plus a minute.
LEASE_SECONDS = 300 + 60
SUBMIT_RETRIES = min(max(2, math.ceil(LEASE_SECONDS / RETRY_DELAY.total_seconds())), 30)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _setting(name: str, env: str, default: str) -> str:
    """An environment variable, else an Airflow Variable, else the default."""
    # Env first: Variable.get logs an error for every missing Variable, even with a default.
    if env in os.environ:
        return os.environ[env]
    return str(Variable.get(name, default=default))


def _batchpipe(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run the batchpipe CLI; its log lines go to the task log. Raise on an unexpected exit."""
    cmd = [os.environ.get("BATCHPIPE_BIN", "batchpipe"), "--log-format", "json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.stderr:
        print(proc.stderr.rstrip())  # the task log is where Airflow users look
    if proc.returncode in (1, 2):
        # Terminal (a failed job, or bad settings): retrying the same command cannot help;
        # fail without using up retries.
        raise AirflowFailException(
            f"batchpipe {args[0]} failed (exit {proc.returncode}); see the log above"
        )
    if proc.returncode not in ok:
        raise RuntimeError(f"batchpipe {args[0]} exited {proc.returncode}")
    return proc


def output_path(name: str) -> str:
    """Where the job called ``name`` writes its results: a file per DAG run."""
    out_dir = _setting("batchpipe_output_dir", "BATCHPIPE_OUTPUT_DIR", "/tmp/batchpipe")  # noqa: S108
    return str(Path(out_dir) / f"{name}.parquet")


def job_name_for_run() -> str:
    """A batchpipe job name unique to this DAG run and stable across its task retries."""
    ctx = get_current_context()
    raw = f"{ctx['dag'].dag_id}-{ctx['run_id']}"
    return _UNSAFE.sub("-", raw).strip("-")[:120]


@dag(
    dag_id="classify_reviews",
    schedule=None,
    catchup=False,
    tags=["batchpipe"],
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
)
def classify_reviews() -> None:
    """Label every review positive/negative/mixed and write a Parquet file per run."""

    @task(retries=SUBMIT_RETRIES)
    def submit() -> str:
        """Validate and submit (or resume) this run's job; return its name."""
        name = job_name_for_run()
        # Each run writes its own file (the job file's output is for running it by hand),
        # checked now, before anything is paid for: exit 2 fails the task without retries.
        args = ["submit", "--config", str(JOB_FILE), "--job", name, "-o", output_path(name)]
        input_path = _setting("batchpipe_classify_input", "BATCHPIPE_CLASSIFY_INPUT", "")
        if input_path:
            args.insert(1, input_path)
        # Exit 75 (API unavailable, job busy) raises and Airflow retries; the retry resumes
        # the same job by name, once the lease of a submit killed elsewhere has run out.
        proc = _batchpipe(*args)
        return proc.stdout.strip().splitlines()[-1]

    @task.sensor(
        poke_interval=float(os.environ.get("BATCHPIPE_POKE_SECONDS", "300")),
        timeout=timedelta(hours=30).total_seconds(),  # the API expires batches after 24 h
        mode="reschedule",
    )
    def wait(name: str) -> PokeReturnValue:
        """Advance the job one step; done when batchpipe says it is finished."""
        _batchpipe("tick", "--job", name, ok=(0, EXIT_TEMPFAIL))
        # 75 from status too (the database restarting): look again at the next poke rather
        # than spend a retry, of which a short outage would use up all.
        shown = _batchpipe("status", name, "--json", ok=(0, EXIT_TEMPFAIL))
        if shown.returncode == EXIT_TEMPFAIL:
            return PokeReturnValue(is_done=False)
        job: dict[str, Any] = json.loads(shown.stdout)["jobs"][0]
        print(f"job {name}: {job['status']}, rows {job['counts']}, next: {job['next_action']}")
        if job["status"] in {"failed", "needs_attention"}:
            raise AirflowFailException(f"job {name} is {job['status']}: {job['error']}")
        if job["status"] == "canceled":
            raise AirflowFailException(
                f"job {name} was canceled (rows: {job['counts']}); what it answered can still "
                f"be written with `batchpipe export {name} -o PATH`"
            )
        return PokeReturnValue(is_done=job["status"] == "done", xcom_value=name)

    @task
    def export(name: str) -> str:
        """Make sure the joined results are written; return the file's path.

        The tick that finished the job has written them already; writing them again is
        atomic and cheap next to the wait, and makes this task the one that can be retried
        (or cleared) to rewrite the file.
        """
        path = output_path(name)
        _batchpipe("export", name, "-o", path)
        return path

    export(wait(submit()))


classify_reviews()
