"""Shared fixtures: the real PostgreSQL and Redis of this machine, and running service stacks.

A missing PostgreSQL or Redis is a failure, never a skip: CI must not pass by testing less.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.stack import ADMIN_TOKEN, Stack, free_port  # noqa: F401 (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("GS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GS_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")

# One OpenMP thread per process, in this process and in every stack and worker the tests start (they inherit it),
# set before torch is imported. The suite runs several processes at once on two cores (pytest, each stack's API and
# worker, the embedded broker's polling): with torch's default of one thread per core their OpenMP threads spin
# against each other. Measured here under load: the killed-ResNet drill in test_faults took 56-314 s with the
# default and 23-25 s with one thread; 500 steps of the paper's two moons in this process 13.9 s against 1.5 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# In-process tests (tests/api) get a private embedded default; set before anything imports settings.
_IN_PROCESS_VAR = Path(tempfile.mkdtemp(prefix="gs-test-var-"))
os.environ.setdefault("GS_VAR_DIR", str(_IN_PROCESS_VAR))
os.environ.setdefault("GS_DATABASE_URL", f"sqlite:///{_IN_PROCESS_VAR / 'gs.sqlite3'}")
os.environ.setdefault("GS_ADMIN_TOKEN", ADMIN_TOKEN)
# glibc's resolver, here and in every stack the tests start: one try of one second. This machine has no
# internet, and its resolver answers a thread's first lookup of a name only after its 5 s default timeout;
# the fuzzer's callback URLs (https://0.com, from each of the server's threads) spent minutes on that.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")


def require_postgres() -> str:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3):
            pass
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable ({exc}); start it (see README).")
    return POSTGRES_URL


def require_redis() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({exc}); start it (see README).")
    return REDIS_URL


def reset_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")


def scratch_redis(db: int) -> str:
    """Redis database `db` on the test server, emptied: a broker of one test module's own, whose jobs no other
    stack's worker takes."""
    import redis

    url = require_redis().rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def scratch_postgres(name: str) -> str:
    """A new empty database `name` on the test server (dropped first if it exists)."""
    import psycopg
    from psycopg import sql

    base = require_postgres()
    with psycopg.connect(base.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return base.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory) -> Iterator[Stack]:
    var_dir = tmp_path_factory.mktemp("embedded")
    stack = Stack(
        "embedded",
        {"GS_DATABASE_URL": f"sqlite:///{var_dir / 'gs.sqlite3'}", "GS_BROKER_URL": "filesystem://",
         "GS_DATA_DIR": str(var_dir / "data"),  # image folders the tests register
         # The MLflow test exports to a local file store; deployments allow http(s) only.
         "GS_MLFLOW_ALLOWED_SCHEMES": "http,https,file", "MLFLOW_ALLOW_FILE_STORE": "true"},
        var_dir,
    )
    yield stack.start()
    stack.stop()


@pytest.fixture(scope="session")
def services_stack(tmp_path_factory) -> Iterator[Stack]:
    import redis

    postgres, broker = require_postgres(), require_redis()
    reset_postgres(postgres)
    redis.Redis.from_url(broker).flushdb()
    var_dir = tmp_path_factory.mktemp("services")
    stack = Stack("postgres+redis", {"GS_DATABASE_URL": postgres, "GS_BROKER_URL": broker,
                                     "GS_DATA_DIR": str(var_dir / "data")}, var_dir)
    yield stack.start()
    stack.stop()


@pytest.fixture(params=["embedded", "postgres+redis"])
def stack(request) -> Stack:
    """Each test using this runs twice: on the embedded default and on PostgreSQL + Redis."""
    return request.getfixturevalue("embedded_stack" if request.param == "embedded" else "services_stack")
