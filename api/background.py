"""The API process's background loops: the outbox, the reaper of lost jobs, and webhooks."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool

from api import webhooks
from api.deps import admin_token, database
from api.settings import get_settings
from models import jobs as jobs_repo
from worker.queue import sweep_outbox

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
