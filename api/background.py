"""The API process's background loops: the dispatcher (the outbox), the reaper of lost jobs, webhooks (each round
starts what is due and returns; deliveries run on in api/webhooks.py's slots), and the checks of registered image
folders (GS_DATASET_CHECK_SLOTS loops, each checking one folder at a time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool

from api import dispatch, webhooks
from api.dataset_checks import check_pending_datasets
from api.deps import admin_token
from core.settings import get_settings
from models import jobs as jobs_repo
from models.db import database

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


def dispatch_round() -> int:
    """Send what the windows have room for (api/dispatch.py), and again what the broker lost."""
    settings = get_settings()
    with database().new_session() as session:  # the dispatcher commits as it goes
        return dispatch.resend_lost(session, settings) + dispatch.dispatch(session, settings)


async def every(seconds: float, work: Callable[[], object]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(work)
        except Exception as exc:  # a database or broker hiccup: try again next round
            log.warning("%s failed: %s", work.__name__, exc)


def start() -> list[asyncio.Task]:
    settings = get_settings()
    webhook_deliveries = webhooks.Deliveries(
        database(),
        settings.webhook_secret or admin_token(),
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        allow=settings.outbound_allow,
        slots=settings.webhook_slots,
        per_key=settings.webhook_slots_per_key,
    )
    checks = [every(settings.dispatch_every_s, check_pending_datasets) for _ in range(settings.dataset_check_slots)]
    return [
        asyncio.create_task(loop)
        for loop in (
            every(settings.sweep_every_s, reap_lost_jobs),
            every(settings.dispatch_every_s, dispatch_round),
            every(settings.sweep_every_s, webhook_deliveries.start_due),
            *checks,
        )
    ]
