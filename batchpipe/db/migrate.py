"""Alembic, driven from code: upgrade, downgrade and revision queries.

The migration scripts live in the top-level ``migrations/`` directory next to the package
(found relative to ``batchpipe/__file__``, which holds for the editable install and a source
checkout). ``alembic.ini`` points there too, so ``alembic upgrade head`` by hand works with
BATCHPIPE_DATABASE_URL set.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

import batchpipe
from batchpipe.db.connect import create_engine, describe_error, mask_url
from batchpipe.errors import StoreError

MIGRATIONS_DIR = Path(batchpipe.__file__).resolve().parents[1] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An alembic Config for our scripts; ``url`` goes to ``sqlalchemy.url`` for env.py."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise StoreError(f"alembic migrations not found at {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation would choke on a '%' in a URL-encoded password.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision the code knows (there is exactly one head)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise StoreError(f"expected one migration head, found {len(heads)}: {sorted(heads)}")
    return heads[0]


def newer_schema(url: str, revision: str) -> StoreError | None:
    """The error for a database at a ``revision`` these migrations do not have (a newer
    batchpipe migrated it), or None for a revision they know."""
    try:
        ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        return StoreError(
            f"database {mask_url(url)} is at revision {revision}, which batchpipe "
            f"{batchpipe.__version__} does not know (it knows up to {head_revision()}): a "
            "newer batchpipe migrated it. Upgrade batchpipe to use it; a database is never "
            "migrated back"
        )
    return None


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest revision."""
    _run(url, "upgrade", "head")


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` back to ``revision`` (``base``: no batchpipe tables)."""
    _run(url, "downgrade", revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at; None when it was never migrated."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return revision_of(conn)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(
            f"cannot read the schema revision of database {mask_url(url)}: "
            f"{describe_error(exc, url)}"
        ) from None
    finally:
        engine.dispose()


def revision_of(conn: sa.Connection) -> str | None:
    """The revision recorded in ``alembic_version`` on an open connection."""
    return MigrationContext.configure(conn).get_current_revision()


def _run(url: str, action: str, revision: str) -> None:
    config = alembic_config(url)
    try:
        if action == "upgrade":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)
    except CommandError as exc:
        current = current_revision(url)
        newer = newer_schema(url, current) if current is not None else None
        if newer is not None:
            raise newer from None
        raise StoreError(
            f"migrating database {mask_url(url)} ({action} {revision}) failed: {exc}"
        ) from None
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(
            f"migrating database {mask_url(url)} ({action} {revision}) failed: "
            f"{describe_error(exc, url)}"
        ) from None
