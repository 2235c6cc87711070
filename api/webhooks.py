"""Webhooks: a POST to the job's callback_url on a terminal status, signed, retried with backoff.

Delivery runs in the API process's background loop, never in a worker, so a slow or failing
receiver cannot hold up a job. Signature: hex HMAC-SHA256 over "<timestamp>.<body>" with the
webhook secret, sent as `X-GS-Signature: sha256=<hex>` with `X-GS-Timestamp: <unix seconds>`.
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


def deliver_due(db: Database, secret: str, *, timeout_s: float, max_attempts: int) -> int:
    """Try every webhook that is due once; returns how many were delivered."""
    now = utcnow()
    with db.session() as session:
        due = session.scalars(
            select(Job)
            .where(Job.webhook_status == "pending")
            .where((Job.webhook_next_at.is_(None)) | (Job.webhook_next_at <= now))
            .limit(BATCH)
        ).all()
        work = [(job.id, job.callback_url, job.webhook_attempts, payload(job)) for job in due]
    delivered = 0
    for job_id, url, attempts, body in work:
        raw = json.dumps(body, sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-GS-Timestamp": timestamp,
            "X-GS-Signature": f"sha256={sign(secret, timestamp, raw)}",
            "X-GS-Job-Id": job_id,
        }
        try:
            ok = httpx.post(url, content=raw, headers=headers, timeout=timeout_s).is_success
        except httpx.HTTPError as exc:
            log.info("webhook for job %s failed: %s", job_id, exc)
            ok = False
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
