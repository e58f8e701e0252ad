"""All shared fixtures: temporary SQLite files, a real PostgreSQL server, the emulator.

PostgreSQL: the session starts its own server from Debian's packages (initdb refuses to run
as root, so as root it runs as the ``postgres`` user) on a free loopback port, and every test
that asks for ``postgres_url`` gets a fresh database in it. Without PostgreSQL installed the
tests that need it are skipped, unless BATCHPIPE_REQUIRE_POSTGRES=1 (as in CI), where that
is an error.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# ---------------------------------------------------------------- generic helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL for a new SQLite file."""
    return f"sqlite:///{tmp_path / 'state.db'}"


# ---------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    exe = shutil.which("initdb")
    return os.path.dirname(exe) if exe else None


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Start a throw-away PostgreSQL server; yield its base URL (no database name)."""
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("BATCHPIPE_REQUIRE_POSTGRES") == "1":
            pytest.fail(
                "PostgreSQL is required (BATCHPIPE_REQUIRE_POSTGRES=1) but initdb was not found"
            )
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="batchpipe-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_pg_user(
            [f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_pg_user(
            [
                f"{bindir}/pg_ctl",
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_pg_user([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            check=False,  # best effort: the data directory is removed either way
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A SQLAlchemy URL for a new, empty database on the session's PostgreSQL server."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


# ---------------------------------------------------------------- emulator
# (fixtures for the in-process and loopback emulator live here too)
# The emulator and the SDK are imported inside the fixtures, so tests that never use them
# do not pay for the imports.

if TYPE_CHECKING:
    import anthropic

    from batchpipe.emulator import Emulator, EmulatorServer


@pytest.fixture
def emulator() -> Emulator:
    """A fresh in-memory emulator (seed 0; batches end 2 s after create on its clock)."""
    from batchpipe.emulator import Emulator, EmulatorConfig

    return Emulator(EmulatorConfig(seed=0))


@pytest.fixture
def emulator_server(emulator: Emulator) -> Iterator[EmulatorServer]:
    """The ``emulator`` fixture served over real HTTP on 127.0.0.1 (``.url``)."""
    from batchpipe.emulator import EmulatorServer

    with EmulatorServer(emulator, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
def anthropic_client(emulator_server: EmulatorServer) -> Iterator[anthropic.Anthropic]:
    """An official SDK client pointed at ``emulator_server`` over loopback (no retries)."""
    import anthropic

    client = anthropic.Anthropic(api_key="test", base_url=emulator_server.url, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def inprocess_client(emulator: Emulator) -> Iterator[anthropic.Anthropic]:
    """An official SDK client calling ``emulator`` in-process (httpx2 WSGI transport)."""
    import anthropic

    from batchpipe.emulator import IN_PROCESS_BASE_URL

    client = anthropic.Anthropic(
        api_key="test",
        base_url=IN_PROCESS_BASE_URL,
        http_client=emulator.http_client(),
        max_retries=0,
    )
    yield client
    client.close()


# ---------------------------------------------------------------- batchpipe subprocesses


def batchpipe_argv(db_url: str, *args: str) -> list[str]:
    """argv that runs the real `batchpipe` CLI (this interpreter) on the state database."""
    import sys

    return [sys.executable, "-m", "batchpipe", "--db", db_url, "--log-format", "json", *args]


def job_args(src: Path, name: str, output: Path | None = None, per_batch: int = 20) -> list[str]:
    """`run`/`submit` arguments for a small classification job over ``write_rows`` data."""
    args = [
        str(src),
        "--job", name,
        "--prompt", "Classify: {{ body }}",
        "--model", "claude-haiku-4-5",
        "--max-tokens", "32",
        "--id-column", "doc_id",
        "--poll-interval", "0.1",
        "--max-batch-requests", str(per_batch),
    ]  # fmt: skip
    return [*args, "-o", str(output)] if output else args


def run_batchpipe(
    db_url: str, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real `batchpipe` CLI in a subprocess and capture its output."""
    return subprocess.run(
        batchpipe_argv(db_url, *args),
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def write_rows(path: Path, n: int) -> None:
    """n JSONL rows with a unique ``doc_id`` and a ``body`` to prompt with."""
    import orjson

    rows = (
        {"doc_id": f"d{i:05d}", "body": f"review {i}: {'good' if i % 3 else 'bad'}"}
        for i in range(n)
    )
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def env_for(base_url: str) -> dict[str, str]:
    """Environment for `batchpipe` subprocesses talking to the emulator at ``base_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHPIPE_")}
    env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="sk-test-key")
    return env


@pytest.fixture
def cli_env(emulator_server: EmulatorServer) -> dict[str, str]:
    """Environment for `batchpipe` subprocesses talking to ``emulator_server`` over loopback."""
    return env_for(emulator_server.url)
