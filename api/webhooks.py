"""Webhooks: a POST to the job's callback_url on a terminal status, signed, retried with backoff.

Delivery runs in the API process's background loop, never in a worker, so a slow or failing
receiver cannot hold up a job, nor another key's webhooks (`Deliveries`: a few slots per key).
Signature: hex HMAC-SHA256 over "<timestamp>.<body>" with the job's key's own webhook secret
(admin jobs: GS_WEBHOOK_SECRET), sent as `X-GS-Signature: sha256=<hex>` with `X-GS-Timestamp:
<unix seconds>`. Connections go only to checked public addresses (core/outbound.py), re-resolved
at each delivery, and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx

from core import outbound
from models import auth as auth_repo
from models import webhooks as webhooks_repo
from models.db import Database
from models.tables import Job, utcnow

log = logging.getLogger("gs.webhooks")


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


class Deliveries:
    """Webhooks in flight from this API process: at most `slots` at once, at most `per_key` of one key's jobs among
    them, taken longest due first. A receiver that never answers holds its own key's slots for a try's timeout,
    while every other key's webhooks go out through the rest."""

    def __init__(
        self,
        db: Database,
        default_secret: str,
        *,
        timeout_s: float,
        max_attempts: int,
        allow: str = "",
        slots: int = 8,
        per_key: int = 2,
    ) -> None:
        self.db, self.default_secret, self.max_attempts = db, default_secret, max_attempts
        self.slots, self.per_key = slots, per_key
        self.lease = timedelta(seconds=60 + 10 * timeout_s)  # ample for one try; then another process may take it
        self.client = outbound.checked_http_client(allow, timeout_s)
        self.pool = ThreadPoolExecutor(slots, thread_name_prefix="gs-webhook")
        self.in_flight: Counter[str] = Counter()  # owner id: its deliveries under way here
        self.lock = threading.Lock()

    def start_due(self) -> list[Future[bool]]:
        """Start the due webhooks there is room for; each future says whether its webhook was delivered."""
        with self.lock:
            busy = dict(self.in_flight)
        until = utcnow() + self.lease
        with self.db.session() as session:
            taken = [
                job
                for job in webhooks_repo.due(
                    session, room=self.slots - sum(busy.values()), per_key=self.per_key, busy=busy
                )
                if webhooks_repo.lease(session, job.id, until)
            ]
            work = [(job.id, job.owner_id, job.callback_url or "", job.webhook_attempts, payload(job)) for job in taken]
            secrets = auth_repo.webhook_secrets(session, {owner_id for _, owner_id, *_ in work})
        with self.lock:
            self.in_flight.update(owner_id for _, owner_id, *_ in work)
        return [
            self.pool.submit(
                self.deliver, job_id, owner_id, url, attempts, body, secrets.get(owner_id) or self.default_secret
            )
            for job_id, owner_id, url, attempts, body in work
        ]

    def deliver(self, job_id: str, owner_id: str, url: str, attempts: int, body: dict[str, Any], secret: str) -> bool:
        try:
            ok = post_signed(self.client, url, secret, job_id, body)
            attempts += 1
            if ok:
                values: dict[str, Any] = {"webhook_status": "delivered", "webhook_attempts": attempts}
            elif attempts >= self.max_attempts:
                values = {"webhook_status": "failed", "webhook_attempts": attempts}
            else:
                backoff = timedelta(seconds=min(2**attempts, 300))
                values = {"webhook_attempts": attempts, "webhook_next_at": utcnow() + backoff}
            with self.db.session() as session:
                webhooks_repo.record(session, job_id, **values)
            return ok
        finally:
            with self.lock:
                self.in_flight[owner_id] -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def deliver_due(
    db: Database,
    default_secret: str,
    *,
    timeout_s: float,
    max_attempts: int,
    allow: str = "",
    slots: int = 8,
    per_key: int = 2,
) -> int:
    """Try the webhooks that are due once (as many as the slots allow) and wait for them; returns how many were
    delivered. A job is signed with its key's own secret; `default_secret` signs the admin's jobs (and those of
    keys made before keys had secrets). `allow` is the operator's allow-list (GS_OUTBOUND_ALLOW)."""
    deliveries = Deliveries(
        db, default_secret, timeout_s=timeout_s, max_attempts=max_attempts, allow=allow, slots=slots, per_key=per_key
    )
    try:
        return sum(future.result() for future in deliveries.start_due())
    finally:
        deliveries.close()
