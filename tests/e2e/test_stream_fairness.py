"""One tenant's open streams cost the others nothing, on PostgreSQL + Redis with a real server process.

Tenant A holds 64 streams (half `logs?follow=true`, half events); 8 of them follow a job with 5 MB of log
and read it slowly through a tiny receive buffer, more than the kernel buffers, so the server waits on them
mid-response. Tenant B's `GET /v1/jobs` must stay within 3x its
quiet median; streams past the limits are 429s; a revoked key's streams end within 5 s. No worker runs: the
jobs stay queued and their streams stay open.
"""
from __future__ import annotations

import selectors
import socket
import statistics
import time

import httpx
import psycopg
import pytest

from tests.conftest import POSTGRES_URL, Stack, require_redis, scratch_postgres

STREAMS = 64
SLOW_EVERY = 8  # every 8th and the next read 256 bytes each half second through a 4 KiB buffer
LOG_LINES = 1000  # one poll's worth
BIG_LINE = 5000  # the slow streams' job logs LOG_LINES of these: more than a socket's largest send buffer
B_STREAMS = 2  # what is left of GS_STREAMS_TOTAL once A holds its 64
REQUESTS = 20  # B's, with A's streams open; as many without, half before them and half after (the machine drifts)


def new_key(stack: Stack, name: str) -> tuple[str, str]:
    response = stack.client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key"]


class RawStream:
    """One streaming GET on its own socket: its status, then whatever arrives, until the server closes it."""

    def __init__(self, port: int, path: str, token: str, slow: bool = False) -> None:
        self.sock, self.slow, self.received, self.ended_at = socket.socket(), slow, bytearray(), None
        if slow:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                          f"Connection: close\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.received:
            chunk = self.sock.recv(256)
            assert chunk, "the server closed the stream before its headers"
            self.received += chunk
        self.head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        self.received = bytearray(rest)
        self.status = int(self.head.split()[1])
        self.sock.setblocking(False)

    def read(self, limit: int = 1 << 20) -> None:
        if self.ended_at is not None:
            return
        try:
            chunk = self.sock.recv(limit)
        except BlockingIOError:
            return
        if chunk:
            self.received += chunk
        elif self.ended_at is None:
            self.ended_at = time.monotonic()


def read_for(streams: list[RawStream], seconds: float, *, until=lambda: False, slow_too: bool = False) -> None:
    """Read the streams for `seconds` or until `until()`: each fast one as data comes, each slow one 256 bytes
    every half second (all as data comes with `slow_too`)."""
    selector = selectors.DefaultSelector()
    for stream in streams:
        if stream.ended_at is None and (slow_too or not stream.slow):
            selector.register(stream.sock, selectors.EVENT_READ, stream)
    deadline = next_slow_read = time.monotonic()
    deadline += seconds
    while time.monotonic() < deadline and not until():
        for key, _ in selector.select(timeout=0.05):
            key.data.read()
            if key.data.ended_at is not None:
                selector.unregister(key.fileobj)
        if not slow_too and time.monotonic() >= next_slow_read:
            next_slow_read += 0.5
            for stream in streams:
                if stream.slow:
                    stream.read(256)
    selector.close()


def timed_ms(client: httpx.Client, n: int, pause=lambda: time.sleep(0.05)) -> list[float]:
    """n requests, each after a pause (quiet or loaded, B's requests are paced alike)."""
    times = []
    for _ in range(n):
        pause()
        started = time.perf_counter()
        assert client.get("/v1/jobs").status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return times


@pytest.fixture
def stack(tmp_path):
    database = scratch_postgres(POSTGRES_URL.rsplit("/", 1)[-1] + "_streams")
    env = {"GS_DATABASE_URL": database, "GS_BROKER_URL": require_redis(),
           "GS_STREAMS_PER_KEY": str(STREAMS), "GS_STREAMS_TOTAL": str(STREAMS + B_STREAMS)}
    stack = Stack("streams", env, tmp_path, serve_args=("--no-worker",)).start()
    yield stack, database
    stack.stop()


