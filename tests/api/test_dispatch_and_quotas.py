"""Fair dispatch, per-key quotas, lost messages sent again, and a cancel that is never followed by success."""
from __future__ import annotations

from datetime import timedelta

from models import jobs as jobs_repo
from models.status import JobStatus
from models.tables import Job, utcnow

SPEC = {"preset": "paper_moons_erm", "steps": 5}


def session_of(client):
    from models.db import database

    return database().session()


def add_jobs(session, owner: str, count: int, *, queue: str = "fair-test", start: float = 0.0) -> list[Job]:
    jobs = []
    for i in range(count):
        job = jobs_repo.create(session, owner_id=owner, kind="train", spec={}, tags={}, queue=queue, callback_url=None)
        job.created_at = utcnow() - timedelta(hours=1) + timedelta(seconds=start + i)
        jobs.append(job)
    session.flush()
    return jobs


def test_a_tenants_one_job_is_sent_before_anothers_backlog(client):
    with session_of(client) as session:
        backlog = add_jobs(session, "tenant-a", 50)
        [late] = add_jobs(session, "tenant-b", 1, start=100)  # submitted after all of A's
        chosen = jobs_repo.fair_share(session, "fair-test", 3)
        assert [j.id for j in chosen] == [backlog[0].id, late.id, backlog[1].id]


def test_a_tenant_with_jobs_in_flight_waits_for_one_without(client):
    with session_of(client) as session:
        sent = add_jobs(session, "tenant-c", 3, queue="fair-test-2")
        for job in sent:
            assert jobs_repo.reserve_sending(session, job.id)
        waiting = add_jobs(session, "tenant-c", 2, queue="fair-test-2", start=10)
        [other] = add_jobs(session, "tenant-d", 1, queue="fair-test-2", start=20)
        assert [j.id for j in jobs_repo.fair_share(session, "fair-test-2", 2)] == [other.id, waiting[0].id]
        assert jobs_repo.in_flight(session)["fair-test-2"] == 3
        assert not jobs_repo.reserve_sending(session, sent[0].id)  # sent once only


def test_submissions_past_the_per_key_limit_are_429(client, tenant, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_active_jobs_per_key", 2)
    headers = tenant()
    for _ in range(2):
        assert client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers).status_code == 202
    refused = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    assert int(refused.headers["Retry-After"]) > 0
    assert client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=tenant()).status_code == 202


def test_jobs_the_broker_lost_are_sent_again(client, monkeypatch):
    from api.dispatch import resend_lost
    from core.settings import get_settings

    from models.db import database

    monkeypatch.setattr(get_settings(), "resend_after_s", 60.0)
    with database().new_session() as session:  # the dispatcher commits as it goes
        lost, fresh = add_jobs(session, "tenant-e", 2, queue="cpu")
        for job in (lost, fresh):
            jobs_repo.reserve_sending(session, job.id)
        session.get(Job, lost.id).enqueued_at = utcnow() - timedelta(minutes=5)
        session.commit()
        session.expire_all()
        fresh_sent_at = session.get(Job, fresh.id).enqueued_at
        assert fresh_sent_at is not None
        assert resend_lost(session, get_settings()) >= 1  # other tests' unclaimed jobs may be resent too
        session.expire_all()
        assert session.get(Job, lost.id).enqueued_at > utcnow() - timedelta(minutes=1)
        assert session.get(Job, fresh.id).enqueued_at == fresh_sent_at


def test_a_lost_job_is_sent_again_by_one_of_several_dispatchers(client):
    """Two API processes' dispatchers both read a job as lost; only the first to swap its sent time sends it."""
    from models.db import database

    with database().new_session() as first, database().new_session() as second:
        (lost,) = add_jobs(first, "tenant-r", 1, queue="cpu")
        jobs_repo.reserve_sending(first, lost.id)
        first.get(Job, lost.id).enqueued_at = utcnow() - timedelta(minutes=5)
        first.commit()
        cutoff = timedelta(minutes=1)
        seen = [
            next(job.enqueued_at for job in jobs_repo.unclaimed(session, sent_before=cutoff) if job.id == lost.id)
            for session in (first, second)
        ]
        assert jobs_repo.reserve_resending(first, lost.id, sent_at=seen[0])
        first.commit()
        assert not jobs_repo.reserve_resending(second, lost.id, sent_at=seen[1])
        second.commit()
        assert lost.id not in {job.id for job in jobs_repo.unclaimed(second, sent_before=cutoff)}


def test_a_job_whose_cancel_was_accepted_never_ends_succeeded(client):
    with session_of(client) as session:
        [job] = add_jobs(session, "tenant-f", 1)
        assert jobs_repo.claim(session, job.id, "host:1")
        jobs_repo.request_cancel(session, session.get(Job, job.id))
        # The work finished before the worker polled the flag.
        assert jobs_repo.finish(session, job.id, JobStatus.SUCCEEDED, result={"done": True})
        session.expire_all()
        finished = session.get(Job, job.id)
        assert finished.status == JobStatus.CANCELLED and finished.result == {"done": True}
