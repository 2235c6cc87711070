"""Open streams (a job's log with `follow=true`, its events): what they may cost the other tenants.

- A stream holds no database connection while it waits or while a slow client reads: each poll is one short
  session, run in a thread of the streams' own small pool (GS_STREAM_DB_CONNECTIONS), never on the event loop
  and never in the threads that serve requests.
- Streams are counted in this API process, per key (GS_STREAMS_PER_KEY) and in total (GS_STREAMS_TOTAL);
  past either limit a 429 `too_many_streams` with Retry-After.
- Every poll checks the key again: a revoked key's streams end at their next poll, within IDLE_POLL_S.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from core.settings import Settings, get_settings

POLL_S = 0.5
IDLE_POLL_S = 2.0  # also the longest a revoked key's stream stays open, plus one poll
RETRY_AFTER_S = 5

# (what to send now, whether the stream has ended); run in a thread, it may use the database.
Poll = Callable[[], tuple[str, bool]]


class StreamCount:
    """Open streams per key and in all; taken in request threads, given back on the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.per_key: Counter[str] = Counter()

    def take(self, owner_id: str, settings: Settings) -> None:
        with self._lock:
            total = sum(self.per_key.values())
            if self.per_key[owner_id] >= settings.streams_per_key:
                refuse(
                    f"This key has {self.per_key[owner_id]} streams open; the limit is "
                    f"{settings.streams_per_key}. Close one, or read pages without follow."
                )
            if total >= settings.streams_total:
                refuse(f"The service has {total} streams open, its limit; try again shortly.")
            self.per_key[owner_id] += 1

    def give_back(self, owner_id: str) -> None:
        with self._lock:
            self.per_key[owner_id] -= 1
            if self.per_key[owner_id] <= 0:
                del self.per_key[owner_id]


def refuse(message: str) -> None:
    raise ApiError(429, "too_many_streams", message, headers={"Retry-After": str(RETRY_AFTER_S)})


open_streams = StreamCount()
_readers: anyio.CapacityLimiter | None = None


def readers() -> anyio.CapacityLimiter:
    """The threads (hence database connections) that all streams' polls share."""
    global _readers
    if _readers is None:
        _readers = anyio.CapacityLimiter(get_settings().stream_db_connections)
    return _readers


async def polled(poll: Poll, is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """What `poll` finds, until it says the stream has ended or the client has gone: every POLL_S while there
    is news, backing off to every IDLE_POLL_S while there is none (most open streams wait on a quiet job)."""
    wait = POLL_S
    while not await is_disconnected():
        text, ended = await anyio.to_thread.run_sync(poll, limiter=readers())
        if text:
            yield text
        if ended:
            return
        wait = POLL_S if text else min(2 * wait, IDLE_POLL_S)
        await asyncio.sleep(wait)


class CountedStream(StreamingResponse):
    """A streaming response that gives its place back however it ends (finished, disconnected, failed)."""

    def __init__(self, owner_id: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.owner_id = owner_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            open_streams.give_back(self.owner_id)


def open_stream(
    owner_id: str, settings: Settings, body: AsyncIterator[str], media_type: str, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """`body` as a response counted against the key's and the service's stream limits (a 429 past them)."""
    open_streams.take(owner_id, settings)
    return CountedStream(owner_id, body, media_type=media_type, headers=headers)
