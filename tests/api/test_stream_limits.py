"""Open streams hold no database connection while they wait, end when their key is revoked, and are counted per
key and in total (past either limit a 429 with Retry-After). The e2e drill, tests/e2e/test_stream_fairness.py,
does all of it over HTTP on PostgreSQL."""
from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from api.deps import Principal
from api.errors import ApiError
from api.job_streams import follow_logs
from api.streams import IDLE_POLL_S, StreamCount
from core.settings import Settings
from models import job_logs as logs_repo
from models.db import database


def refused(count: StreamCount, owner_id: str, settings: Settings) -> ApiError:
    with pytest.raises(ApiError) as caught:
        count.take(owner_id, settings)
    error = caught.value
    assert error.status == 429 and error.code == "too_many_streams" and int(error.headers["Retry-After"]) > 0
    return error


def test_a_key_past_its_limit_is_refused_and_others_are_not():
    count, settings = StreamCount(), Settings(streams_per_key=2, streams_total=10)
    count.take("a", settings)
    count.take("a", settings)
    assert "This key has 2 streams open" in refused(count, "a", settings).message
    count.take("b", settings)
    count.give_back("a")
    count.take("a", settings)
    assert count.per_key == {"a": 2, "b": 1}


def test_the_service_total_refuses_every_key():
    count, settings = StreamCount(), Settings(streams_per_key=5, streams_total=3)
    for owner_id in ("a", "a", "b"):
        count.take(owner_id, settings)
    assert "The service has 3 streams open" in refused(count, "c", settings).message
    for owner_id in ("a", "a", "b"):
        count.give_back(owner_id)
    assert count.per_key == {}
    count.take("c", settings)


def test_a_log_stream_holds_no_connection_between_polls_and_ends_when_its_key_is_revoked(client):
    created = client.post("/v1/api-keys", json={"name": "streamer"}).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    job = client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}},
                      headers=headers).json()
    with database().session() as session:
        logs_repo.add_batch(session, job["id"], [{"at": datetime.now(UTC), "level": "info", "message": "hello"}])
    pool = database().engine.pool

    async def still_connected() -> bool:
        return False

    async def follow() -> float:
        lines = follow_logs(job["id"], None, Principal(created["id"], False), still_connected)
        assert "hello" in await anext(lines)
        assert pool.checkedout() == 0  # suspended at its yield, the stream holds no connection
        assert client.delete(f"/v1/api-keys/{created['id']}").status_code == 200
        revoked_at = time.monotonic()
        async for _ in lines:
            raise AssertionError("a line after the key was revoked")
        return time.monotonic() - revoked_at

    assert asyncio.run(follow()) <= IDLE_POLL_S + 1
