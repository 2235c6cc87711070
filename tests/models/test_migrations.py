"""`alembic upgrade head` on an empty database gives exactly the tables the models declare."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from models.db import make_engine
from models.migrate import upgrade
from models.tables import Base
from tests.conftest import require_postgres

SCRATCH_DB = "gs_migration_check"


@pytest.fixture
def empty_postgres_url():
    import psycopg

    base = require_postgres()
    admin = base.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {SCRATCH_DB}")
    yield base.rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")


@pytest.fixture
def empty_sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'empty.sqlite3'}"


@pytest.mark.parametrize("url_fixture", ["empty_sqlite_url", "empty_postgres_url"])
def test_upgrade_head_matches_the_models(request, url_fixture):
    url = request.getfixturevalue(url_fixture)
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
