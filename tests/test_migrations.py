"""Migrations are explicit and tested: blank → head matches the models, down and up again,
one head; Store.open's revision checks; no password in any error message."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from batchpipe.db import (
    Store,
    connect,
    current_revision,
    downgrade,
    head_revision,
    mask_url,
    upgrade,
)
from batchpipe.db.migrate import MIGRATIONS_DIR, alembic_config
from batchpipe.db.schema import metadata
from batchpipe.errors import StoreError, StoreUnreachable
from batchpipe.models import ItemStatus

REPO = Path(__file__).resolve().parents[1]
TABLES = {"jobs", "batches", "items", "attempts"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == ["0009"]
    assert head_revision() == "0009"
    assert MIGRATIONS_DIR == REPO / "migrations"


def test_upgrade_matches_models_then_down_and_up_again(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert table_names(db_url) == TABLES | {"alembic_version"}
    assert schema_diff(db_url) == []

    downgrade(db_url)
    assert current_revision(db_url) is None
    assert table_names(db_url) == {"alembic_version"}

    upgrade(db_url)
    assert current_revision(db_url) == "0009"
    assert schema_diff(db_url) == []
    upgrade(db_url)  # already at head: a no-op, not an error
    assert current_revision(db_url) == "0009"


def test_store_open_migrates_a_blank_sqlite_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.db", tmp_path / "touched.db"):
        if path.name == "touched.db":
            path.touch()
        url = f"sqlite:///{path}"
        with Store.open(url) as store:
            assert store.list_jobs() == []
        assert current_revision(url) == head_revision()
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 16_384
        engine.dispose()


def test_a_new_sqlite_file_is_migrated_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every revision commits together: no other process can see the file half migrated."""
    commits: list[str] = []
    make_engine = connect.create_engine

    def counting(url: str) -> sa.Engine:
        engine = make_engine(url)
        sa.event.listen(engine, "commit", lambda _conn: commits.append(url))
        return engine

    monkeypatch.setattr(connect, "create_engine", counting)  # what migrations/env.py calls
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    assert len(commits) == 1
    assert current_revision(url) == head_revision()


def test_concurrent_processes_open_one_new_sqlite_file(tmp_path: Path) -> None:
    """Several workers starting at once on a fresh file: one migrates, the others wait."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    code = f"from batchpipe.db import Store; Store.open({url!r}).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outcomes = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    assert [(err, rc) for err, rc in outcomes if rc != 0] == []
    assert current_revision(url) == head_revision()


@pytest.mark.postgres
def test_concurrent_db_upgrades_of_a_new_postgres_database_all_succeed(postgres_url: str) -> None:
    """Workers that each run `db upgrade` at start-up on one new database: one migrates, the
    others wait for it and find the head. Before the advisory lock, about half of them
    failed (exit 1) on "relation jobs already exists" or the alembic_version type."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "batchpipe", "--db", postgres_url, "db", "upgrade"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outcomes = [(p.communicate(timeout=120), p.returncode) for p in procs]
    assert [(out, rc) for out, rc in outcomes if rc != 0] == []
    assert current_revision(postgres_url) == head_revision()


def test_a_new_file_another_process_is_writing_is_opened_once_it_is_free(tmp_path: Path) -> None:
    """The lock behind the flake of the test above, made on purpose: while another
    connection holds a write lock on a file still in rollback mode, switching it to WAL
    fails at once ("database is locked"), whatever the busy timeout. Store.open waits."""
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE scratch (x)")  # never committed: the file stays blank
    release = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        with Store.open(f"sqlite:///{path}") as store:
            assert store.list_jobs() == []
    finally:
        release.join()
        other.close()
    assert current_revision(f"sqlite:///{path}") == head_revision()


def test_store_open_refuses_an_unmigrated_database(db_url: str) -> None:
    with pytest.raises(StoreError, match=r"batchpipe db upgrade") as err:
        Store.open(db_url, auto_migrate=False)
    assert "revision none" in str(err.value)
    assert "needs 0009" in str(err.value)
    assert current_revision(db_url) is None  # refused without touching it


