"""Handing jobs to the broker. The job row is committed first; a failed send is retried by the sweep."""
from __future__ import annotations

import logging
from datetime import timedelta

from models import jobs as jobs_repo
from models.db import Database
from worker.celery_app import RUN_JOB, app

log = logging.getLogger("gs.queue")


HARD_LIMIT_GRACE_S = 60


def send(job_id: str, queue: str, timeout_s: float | None = None) -> bool:
    """True once the broker has the message. Never raises: the outbox sweep will try again.

    With a timeout_s the job stops itself at that time (cooperatively); Celery kills the
    process a minute later if it could not (the hard limit).
    """
    limits = {"time_limit": timeout_s + HARD_LIMIT_GRACE_S} if timeout_s else {}
    try:
        with app.connection_for_write() as connection:
            # Fail fast when the broker is down: the request must not wait on reconnects.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
            app.send_task(
                RUN_JOB, args=[job_id], queue=queue, retry=False, headers={"job_id": job_id},
                connection=connection, **limits,
            )
        return True
    except Exception as exc:  # broker down: the job stays queued with enqueued_at = null
        log.warning("broker unreachable, job %s stays in the outbox: %s", job_id, exc)
        return False


def send_and_record(db: Database, job_id: str, queue: str, timeout_s: float | None = None) -> bool:
    if not send(job_id, queue, timeout_s):
        return False
    with db.session() as session:
        jobs_repo.mark_enqueued(session, job_id)
    return True


def sweep_outbox(db: Database, grace: timedelta = timedelta(seconds=5)) -> int:
    """Send every queued job whose message never reached the broker; returns how many were sent."""
    with db.session() as session:
        pending = [(job.id, job.queue, job.spec.get("timeout_s")) for job in jobs_repo.unsent(session, older_than=grace)]
    return sum(send_and_record(db, *job) for job in pending)
