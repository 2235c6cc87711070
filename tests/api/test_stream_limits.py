"""Open streams are counted per key and in total; past either limit a 429 with Retry-After, and a stream that
ends gives its place back (the e2e drill, tests/e2e/test_stream_fairness.py, does this over HTTP)."""
from __future__ import annotations

import pytest

from api.errors import ApiError
from api.streams import StreamCount
from core.settings import Settings


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
