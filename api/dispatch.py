"""Sending queued jobs to the broker, fairly: the database holds the backlog, the broker only the next few.

Each queue has at most `GS_DISPATCH_WINDOW` jobs sent and not yet claimed. When there is room, the next job goes
to the tenant with the fewest jobs running or sent (`models.jobs.fair_share`), so one key's thousand jobs wait
behind another key's one instead of in front of it. A job is reserved (marked sent, committed) before its message
goes out, so dispatchers in several API processes never send one job twice; a job sent and still unclaimed after
`GS_RESEND_AFTER_S` was lost by the broker and is sent again (the worker's claim keeps it from running twice).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from core import queue
from core.settings import Settings
from models import jobs as jobs_repo
from models.tables import Job

log = logging.getLogger("gs.api")


def dispatch(session: Session, settings: Settings) -> int:
    """Fill each queue's window from the backlog, one tenant at a time; returns how many were sent.
    Commits `session` (the reservations must be visible to other dispatchers before the messages go)."""
    flying = jobs_repo.in_flight(session)
    sent = 0
    for name in queue.QUEUES:
        for job in jobs_repo.fair_share(session, name, settings.dispatch_window - flying.get(name, 0)):
            outcome = send(session, job)
            if outcome is None:
                return sent  # the broker is down: nothing more this round, and no request waits on it
            sent += outcome
    return sent


def send(session: Session, job: Job) -> bool | None:
    """True: sent; False: another dispatcher had it; None: the broker refused (the job stays unsent)."""
    job_id, queue_name, timeout_s = job.id, job.queue, job.spec.get("timeout_s")
    if not jobs_repo.reserve_sending(session, job_id):
        return False
    session.commit()
    if queue.send(job_id, queue_name, timeout_s):
        return True
    jobs_repo.unreserve_sending(session, job_id)  # the next round tries again
    session.commit()
    return None


def resend_lost(session: Session, settings: Settings) -> int:
    """Send again the jobs the broker was given long ago and no worker ever claimed."""
    lost = [
        (job.id, job.queue, job.spec.get("timeout_s"), job.enqueued_at)
        for job in jobs_repo.unclaimed(session, sent_before=timedelta(seconds=settings.resend_after_s))
    ]
    resent = 0
    for job_id, queue_name, timeout_s, sent_at in lost:
        assert sent_at is not None  # unclaimed: sent, never claimed
        if not jobs_repo.reserve_resending(session, job_id, sent_at=sent_at):
            session.commit()
            continue  # another API process's dispatcher sends it
        session.commit()
        if not queue.send(job_id, queue_name, timeout_s):
            jobs_repo.unreserve_resending(session, job_id, sent_at=sent_at)
            session.commit()
            break
        resent += 1
        log.warning("job %s was sent %ss ago and never claimed: sent again", job_id, settings.resend_after_s)
    return resent
