"""API load test: concurrent submissions and reads against the PostgreSQL + Redis stack.

    .venv/bin/python bench/load.py [--seconds 60] [--clients 16]

Starts the service (scripts/serve.py) on the machine's PostgreSQL (scratch database gs_load) and
Redis (db 8), then for --seconds each client loops: submit a tiny train job, read it back, list
jobs. Prints throughput, p50/p99 latency per request kind and the error count (zero expected).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.stack import ADMIN_TOKEN, Stack  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/8"
TINY_JOB = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 1, "audit": False}, "tags": {"bench": "load"}}


def scratch_database(name: str) -> str:
    import psycopg

    with psycopg.connect(f"{POSTGRES.replace('+psycopg', '')}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return f"{POSTGRES}/{name}"


def client_loop(base_url: str, stop_at: float, latencies: dict, errors: list) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        while time.monotonic() < stop_at:
            for kind, call in (
                ("submit", lambda: client.post("/v1/jobs", json=TINY_JOB)),
                ("get", lambda: client.get(f"/v1/jobs/{job_id}")),
                ("list", lambda: client.get("/v1/jobs", params={"limit": 20})),
            ):
                started = time.perf_counter()
                try:
                    response = call()
                    ok = response.status_code < 400
                except httpx.HTTPError as exc:
                    response, ok = exc, False
                latencies[kind].append(time.perf_counter() - started)
                if not ok:
                    errors.append(f"{kind}: {response}")
                    break
                if kind == "submit":
                    job_id = response.json()["id"]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    stack = Stack("load", {"GS_DATABASE_URL": scratch_database("gs_load"), "GS_BROKER_URL": REDIS},
                  Path(tempfile.mkdtemp(prefix="gs-load-")))
    stack.start()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    try:
        stop_at = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client_loop, args=(stack.client.base_url, stop_at, latencies, errors))
                   for _ in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        stack.stop()
    total = sum(len(v) for v in latencies.values())
    print(f"{args.clients} clients, {elapsed:.0f} s, PostgreSQL + Redis, API + 1 worker on this machine")
    print(f"{'request':8} {'count':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, values in latencies.items():
        print(f"{kind:8} {len(values):7d} {len(values) / elapsed:7.1f} {1000 * percentile(values, 50):8.1f} "
              f"{1000 * percentile(values, 99):8.1f}")
    print(f"{'all':8} {total:7d} {total / elapsed:7.1f}   errors: {len(errors)}")
    for error in errors[:10]:
        print("  ", error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
