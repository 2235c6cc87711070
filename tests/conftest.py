"""Shared fixtures: the real PostgreSQL and Redis of this machine, and running service stacks.

A missing PostgreSQL or Redis is a failure, never a skip: CI must not pass by testing less.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("GS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GS_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
ADMIN_TOKEN = "test-admin-token"

# In-process tests (tests/api) get a private embedded default; set before anything imports settings.
_IN_PROCESS_VAR = Path(tempfile.mkdtemp(prefix="gs-test-var-"))
os.environ.setdefault("GS_VAR_DIR", str(_IN_PROCESS_VAR))
os.environ.setdefault("GS_DATABASE_URL", f"sqlite:///{_IN_PROCESS_VAR / 'gs.sqlite3'}")
os.environ.setdefault("GS_ADMIN_TOKEN", ADMIN_TOKEN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def scratch_postgres(name: str) -> str:
    """A new empty database `name` on the test server (dropped first if it exists)."""
    import psycopg

    base = require_postgres()
    with psycopg.connect(base.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + f"/{name}"


class Stack:
    """`scripts/serve.py` (API + supervised worker) in a subprocess, and an HTTP client for it."""

    def __init__(self, name: str, env: dict[str, str], var_dir: Path) -> None:
        self.name, self.var_dir = name, var_dir
        self.port = free_port()
        self.env = {**os.environ, **env, "GS_PORT": str(self.port), "GS_VAR_DIR": str(var_dir),
                    "GS_ADMIN_TOKEN": ADMIN_TOKEN, "GS_CANCEL_POLL_S": "0.2"}
        self.log_path = var_dir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def start(self, timeout_s: float = 90, probe: str = "/readyz") -> Stack:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py")], cwd=ROOT, env=self.env, stdout=log, stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} stack exited:\n{self.log()}")
            try:
                if self.client.get(probe).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} stack not ready in {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.client.close()

    def wait_for(self, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        job = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} is {job.get('status')} after {timeout_s}s\n{self.log()}")


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory) -> Iterator[Stack]:
    var_dir = tmp_path_factory.mktemp("embedded")
    stack = Stack(
        "embedded",
        {"GS_DATABASE_URL": f"sqlite:///{var_dir / 'gs.sqlite3'}", "GS_BROKER_URL": "filesystem://"},
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
    stack = Stack("postgres+redis", {"GS_DATABASE_URL": postgres, "GS_BROKER_URL": broker},
                  tmp_path_factory.mktemp("services"))
    yield stack.start()
    stack.stop()


@pytest.fixture(params=["embedded", "postgres+redis"])
def stack(request) -> Stack:
    """Each test using this runs twice: on the embedded default and on PostgreSQL + Redis."""
    return request.getfixturevalue("embedded_stack" if request.param == "embedded" else "services_stack")