def test_store_open_never_auto_migrates_postgres(postgres_url: str) -> None:
    with pytest.raises(StoreError, match=r"batchpipe db upgrade"):
        Store.open(postgres_url)
    upgrade(postgres_url)
    Store.open(postgres_url, auto_migrate=False).close()


def test_store_open_refuses_an_outdated_sqlite_file(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0008'")
    engine.dispose()
    with pytest.raises(StoreError, match=r"at revision 0008, batchpipe needs 0009"):
        Store.open(sqlite_url)  # auto_migrate applies to blank files only


def test_a_database_a_newer_batchpipe_migrated_says_to_upgrade_batchpipe(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Before: "run `batchpipe db upgrade`", which then failed with alembic's traceback."""
    upgrade(sqlite_url)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    said = (
        r"is at revision 0099, which batchpipe \S+ does not know \(it knows up to 0009\): a "
        r"newer batchpipe migrated it\. Upgrade batchpipe to use it"
    )
    with pytest.raises(StoreError, match=said):
        Store.open(sqlite_url)
    for command in (["status"], ["db", "upgrade"]):
        ran = subprocess.run(
            [sys.executable, "-m", "batchpipe", "--db", sqlite_url, *command],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert ran.returncode == 1, ran.stderr
        assert re.search(said, ran.stderr), ran.stderr
        assert "Traceback" not in ran.stderr


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:/state.db",
        "notaurl",
        "postgresql+psycopg://u:pw@db.example:543x/db",
        "postgresql+psycopg://u:pa@ss:w0rd@db.example/db",  # an unescaped "@" in the password
    ],
)
def test_a_malformed_database_url_is_a_setting_to_fix(url: str, tmp_path: Path) -> None:
    """Before: a traceback and exit 1 (ValueError for a port that is not a number)."""
    ran = subprocess.run(
        [sys.executable, "-m", "batchpipe", "--db", url, "tick"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "error: invalid database URL " in ran.stderr
    assert "expected a SQLAlchemy URL such as sqlite:///state.db" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert "pw" not in ran.stderr
    assert "w0rd" not in ran.stderr


@pytest.mark.postgres
def test_errors_never_show_the_password() -> None:
    secret = "s3cr3t-Pa55"
    port = closed_port()
    url = f"postgresql+psycopg://batch:{secret}@127.0.0.1:{port}/state"
    assert mask_url(url) == f"postgresql+psycopg://batch:***@127.0.0.1:{port}/state"
    for attempt in (
        lambda: Store.open(url),
        lambda: current_revision(url),
        lambda: upgrade(url),
    ):
        with pytest.raises(StoreError) as err:
            attempt()
        message = str(err.value)
        assert secret not in message
        assert "batch:***@127.0.0.1" in message
        assert err.value.__cause__ is None or secret not in str(err.value.__cause__)


@pytest.mark.postgres
def test_a_server_that_cannot_be_reached_is_try_later_and_a_refusal_is_not(
    postgres_server: str, tmp_path: Path
) -> None:
    down = f"postgresql+psycopg://batch@127.0.0.1:{closed_port()}/state"
    with pytest.raises(StoreUnreachable, match=r"cannot reach database .*try again when") as err:
        Store.open(down)
    assert err.value.exit_code == 75  # cron and Airflow try again later
    # The server answers, and refuses: that is not fixed by waiting.
    with pytest.raises(StoreError, match=r"cannot open database .*nosuchdb") as err:
        Store.open(f"{postgres_server}/nosuchdb")
    assert not isinstance(err.value, StoreUnreachable)
    assert err.value.exit_code == 1
    result = subprocess.run(
        [sys.executable, "-m", "batchpipe", "--db", down, "tick"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 75, result.stderr
    # Settings of the URL that libpq refuses itself, before asking any server: exit 75
    # ("try later") would hide them from cron for good.
    for query in ("sslmode=bogus", "bogus_option=1"):
        with pytest.raises(StoreError, match=r"cannot open database ") as err:
            Store.open(f"{postgres_server}/state?{query}")
        assert not isinstance(err.value, StoreUnreachable), query


def test_mask_url_without_password() -> None:
    assert mask_url("sqlite:///state.db") == "sqlite:///state.db"
    assert mask_url("not a url") == "not a url"  # nothing to hide: shown as given
    assert mask_url("postgresql://u:pa:ss@db:54x/d") == "postgresql://***"


def test_alembic_command_line_uses_the_environment_url(tmp_path: Path) -> None:
    """By hand: `alembic upgrade head` from the repo with BATCHPIPE_DATABASE_URL set."""
    url = f"sqlite:///{tmp_path / 'by-hand.db'}"
    env = {**os.environ, "BATCHPIPE_DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert current_revision(url) == "0009"


NOW = "2026-01-01 00:00:00"


def _job_one_at(db_url: str, revision: str, *, rows: int) -> sa.Engine:
    """A database at ``revision`` (migrated down from head) holding job 1 of ``rows`` rows;
    an engine on it, which the caller disposes of."""
    upgrade(db_url)
    downgrade(db_url, revision)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, name, token, status, spec, row_count, invalid_count, "
            f"created_at, updated_at) VALUES (1, 'j', 'tok', 'running', '{{}}', {rows}, 0, "
            f"'{NOW}', '{NOW}')"
        )
    return engine


def test_0004_gives_existing_batches_the_row_span_of_their_items(db_url: str) -> None:
    """Batches from before 0004 are found by their items' rows once the index is gone."""
    engine = _job_one_at(db_url, "0003", rows=9)
    with engine.begin() as conn:
        for batch in (1, 2):
            conn.exec_driver_sql(
                "INSERT INTO batches (id, job_id, status, round, request_count, "
                "request_bytes, first_custom_id, last_custom_id, intent_at) VALUES "
                f"({batch}, 1, 'in_progress', 1, 3, 9, 'a', 'b', '{NOW}')"
            )
        for row, batch in [(0, None), (2, 1), (3, 1), (6, 1), (7, None)]:
            conn.exec_driver_sql(
                "INSERT INTO items (job_id, row_index, row_key, status, attempts, batch_id) "
                f"VALUES (1, {row}, 'k{row}', 'submitted', 1, {batch or 'NULL'})"
            )
    engine.dispose()
    upgrade(db_url)
    assert schema_diff(db_url) == []
    with Store.open(db_url, auto_migrate=False) as store:
        assert [i.row_index for i in store.iter_batch_items(1)] == [2, 3, 6]
        assert list(store.iter_batch_items(2)) == []  # no items left: NULL span, job scan
        assert store.requeue_batch_leftovers(1) == 3


def test_0007_drops_request_hash_and_keeps_every_item(db_url: str) -> None:
    """Items written before 0007 (with their hashes) keep their state and answers."""
    engine = _job_one_at(db_url, "0006", rows=2)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO items (job_id, row_index, row_key, status, attempts, request_hash, "
            "response_text, cost_usd) VALUES (1, 0, 'a', 'succeeded', 1, 'h0', 'yes', 0.5), "
            "(1, 1, 'b', 'pending', 0, 'h1', NULL, NULL)"
        )
    engine.dispose()
    upgrade(db_url)
    assert schema_diff(db_url) == []
    with Store.open(db_url, auto_migrate=False) as store:
        got = [(i.row_key, i.status, i.response_text, i.cost_usd) for i in store.iter_items(1)]
        assert got == [
            ("a", ItemStatus.SUCCEEDED, "yes", 0.5),
            ("b", ItemStatus.PENDING, None, None),
        ]


def test_0009_counts_every_earlier_job_as_sent_to_the_api(db_url: str) -> None:
    """Which jobs of an older database were emulated is recorded nowhere: all count as real,
    so a real command goes on with them as it did before the upgrade."""
    _job_one_at(db_url, "0008", rows=0).dispose()
    upgrade(db_url)
    assert schema_diff(db_url) == []
    with Store.open(db_url, auto_migrate=False) as store:
        job = store.get_job(1)
        assert job is not None
        assert job.emulated is False
