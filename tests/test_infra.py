"""The test infrastructure itself: the PostgreSQL fixture really gives a working server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa


@pytest.mark.postgres
def test_postgres_fixture_gives_a_fresh_database(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert (
            conn.execute(
                sa.text("select count(*) from pg_tables where schemaname='public'")
            ).scalar()
            == 0
        )
        version = conn.execute(sa.text("show server_version")).scalar()
    engine.dispose()
    assert version is not None
