"""The API process's background loops: the outbox, the reaper of lost jobs, and webhooks."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool

from api import webhooks
from api.deps import admin_token
from core import queue
from core.settings import get_settings
from models import jobs as jobs_repo
from models.db import Database, database

log = logging.getLogger("gs.api")


def reap_lost_jobs() -> dict[str, str]:
    settings = get_settings()
    with database().session() as session:
        actions = jobs_repo.reap_stale(
            session, stale_after=timedelta(seconds=settings.heartbeat_timeout_s), max_attempts=settings.max_attempts
        )
    for job_id, status in actions.items():
        log.warning("job %s lost its worker: now %s", job_id, status)
    return actions


def send_and_record(db: Database, job_id: str, queue_name: str, timeout_s: float | None = None) -> bool:
    if not queue.send(job_id, queue_name, timeout_s):
        return False
    with db.session() as session:
        jobs_repo.mark_enqueued(session, job_id)
    return True


def sweep_outbox(db: Database, grace: timedelta = timedelta(seconds=5)) -> int:
    """Send every queued job whose message never reached the broker (the row is committed first);
    returns how many were sent."""
    with db.session() as session:
        pending = [(job.id, job.queue, job.spec.get("timeout_s")) for job in jobs_repo.unsent(session, older_than=grace)]
    return sum(send_and_record(db, *job) for job in pending)


def send_outbox() -> int:
    return sweep_outbox(database())


def deliver_webhooks() -> int:
    settings = get_settings()
    return webhooks.deliver_due(
        database(),
        settings.webhook_secret or admin_token(),
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        allow=settings.outbound_allow,
    )


async def every(seconds: float, work: Callable[[], object]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(work)
        except Exception as exc:  # a database or broker hiccup: try again next round
            log.warning("%s failed: %s", work.__name__, exc)


def start() -> list[asyncio.Task]:
    period = get_settings().sweep_every_s
    # Reap before sending: a re-queued job goes out in the same round.
    def reap_then_send() -> None:
        reap_lost_jobs()
        send_outbox()

    return [asyncio.create_task(every(period, reap_then_send)), asyncio.create_task(every(period, deliver_webhooks))]
