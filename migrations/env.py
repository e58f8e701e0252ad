"""Alembic environment for batchpipe.

The database URL comes from the alembic Config's ``sqlalchemy.url`` (set programmatically by
``batchpipe.db.upgrade``), else from BATCHPIPE_DATABASE_URL when alembic is run by hand. The
engine is batchpipe's own, so SQLite gets the same pragmas (WAL, busy timeout, foreign keys)
as at run time. Logging is left alone: the application configures it.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from batchpipe.db.connect import BEGIN_IMMEDIATE, create_engine
from batchpipe.db.schema import metadata

config = context.config

# PostgreSQL: a transaction-level advisory lock every migrator takes before it reads the
# schema's revision, so workers that run `db upgrade` at once migrate one after the other
# (the later ones find the head and do nothing) instead of colliding on CREATE TABLE. The
# key is arbitrary but fixed: the bytes of "batchpip" as a signed 64-bit integer.
_PG_MIGRATION_LOCK = int.from_bytes(b"batchpip", "big", signed=True)


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("BATCHPIPE_DATABASE_URL")
    if not url:
        raise RuntimeError("set BATCHPIPE_DATABASE_URL (or sqlalchemy.url) to run migrations")
    return url


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        url=_database_url(),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection, in one transaction where the dialect can."""
    engine = create_engine(_database_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Hold the write lock from the start: concurrent migrators queue up.
                connection.execution_options(**{BEGIN_IMMEDIATE: True})
            context.configure(
                connection=connection,
                target_metadata=metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
                # Alembic takes SQLite's DDL for non-transactional and commits after each
                # revision, so a process opening a new file while another migrates it could
                # see it half way (at 0002 of 0003) and refuse it. SQLite's DDL is
                # transactional (our connections BEGIN explicitly): every revision commits
                # together, and others see a blank file or the head.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Released by the commit (or rollback) that ends the migration.
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