def test_one_tenants_open_streams_do_not_slow_another_and_end_when_its_key_is_revoked(stack):
    stack, database = stack
    a_id, a_token = new_key(stack, "a")
    _, b_token = new_key(stack, "b")
    job = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}}
    a_job, big_job = (stack.client.post("/v1/jobs", json=job, headers={"Authorization": f"Bearer {a_token}"})
                      .json()["id"] for _ in range(2))
    with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as conn:
        for job_id, width in ((a_job, 200), (big_job, BIG_LINE)):
            conn.execute("INSERT INTO job_logs (job_id, at, level, message) SELECT %s, now(), 'info', "
                         "'line-' || n || ' ' || repeat('x', %s) FROM generate_series(1, %s) AS n",
                         (job_id, width, LOG_LINES))
    b = httpx.Client(base_url=stack.client.base_url, headers={"Authorization": f"Bearer {b_token}"}, timeout=30)
    for _ in range(5):
        assert b.post("/v1/jobs", json=job).status_code == 202
    timed_ms(b, 3)  # warm up
    quiet = timed_ms(b, REQUESTS // 2)

    paths = ["/v1/jobs/{}/logs?follow=true", "/v1/jobs/{}/events"]
    slow = [i % SLOW_EVERY < 2 for i in range(STREAMS)]
    a_streams = [RawStream(stack.port, paths[i % 2].format(big_job if slow[i] else a_job), a_token, slow=slow[i])
                 for i in range(STREAMS)]
    assert [s.status for s in a_streams] == [200] * STREAMS, [s.head for s in a_streams if s.status != 200][:1]
    over = httpx.get(f"{stack.client.base_url}/v1/jobs/{a_job}/events", headers={"Authorization": f"Bearer {a_token}"})
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_streams", over.text
    assert int(over.headers["Retry-After"]) > 0
    b_job = b.get("/v1/jobs").json()["items"][0]["id"]
    b_streams = [RawStream(stack.port, f"/v1/jobs/{b_job}/events", b_token) for _ in range(B_STREAMS)]
    assert [s.status for s in b_streams] == [200] * B_STREAMS
    past_total = b.get(f"/v1/jobs/{b_job}/events")  # the service's total, not B's own limit
    assert past_total.status_code == 429 and "service" in past_total.json()["error"]["message"], past_total.text

    fast = [s for s in a_streams if not s.slow]
    read_for(a_streams, 30, until=lambda: all(s.received.count(b"line-") >= LOG_LINES for s in fast))
    assert all(s.received.count(b"line-") >= LOG_LINES for s in fast), "the fast readers did not get the log"
    # Over 4 MiB (the kernel's largest send buffer) of each slow stream's 5 MB is still in the server.
    assert all(len(s.received) < LOG_LINES * BIG_LINE - (4 << 20) for s in a_streams if s.slow)
    # B's requests while A's streams poll and the slow ones hold the server.
    loaded = timed_ms(b, REQUESTS, pause=lambda: read_for(a_streams, 0.05))

    revoked_at = time.monotonic()
    assert stack.client.delete(f"/v1/api-keys/{a_id}").status_code in (200, 204)
    read_for(a_streams, 5, until=lambda: all(s.ended_at for s in a_streams), slow_too=True)
    still_open = sum(s.ended_at is None for s in a_streams)
    assert still_open == 0, f"{still_open} of A's streams still open 5 s after its key was revoked"
    print(f"\nA's streams ended {max(s.ended_at for s in a_streams) - revoked_at:.2f} s after the revocation")
    # A's places were given back: B may open what the total refused before.
    b_streams.append(RawStream(stack.port, f"/v1/jobs/{b_job}/events", b_token))
    assert b_streams[-1].status == 200
    for stream in a_streams + b_streams:
        stream.sock.close()
    quiet += timed_ms(b, REQUESTS // 2)
    before, after = (statistics.median(half) for half in (quiet[:REQUESTS // 2], quiet[REQUESTS // 2:]))
    print(f"B's GET /v1/jobs: quiet median {statistics.median(quiet):.1f} ms (before A's streams {before:.1f}, "
          f"after {after:.1f}), with A's {STREAMS} streams open {statistics.median(loaded):.1f} ms")
    assert statistics.median(loaded) <= 3 * statistics.median(quiet), (quiet, loaded)

    # Streams whose clients went give their places back too (noticed at their next poll): B gets all 64 of its own.
    reopened, deadline = [], time.monotonic() + 5
    while len(reopened) < STREAMS and time.monotonic() < deadline:
        stream = RawStream(stack.port, f"/v1/jobs/{b_job}/events", b_token)
        if stream.status == 200:
            reopened.append(stream)
        else:
            stream.sock.close()
            time.sleep(0.2)
    assert len(reopened) == STREAMS
    for stream in reopened:
        stream.sock.close()
