"""Upload checks: an uploaded model is loaded and run once, in a jail (jail/), before it is stored.

A check takes seconds, so they are bounded: `upload_check_slots` run at once, up to
`upload_check_queue` more wait, and one key may have at most `upload_checks_per_key` running or
waiting. Past that the upload is a 429 at once, so one tenant cannot hold up everyone's
uploads, nor the API's threads or database connections (the caller holds none while it waits).
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from api.errors import ApiError
from core.settings import Settings


class CheckGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: threading.Semaphore | None = None
        self._waiting_or_running: Counter[str] = Counter()

    @contextmanager
    def enter(self, owner_id: str, settings: Settings) -> Iterator[None]:
        with self._lock:
            if self._slots is None:
                self._slots = threading.Semaphore(settings.upload_check_slots)
            total = sum(self._waiting_or_running.values())
            if self._waiting_or_running[owner_id] >= settings.upload_checks_per_key:
                raise ApiError(429, "too_many_checks", "This key already has model checks running; retry when they finish.",
                               headers={"Retry-After": "5"})
            if total >= settings.upload_check_slots + settings.upload_check_queue:
                raise ApiError(429, "too_many_checks", "Too many models are being checked; retry shortly.",
                               headers={"Retry-After": "5"})
            self._waiting_or_running[owner_id] += 1
            slots = self._slots
        try:
            with slots:
                yield
        finally:
            with self._lock:
                self._waiting_or_running[owner_id] -= 1
                if not self._waiting_or_running[owner_id]:
                    del self._waiting_or_running[owner_id]


gate = CheckGate()


def validate_checkpoint(owner_id: str, settings: Settings, path: Path, fmt: str, **options: Any) -> dict[str, Any]:
    """starvation.checkpoints.validate_checkpoint in a jail; a refused model is a 422, a full
    queue a 429. Blocks: call it from a worker thread."""
    from jail import JailError, Limits, check_model

    with gate.enter(owner_id, settings):
        try:
            return check_model(
                path, fmt, limits=Limits.from_settings(settings),
                wall_seconds=settings.upload_check_timeout_s, **options,
            )
        except JailError as exc:
            status = 503 if exc.code == "jail_unavailable" else 422
            raise ApiError(status, exc.code, exc.message) from None
