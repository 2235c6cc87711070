"""Upload checks: an uploaded model is loaded and run once, in a jail (jail/), before it is stored.

A check takes seconds, so they are bounded: `upload_check_slots` run at once, up to
`upload_check_queue` more wait, and one key may have at most `upload_checks_per_key` running or
waiting. Past that the upload is a 429 at once, so one tenant cannot hold up everyone's
uploads, nor the API's threads or database connections (the caller holds none while it waits).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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
                raise ApiError(
                    429,
                    "too_many_checks",
                    "This key already has model checks running; retry when they finish.",
                    headers={"Retry-After": "5"},
                )
            if total >= settings.upload_check_slots + settings.upload_check_queue:
                raise ApiError(
                    429,
                    "too_many_checks",
                    "Too many models are being checked; retry shortly.",
                    headers={"Retry-After": "5"},
                )
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


class SameUpload:
    """One key's uploads of the same request, one at a time: a duplicate (a retry, a client sending twice) waits for
    the first, then replays its answer instead of checking the model again or being refused by the gate.
    Waiting costs a coroutine, not a thread; past `MAX_WAITING` duplicates of one request, a 429."""

    MAX_WAITING = 64

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def turn(self, owner_id: str, request: str) -> AsyncIterator[None]:
        key = (owner_id, request)
        lock, holders = self._turns.get(key) or (asyncio.Lock(), 0)
        if holders >= self.MAX_WAITING:
            raise ApiError(
                429,
                "too_many_checks",
                "This upload is already being checked many times over; retry later.",
                headers={"Retry-After": "5"},
            )
        self._turns[key] = (lock, holders + 1)  # one event loop: nothing runs between the read and this write
        try:
            async with lock:
                yield
        finally:
            lock, holders = self._turns[key]
            if holders == 1:
                del self._turns[key]
            else:
                self._turns[key] = (lock, holders - 1)


same_upload = SameUpload()


def validate_checkpoint(owner_id: str, settings: Settings, path: Path, fmt: str, **options: Any) -> dict[str, Any]:
    """starvation.checkpoints.validate_checkpoint in a jail; a refused model is a 422, a full
    queue a 429. Blocks: call it from a worker thread."""
    from jail import JailError, Limits, check_model

    with gate.enter(owner_id, settings):
        try:
            return check_model(
                path,
                fmt,
                limits=Limits.from_settings(settings),
                wall_seconds=settings.upload_check_timeout_s,
                **options,
            )
        except JailError as exc:
            status = 503 if exc.code == "jail_unavailable" else 422
            raise ApiError(status, exc.code, exc.message) from None
