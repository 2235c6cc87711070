"""Webhooks: a POST to the job's callback_url on a terminal status, signed, retried with backoff.

Delivery runs in the API process's background loop, never in a worker, so a slow or failing
receiver cannot hold up a job. Signature: hex HMAC-SHA256 over "<timestamp>.<body>" with the
job's key's own webhook secret (admin jobs: GS_WEBHOOK_SECRET), sent as `X-GS-Signature:
sha256=<hex>` with `X-GS-Timestamp: <unix seconds>`. Connections go only to checked public
addresses (core/outbound.py), re-resolved at each delivery, and redirects are not followed.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from core import outbound
from models import auth as auth_repo
from models.db import Database
from models.tables import Job, utcnow

log = logging.getLogger("gs.webhooks")
BATCH = 20


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def payload(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "error": job.error,
        "result": job.result,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "links": {"self": f"/v1/jobs/{job.id}"},
    }


def post_signed(client: httpx.Client, url: str, secret: str, job_id: str, body: dict[str, Any]) -> bool:
    raw = json.dumps(body, sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-GS-Timestamp": timestamp,
        "X-GS-Signature": f"sha256={sign(secret, timestamp, raw)}",
        "X-GS-Job-Id": job_id,
    }
    try:
        return client.post(url, content=raw, headers=headers).is_success
    except httpx.HTTPError as exc:  # a refused target (now a private address) is a ConnectError
        log.info("webhook for job %s failed: %s", job_id, exc)
        return False


def deliver_due(
    db: Database, default_secret: str, *, timeout_s: float, max_attempts: int, allow: str = ""
) -> int:
    """Try every webhook that is due once; returns how many were delivered.

    A job is signed with its key's own secret; `default_secret` signs the admin's jobs (and those of
    keys made before keys had secrets). `allow` is the operator's allow-list (GS_OUTBOUND_ALLOW).
    """
    now = utcnow()
    with db.session() as session:
        due = session.scalars(
            select(Job)
            .where(Job.webhook_status == "pending")
            .where((Job.webhook_next_at.is_(None)) | (Job.webhook_next_at <= now))
            .limit(BATCH)
        ).all()
        work = [(job.id, job.owner_id, job.callback_url, job.webhook_attempts, payload(job)) for job in due]
        secrets = auth_repo.webhook_secrets(session, {owner_id for _, owner_id, *_ in work})
    if not work:
        return 0
    delivered = 0
    with outbound.checked_http_client(allow, timeout_s) as client:
        for job_id, owner_id, url, attempts, body in work:
            ok = post_signed(client, url, secrets.get(owner_id) or default_secret, job_id, body)
            attempts += 1
            if ok:
                values: dict[str, Any] = {"webhook_status": "delivered", "webhook_attempts": attempts}
                delivered += 1
            elif attempts >= max_attempts:
                values = {"webhook_status": "failed", "webhook_attempts": attempts}
            else:
                backoff = timedelta(seconds=min(2**attempts, 300))
                values = {"webhook_attempts": attempts, "webhook_next_at": utcnow() + backoff}
            with db.session() as session:
                session.execute(update(Job).where(Job.id == job_id).values(**values))
    return delivered
