"""Engines for SQLite and PostgreSQL, and URLs that are safe to show.

Every message that names a database goes through :func:`mask_url`, and every driver error
that reaches a user goes through :func:`describe_error`, which also scrubs the password in
case a driver echoes it back.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from batchpipe.errors import UsageError

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_PAGE_BYTES = 16_384


def parse_url(url: str | URL) -> URL:
    """``url`` parsed; UsageError (exit 2: a setting to fix) when it is not a URL SQLAlchemy
    reads, such as ``sqlite:/state.db`` or a port that is not a number."""
    if not isinstance(url, str):
        return url
    try:
        return make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # Not the parser's words: they may quote part of a password ("invalid literal for
        # int(): 'w0rd@db'" for an unescaped ':' in it).
        raise UsageError(
            f"invalid database URL {mask_url(url)}: expected a SQLAlchemy URL such as "
            "sqlite:///state.db or postgresql+psycopg://user@host:5432/db, with a number for "
            "the port and any '@', ':' or '/' in the password percent-encoded (--db, "
            "BATCHPIPE_DATABASE_URL)"
        ) from None


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (sa.exc.ArgumentError, ValueError):
        # Unparseable: show only the scheme, never the rest, when it may hold a password.
        text = str(url)
        if "@" not in text:
            return text
        return text.split("://", 1)[0] + "://***" if "://" in text else "***"
    return parsed.render_as_string(hide_password=True)


_STATEMENT_ECHO = re.compile(r"\s*(LINE \d+:|\^\s*$)")


def describe_error(exc: BaseException, url: str | URL) -> str:
    """A one-line reason for a driver error, with the URL's password scrubbed out."""
    orig = getattr(exc, "orig", None)
    reason = str(orig if orig is not None else exc).strip().splitlines()
    # PostgreSQL quotes the statement it stopped at ("LINE 1: UPDATE items SET …" and a caret
    # line under it): SQL is no help to a user and has no place in a one-line message.
    kept = [line.strip() for line in reason if line.strip() and not _STATEMENT_ECHO.match(line)]
    text = " ".join(kept) or type(exc).__name__
    try:
        password = (make_url(url) if isinstance(url, str) else url).password
    except (sa.exc.ArgumentError, ValueError):
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


# Refusals by a server that is up but cannot take connections yet (or right now).
_BUSY_SERVER = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many clients already",
)


# libpq's refusals of the URL's own settings, before any server is asked (no FATAL): waiting
# never fixes them, and exit 75 would keep cron from ever saying so.
_CLIENT_SETTINGS = (
    "invalid sslmode value",
    "no password supplied",
    "invalid connection option",
    "invalid port number",
    "invalid integer value",
    "invalid value for parameter",
)


def unavailable(exc: sa.exc.SQLAlchemyError) -> bool:
    """Whether trying again later may help (StoreUnreachable, exit 75 for cron and Airflow).

    Yes when the connection was lost under a statement (the server restarted or failed
    over, the network dropped: SQLAlchemy's dialect recognised a disconnect, and the
    transaction is rolled back), when PostgreSQL gave no answer to a connect (refused,
    timed out, unknown host), or when it is not taking connections yet. No for a refusal
    that stands (a wrong password, a missing database or role): libpq reports those as
    FATAL, and psycopg attaches no SQLSTATE to connection failures to tell them apart by;
    nor for a setting of the URL that libpq refuses itself (``_CLIENT_SETTINGS``).
    No for an error of a statement on a live connection (a full disk, a deadlock, a
    statement timeout): those carry a SQLSTATE, and waiting is not known to fix them.
    """
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    if not isinstance(exc, sa.exc.OperationalError) or orig is None:
        return False
    if not type(orig).__module__.startswith("psycopg") or getattr(orig, "sqlstate", None):
        return False
    text = str(orig)
    if any(setting in text for setting in _CLIENT_SETTINGS):
        return False
    return "FATAL:" not in text or any(busy in text for busy in _BUSY_SERVER)


# SQLite's primary result codes for a lock held by another connection (an extended code such
# as SQLITE_BUSY_SNAPSHOT keeps its primary code in the low byte).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def locked(exc: sa.exc.SQLAlchemyError) -> bool:
    """Whether SQLite refused a statement because another connection holds a lock on the file.

    Store transactions that write take the lock up front and wait for it (the busy timeout),
    so this is what is left: a writer that kept the file longer than the busy timeout. The
    work was rolled back, and trying again later helps (StoreBusy, exit 75).
    """
    orig = getattr(exc, "orig", None)
    if not isinstance(orig, sqlite3.OperationalError):
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "database is locked" in str(orig)


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL; None for other dialects and in-memory databases."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: WAL (readers never block the writer), a generous busy
    timeout (several workers may share a file) and enforced foreign keys (off by default)."""
    assert isinstance(dbapi_connection, sqlite3.Connection)
    # Take transaction control away from the sqlite3 module (which never BEGINs before DDL
    # or SELECT): _on_sqlite_begin emits BEGIN itself, so migrations are atomic and a
    # transaction's reads see one snapshot.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # Takes effect only on a new, empty file (before WAL is on), a no-op on any other:
        # 16 KiB pages cost SQLite 11% less CPU for a million items' insert, claim and
        # results than the default 4 KiB (bench/store_floor.py: 9.55 s -> 8.48 s).
        cursor.execute(f"PRAGMA page_size = {SQLITE_PAGE_BYTES}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL makes NORMAL durable against application crashes; only power loss can drop
        # the last transactions, which the pipeline redoes idempotently anyway.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


# Execution option asking for BEGIN IMMEDIATE (take the write lock up front).
BEGIN_IMMEDIATE = "batchpipe_begin_immediate"


def _on_sqlite_begin(conn: sa.Connection) -> None:
    """Start every SQLAlchemy transaction with an explicit BEGIN.

    Deferred for transactions that only read, so they never wait for a writer. Those that
    write ask for BEGIN IMMEDIATE (the Store's ``_write``, and migrations, which read the
    version table first): a deferred transaction that has read cannot take the write lock
    once another connection wrote after its snapshot began; SQLite then fails at once with
    "database is locked" instead of waiting on the busy timeout. Taken up front, the lock
    is waited for, and the transaction reads what the last writer committed.
    """
    immediate = conn.get_execution_options().get(BEGIN_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: str) -> Engine:
    """An engine with batchpipe's per-dialect settings. Does not connect yet."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        # The sqlite3 module's own timeout is its busy handler; keep it in step with the pragma.
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    elif backend == "postgresql":
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        # A URL we cannot use is the user's to fix (exit 2), not a broken database.
        raise UsageError(
            f"cannot use database {mask_url(parsed)}: {exc}; expected a SQLAlchemy URL such "
            "as sqlite:///state.db or postgresql+psycopg://user@host/db"
        ) from None
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _on_sqlite_connect)
        sa.event.listen(engine, "begin", _on_sqlite_begin)
    return engine
