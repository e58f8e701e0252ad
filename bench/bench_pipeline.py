"""Benchmark: batchpipe end to end beside the floor, against the emulator in its own process.

One run: generate the dataset if missing (bench/gen_data.py), start ``batchpipe emulator``
(processing time 0), run the floor (bench/floor.py) and then ``batchpipe run`` as child
processes, each measured by ``os.wait4`` (CPU user+sys seconds, peak RSS) with a psutil
sampler for CPU per stage. Stages come from batchpipe's JSON log lines: ingest (start to
``job.ingested``, including interpreter start-up), submit (to the last ``batch.submitted``),
collect (to the last ``batch.collected``; includes the emulator answering), export (to
``job.exported``). Prints rows/s and CPU seconds per stage, totals, and the batchpipe/floor
CPU ratio. The emulator's own CPU is not counted for either side.

    .venv/bin/python bench/bench_pipeline.py --rows 100000 --db sqlite
    .venv/bin/python bench/bench_pipeline.py --rows 1000000 --db postgres
    .venv/bin/python bench/bench_pipeline.py --rows 100000 --repeat 5   # median of 5 rounds

With ``--repeat N`` each round runs the floor and then batchpipe (a new job in a new state
database: a file, or a PostgreSQL database of its own) back to back, so both see the
machine at the same speed; the rounds' ratios are printed as they finish, then the median
round's table and the median, min and max.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx2
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_data import default_path

HERE = Path(__file__).resolve().parent
PROMPT = "Summarize in one line: {{ body }}"
MIB = 1024 * 1024


@dataclass
class Measured:
    """What one child process cost."""

    wall: float
    cpu: float
    peak_rss: int
    # of cpu, the seconds spent in the kernel (I/O, page faults) for the process
    sys_cpu: float = 0.0
    # (epoch, cpu seconds, rss bytes), sampled every 50 ms
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def cpu_at(self, when: float) -> float:
        """CPU seconds used by ``when`` (epoch), from the nearest earlier sample."""
        used = 0.0
        for at, cpu, _ in self.samples:
            if at > when:
                break
            used = cpu
        return used

    def rss_between(self, begin: float, end: float) -> int:
        """Peak sampled RSS in [begin, end] (epoch seconds)."""
        return max((rss for at, _, rss in self.samples if begin <= at <= end), default=0)


def measure(cmd: list[str], env: dict[str, str], stderr: Path) -> Measured:
    """Run ``cmd`` to completion; its own CPU (user+sys) and peak RSS from wait4."""
    with stderr.open("wb") as err:
        started = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        samples: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            try:
                ps = psutil.Process(proc.pid)
                while not stop.is_set():
                    t = ps.cpu_times()
                    samples.append((time.time(), t.user + t.system, ps.memory_info().rss))
                    time.sleep(0.05)
            except psutil.Error:
                return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 reaps the child and gives exactly its rusage (not other children's).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - started
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        tail = stderr.read_text()[-3000:]
        sys.exit(f"{cmd[2:4]} failed ({proc.returncode}); see {stderr}:\n{tail}")
    samples.insert(0, (started, 0.0, 0))
    cpu = usage.ru_utime + usage.ru_stime
    samples.append((time.time(), cpu, 0))
    return Measured(wall, cpu, usage.ru_maxrss * 1024, usage.ru_stime, samples)


@contextmanager
def emulator() -> Iterator[str]:
    """``batchpipe emulator`` in its own process; yields its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "batchpipe", "emulator", "--port", "0", "--processing-seconds", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    url = server.stdout.readline().strip()
    try:
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg_user(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (as tests/conftest.py starts one); yields a URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = os.path.dirname(str(found[-1]))
    root = Path(tempfile.mkdtemp(prefix="batchpipe-bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(
        _as_pg_user([f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    log = str(root / "log")
    subprocess.run(
        _as_pg_user([f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-l", log, "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_pg_user([f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def stage_times(log_path: Path, started: float) -> dict[str, tuple[float, float]]:
    """(start, end) epoch seconds of each stage, from batchpipe's JSON log lines."""
    ends: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        stage = {
            "job.ingested": "ingest",
            "batch.submitted": "submit",
            "batch.collected": "collect",
            "job.exported": "export",
        }.get(entry.get("event", ""))
        if stage is not None:
            ends[stage] = max(ends.get(stage, 0.0), at)
    out: dict[str, tuple[float, float]] = {}
    begin = started
    for stage in ("ingest", "submit", "collect", "export"):
        end = ends.get(stage, begin)
        out[stage] = (begin, end)
        begin = end
    return out


@dataclass
class Round:
    """One floor run and one batchpipe run, back to back."""

    floor: Measured | None
    batchpipe: Measured
    stages: dict[str, tuple[float, float]]

    @property
    def ratio(self) -> float | None:
        """batchpipe CPU / floor CPU (None without a floor)."""
        return self.batchpipe.cpu / self.floor.cpu if self.floor is not None else None


def one_round(
    index: int, data: Path, work: Path, url: str, env: dict[str, str], pg_url: str | None,
    skip_floor: bool,
) -> Round:  # fmt: skip
    """Run the floor, then ``batchpipe run`` as a new job in a new state database."""
    floor = None
    if not skip_floor:
        floor = measure(
            [sys.executable, str(HERE / "floor.py"), str(data), str(work / "floor.parquet")],
            env,
            work / f"floor-{index}.log",
        )
    httpx2.post(f"{url}/_emulator/reset")  # free the batches of the runs before
    if pg_url is not None:
        # A database of its own per round, as SQLite gets a file: no round runs on the
        # items of the ones before.
        server, _, _ = pg_url.rpartition("/")
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE bench_{index}")
        db_url = f"{server}/bench_{index}"
        subprocess.run(
            [sys.executable, "-m", "batchpipe", "--db", db_url, "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
        )
    else:
        state = work / f"bench-{index}.db"
        for suffix in ("", "-wal", "-shm"):
            # A --workdir used before holds the finished job: the round would only export.
            state.with_name(state.name + suffix).unlink(missing_ok=True)
        db_url = f"sqlite:///{state}"
    run_cmd = [
        sys.executable, "-m", "batchpipe", "--db", db_url, "--log-format", "json",
        "run", str(data), "--job", f"bench-{index}", "--prompt", PROMPT,
        "--model", "claude-haiku-4-5", "--max-tokens", "32", "--id-column", "doc_id",
        "-o", str(work / "out.parquet"), "--poll-interval", "0.2",
    ]  # fmt: skip
    started = time.time()
    log_path = work / f"batchpipe-{index}.log"
    bp = measure(run_cmd, env, log_path)
    return Round(floor, bp, stage_times(log_path, started))


def report(rows: int, chosen: Round) -> None:
    """The stage table and totals of one round."""
    bp, floor = chosen.batchpipe, chosen.floor
    print(f"{'stage':10} {'wall s':>8} {'rows/s':>10} {'cpu s':>8} {'peak RSS MiB':>13}")
    for stage, (begin, end) in chosen.stages.items():
        wall = max(end - begin, 1e-9)
        cpu = bp.cpu_at(end) - bp.cpu_at(begin)
        rss = bp.rss_between(begin, end) / MIB
        print(f"{stage:10} {wall:8.2f} {rows / wall:10,.0f} {cpu:8.2f} {rss:13.0f}")
    rss = bp.peak_rss / MIB
    print(
        f"batchpipe  wall {bp.wall:7.2f} s  cpu {bp.cpu:7.2f} s (sys {bp.sys_cpu:5.2f})  "
        f"peak RSS {rss:6.0f} MiB"
    )
    if floor is not None:
        print(
            f"floor      wall {floor.wall:7.2f} s  cpu {floor.cpu:7.2f} s "
            f"(sys {floor.sys_cpu:5.2f})  peak RSS {floor.peak_rss / MIB:6.0f} MiB"
        )
        print(f"ratio (batchpipe cpu / floor cpu)  {chosen.ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--skip-floor", action="store_true", help="run batchpipe only")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of floor + batchpipe; the machine's speed drifts, so compare the "
        "median ratio of several (the table shows the median round)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    data = default_path(args.rows)
    if not data.exists():
        print(f"generating {data} …", flush=True)
        # In a child process: a child's peak RSS from wait4 is at least its parent's peak
        # at the fork (Linux keeps the old memory's high-water mark across exec), so
        # generating here put this script's ~360 MiB into every batchpipe run's peak.
        subprocess.run(
            [sys.executable, str(HERE / "gen_data.py"), "--rows", str(args.rows)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="batchpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db_cm = postgres() if args.db == "postgres" else None
    rounds: list[Round] = []
    with emulator() as url, db_cm if db_cm is not None else _null() as pg_url:
        env = {**os.environ, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "bench"}
        for index in range(args.repeat):
            rounds.append(one_round(index, data, work, url, env, pg_url, args.skip_floor))
            done = rounds[-1]
            if args.repeat > 1:
                floor_cpu = f"{done.floor.cpu:6.2f} s" if done.floor else "   -"
                ratio = f"{done.ratio:.2f}" if done.ratio is not None else "-"
                print(
                    f"round {index + 1}: batchpipe cpu {done.batchpipe.cpu:6.2f} s  "
                    f"floor cpu {floor_cpu}  ratio {ratio}",
                    flush=True,
                )

    print(f"rows {args.rows:,}  db {args.db}  input {data.name}  work {work}")
    by_ratio = sorted(rounds, key=lambda r: r.ratio or r.batchpipe.cpu)
    median = by_ratio[(len(by_ratio) - 1) // 2]  # of an even count, the lower middle round
    report(args.rows, median)
    if len(rounds) > 1 and median.ratio is not None:
        ratios = [r.ratio for r in by_ratio if r.ratio is not None]
        print(
            f"ratio over {len(ratios)} rounds: median {median.ratio:.2f}  "
            f"min {min(ratios):.2f}  max {max(ratios):.2f}"
        )


@contextmanager
def _null() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
