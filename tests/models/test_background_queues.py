"""The queues of the API's background loops, on PostgreSQL: dataset checks and webhooks are handed out tenants in
turn, within each key's share, and never to two takers at once."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import update

from models import files as files_repo
from models import jobs as jobs_repo
from models import webhooks as webhooks_repo
from models.db import Database
from models.migrate import upgrade
from models.tables import Job, UserDataset, utcnow
from tests.conftest import POSTGRES_URL, scratch_postgres

HOUR = timedelta(hours=1)


@pytest.fixture
def db():
    url = scratch_postgres(f"{POSTGRES_URL.rsplit('/', 1)[1]}_queues")
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def pending_folders(db: Database, owner_id: str, count: int, start: int = 0) -> list[str]:
    with db.session() as session:
        return [files_repo.add_dataset(session, id=f"{owner_id}{i:03d}", owner_id=owner_id, name="f",
                                       format="image_folder", path="/data/f", info={}, status="pending",
                                       created_at=utcnow() - timedelta(minutes=100 - i)).id
                for i in range(start, start + count)]


def claim(db: Database, per_key: int) -> str | None:
    with db.new_session() as session:
        row = files_repo.claim_dataset_check(session, stale_after=HOUR, per_key=per_key)
        return row.id if row else None


def test_checks_go_to_the_tenant_with_fewest_running_and_a_key_waits_at_its_share(db):
    backlog = pending_folders(db, "a", 5)
    lone = pending_folders(db, "b", 1, start=50)  # registered after all of A's
    assert claim(db, per_key=1) == backlog[0]  # nobody is running: the longest waiting goes first
    assert claim(db, per_key=1) == lone[0]  # A has one running: B's turn, though A's others are older
    assert claim(db, per_key=1) is None  # A is at its share and B has nothing left
    assert claim(db, per_key=2) == backlog[1]
    with db.session() as session:
        files_repo.finish_dataset_check(session, backlog[0], info={})
        assert files_repo.pending_checks(session, "a") == 4 and files_repo.pending_checks(session, "b") == 1


def test_racing_claims_never_take_one_check_twice(db):
    pending_folders(db, "a", 12)
    pending_folders(db, "b", 12, start=20)
    with ThreadPoolExecutor(8) as pool:
        taken = [i for i in pool.map(lambda _: claim(db, per_key=100), range(30)) if i is not None]
    assert len(taken) == 24 and len(set(taken)) == 24


def finished_jobs(db: Database, owner_id: str, count: int) -> list[str]:
    with db.session() as session:
        ids = [jobs_repo.create(session, owner_id=owner_id, kind="train", spec={}, tags={}, queue="cpu",
                                callback_url="https://example.org/hook").id for _ in range(count)]
        for i, job_id in enumerate(ids):
            ended = {**jobs_repo.terminal("succeeded"), "finished_at": utcnow() - timedelta(minutes=100 - i)}
            session.execute(update(Job).where(Job.id == job_id).values(**ended))
    return ids


def test_webhooks_go_longest_due_first_within_each_keys_share_and_to_one_sender(db):
    a_jobs = finished_jobs(db, "a", 5)
    b_jobs = finished_jobs(db, "b", 1)
    with db.session() as session:
        session.execute(update(Job).where(Job.id == b_jobs[0]).values(finished_at=utcnow() - timedelta(minutes=1)))
        due = [job.id for job in webhooks_repo.due(session, room=8, per_key=2, busy={})]
        assert due == [a_jobs[0], a_jobs[1], b_jobs[0]]  # A's oldest two, then B's
        assert [job.id for job in webhooks_repo.due(session, room=8, per_key=2, busy={"a": 2})] == b_jobs
        assert [job.id for job in webhooks_repo.due(session, room=1, per_key=2, busy={})] == [a_jobs[0]]
    with db.session() as session:
        assert webhooks_repo.lease(session, a_jobs[0], utcnow() + HOUR)
    with db.session() as session:
        assert not webhooks_repo.lease(session, a_jobs[0], utcnow() + HOUR)  # another process has it
        assert a_jobs[0] not in [job.id for job in webhooks_repo.due(session, room=8, per_key=5, busy={})]
