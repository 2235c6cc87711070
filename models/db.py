"""Engine and session factory for one database URL (SQLite file or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings


def make_engine(url: str, **pool: int) -> Engine:
    """`pool`: pool_size and max_overflow of a PostgreSQL engine (SQLAlchemy's defaults otherwise)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # A database that does not answer is an error in seconds (a 503 to the client), not a hung request.
    return create_engine(url, pool_pre_ping=True, pool_timeout=10, connect_args={"connect_timeout": 5}, **pool)


class Database:
    """One engine and its sessions; created lazily in each process (never shared across fork)."""

    def __init__(self, url: str, **pool: int) -> None:
        self.url = url
        self.engine = make_engine(url, **pool)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed at the end of the block, rolled back on error."""
        with self._sessions() as session:
            with session.begin():
                yield session

    def new_session(self) -> Session:
        """A plain session for callers that commit themselves (request-scoped dependencies)."""
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()


@lru_cache(maxsize=1)
def database() -> Database:
    """This process's database (GS_DATABASE_URL), made on first use; the API and the worker share this one."""
    settings = get_settings()
    return Database(
        settings.database_url, pool_size=settings.database_pool_size, max_overflow=settings.database_max_overflow
    )


def forget_database() -> None:
    """In a forked worker child: the next `database()` opens connections of its own, never the parent's."""
    database.cache_clear()


def one_row_changed(result: Result[Any]) -> bool:
    """Whether an UPDATE changed exactly one row: the conditional updates that let one writer win."""
    return cast(CursorResult[Any], result).rowcount == 1
