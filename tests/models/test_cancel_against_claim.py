"""A cancel answered 202 is never lost to a worker's claim at the same moment, in either order, on PostgreSQL.

Two connections, interleaved by the row lock itself: the second statement runs in a thread, the test waits
until PostgreSQL reports it waiting on a lock, then commits the first.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models import jobs as jobs_repo
from models.db import make_engine
from models.migrate import upgrade
from models.status import JobStatus
from tests.conftest import POSTGRES_URL, scratch_postgres


@pytest.fixture(scope="module")
def sessions() -> Iterator[sessionmaker[Session]]:
    url = scratch_postgres(POSTGRES_URL.rsplit("/", 1)[-1] + "_claims")
    upgrade(url)
    engine = make_engine(url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def job_id(sessions) -> str:
    with sessions.begin() as session:
        job = jobs_repo.create(session, owner_id="tenant", kind="train", spec={}, tags={}, queue="cpu",
                               callback_url=None)
        return job.id


def backend_pid(session: Session) -> int:
    return session.scalar(text("SELECT pg_backend_pid()"))


def blocked_behind_a_lock(session: Session, call: Callable[[], Any], observer: Session) -> Callable[[], Any]:
    """Start `call` (a statement of `session`) in a thread, return once PostgreSQL has it waiting on a row
    lock; the returned function joins the thread and gives the call's result."""
    pid, outcome = backend_pid(session), {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", call()))
    thread.start()
    deadline = time.monotonic() + 10
    while observer.scalar(text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                          {"pid": pid}) != "Lock":
        assert thread.is_alive() and time.monotonic() < deadline, "the statement did not wait for the row lock"
        observer.rollback()  # a fresh snapshot of pg_stat_activity on the next read
    return lambda: (thread.join(10), outcome["result"])[1]


def test_a_cancel_read_before_a_claim_and_written_after_it_asks_the_running_job_to_stop(sessions, job_id):
    with sessions() as api, sessions() as worker, sessions() as observer:
        job = jobs_repo.get(api, job_id)
        assert job.status == JobStatus.QUEUED  # what the cancel route saw
        assert jobs_repo.claim(worker, job_id, "worker-1")  # not committed yet: the row stays locked
        cancel_result = blocked_behind_a_lock(api, lambda: jobs_repo.request_cancel(api, job), observer)
        worker.commit()
        assert cancel_result() is True
        api.commit()
        assert job.status == JobStatus.RUNNING and job.cancel_requested  # the 202's body tells the truth
        assert jobs_repo.cancel_requested(worker, job_id)  # the flag the running job polls


def test_a_claim_after_a_cancel_finds_nothing_to_run(sessions, job_id):
    with sessions() as api, sessions() as worker, sessions() as observer:
        job = jobs_repo.get(api, job_id)
        assert jobs_repo.request_cancel(api, job) is True  # not committed yet
        claim_result = blocked_behind_a_lock(worker, lambda: jobs_repo.claim(worker, job_id, "worker-1"), observer)
        api.commit()
        assert claim_result() is False
        worker.commit()
    with sessions() as session:
        job = jobs_repo.get(session, job_id)
        assert job.status == JobStatus.CANCELLED and job.finished_at is not None and job.started_at is None


def test_a_cancel_after_the_job_finished_changes_nothing(sessions, job_id):
    with sessions.begin() as session:
        assert jobs_repo.claim(session, job_id, "worker-1")
        assert jobs_repo.finish(session, job_id, JobStatus.SUCCEEDED, result={})
    with sessions.begin() as session:
        job = jobs_repo.get(session, job_id)
        assert jobs_repo.request_cancel(session, job) is False
        assert job.status == JobStatus.SUCCEEDED and not job.cancel_requested
