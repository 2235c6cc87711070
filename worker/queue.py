"""Handing jobs to the broker. The job row is committed first; a failed send is retried by the sweep."""
from __future__ import annotations

import logging
from datetime import timedelta

from models import jobs as jobs_repo
from models.db import Database
from worker.celery_app import RUN_JOB, app

log = logging.getLogger("gs.queue")


def send(job_id: str, queue: str) -> bool:
    """True once the broker has the message. Never raises: the outbox sweep will try again."""
    try:
        app.send_task(
            RUN_JOB,
            args=[job_id],
            queue=queue,
            retry=False,
            headers={"job_id": job_id},
        )
        return True
    except Exception as exc:  # broker down: the job stays queued with enqueued_at = null
        log.warning("broker unreachable, job %s stays in the outbox: %s", job_id, exc)
        return False


def send_and_record(db: Database, job_id: str, queue: str) -> bool:
    if not send(job_id, queue):
        return False
    with db.session() as session:
        jobs_repo.mark_enqueued(session, job_id)
    return True


def sweep_outbox(db: Database, grace: timedelta = timedelta(seconds=5)) -> int:
    """Send every queued job whose message never reached the broker; returns how many were sent."""
    with db.session() as session:
        pending = [(job.id, job.queue) for job in jobs_repo.unsent(session, older_than=grace)]
    return sum(send_and_record(db, job_id, queue) for job_id, queue in pending)
