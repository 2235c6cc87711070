"""Two API processes on one database (issue 32, "Started apart"): two `scripts/serve.py --no-worker` on their own
ports and folders and one `--no-api` worker, sharing PostgreSQL, Redis and the files' folder. A job made through
one is read, listed, paged and cancelled through the other; an Idempotency-Key holds across both, also when both
get the request at once; with both APIs' background loops dispatching and delivering webhooks, every job is sent
to the broker once, runs once, and its webhook arrives once."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scripts.stack import ROOT
from tests.conftest import Stack, free_port, require_postgres, scratch_postgres, scratch_redis

QUICK = {"GS_SWEEP_EVERY_S": "0.5", "GS_DISPATCH_EVERY_S": "0.3", "GS_OUTBOUND_ALLOW": "127.0.0.1",
         "GS_DISPATCH_WINDOW": "1"}  # fmt: skip  (a window of 1: the backlog goes out from the loops, not the request)
SHORT = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5, "seeds": [0], "audit": False}}
LONG = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 100_000, "eval_every": 1000, "seeds": [0],
                                  "audit": False}}  # fmt: skip


class Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        Hooks.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def two_apis(tmp_path_factory):
    require_postgres()
    postgres, broker = scratch_postgres("gs_two_apis"), scratch_redis(15)
    root = tmp_path_factory.mktemp("two-apis")
    env = {"GS_DATABASE_URL": postgres, "GS_BROKER_URL": broker, "GS_STORAGE_URL": f"file://{root / 'files'}",
           **QUICK}  # fmt: skip
    apis = [Stack(name, env, root / name, serve_args=("--no-worker",)) for name in ("api-a", "api-b")]
    for api in apis:
        api.start()
    worker_dir = root / "worker"
    worker_dir.mkdir()
    with (worker_dir / "serve.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "scripts/serve.py", "--no-api"], cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
            env={**apis[0].env, **env, "GS_VAR_DIR": str(worker_dir), "GS_PORT": str(free_port())},
        )  # fmt: skip
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        yield apis, worker_dir / "serve.log", f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    finally:
        hooks.shutdown()
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        for api in apis:
            api.stop()


def as_tenant(api: Stack, secret: str) -> httpx.Client:
    return httpx.Client(base_url=str(api.client.base_url), headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def submit(client: httpx.Client, body: dict, key: str) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})


def received_by_the_worker(worker_log: Path, job_id: str) -> int:
    return sum(1 for line in worker_log.read_text().splitlines() if "received" in line and job_id in line)


def test_two_apis_serve_one_database_as_one(two_apis):
    apis, worker_log, hook_url = two_apis
    secret = apis[0].client.post("/v1/api-keys", json={"name": "both"}).json()["key"]
    a, b = as_tenant(apis[0], secret), as_tenant(apis[1], secret)
    run = uuid.uuid4().hex[:8]
    tagged = {**SHORT, "tags": {"run": run}, "callback_url": hook_url}

    # Submitted alternately, each read back from the other API.
    jobs = []
    for index in range(6):
        here, there = (a, b) if index % 2 == 0 else (b, a)
        made = submit(here, tagged, f"{run}-{index}")
        assert made.status_code == 202, made.text
        jobs.append(made.json()["id"])
        assert there.get(f"/v1/jobs/{jobs[-1]}").json()["spec"] == made.json()["spec"]

    # The Idempotency-Key of a request made through A, replayed through B; another body with it refused by B.
    replayed = submit(b, tagged, f"{run}-0")
    assert replayed.status_code == 202 and replayed.json()["id"] == jobs[0]
    reused = submit(b, {**tagged, "tags": {"run": run, "other": "body"}}, f"{run}-0")
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    # Both APIs given one new request at once, a few times each: one job.
    with ThreadPoolExecutor(8) as pool:
        raced = list(pool.map(lambda client: submit(client, tagged, f"{run}-race"), [a, b] * 4))
    assert [r.status_code for r in raced] == [202] * 8, [r.text for r in raced]
    assert len({r.json()["id"] for r in raced}) == 1
    jobs.append(raced[0].json()["id"])

    # A long job made through A, cancelled through B.
    long_job = submit(a, {**LONG, "tags": {"run": run}, "callback_url": hook_url}, f"{run}-long").json()["id"]
    assert b.post(f"/v1/jobs/{long_job}/cancel").status_code == 202

    # Listed the same by both, a page at a time, with a cursor from one used on the other.
    def listed(first: httpx.Client, second: httpx.Client) -> list[str]:
        ids, cursor, clients = [], None, [first, second]
        while True:
            page = clients[len(ids) // 2 % 2].get("/v1/jobs", params={"tag": f"run:{run}", "limit": 2,
                                                                     **({"cursor": cursor} if cursor else {})})  # fmt: skip
            assert page.status_code == 200, page.text
            ids += [job["id"] for job in page.json()["items"]]
            if not (cursor := page.json()["next_cursor"]):
                return ids
    assert listed(a, b) == listed(b, a) and sorted(listed(a, b)) == sorted([*jobs, long_job])

    deadline = time.monotonic() + 150
    finished: dict[str, dict] = {}
    while len(finished) < len(jobs) + 1:
        assert time.monotonic() < deadline, f"{len(finished)} of {len(jobs) + 1} finished\n{apis[0].log()}"
        for job_id in [*jobs, long_job]:
            job = (a if len(finished) % 2 else b).get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                finished[job_id] = job
        time.sleep(0.3)
    assert finished[long_job]["status"] == "cancelled"
    for job_id in jobs:
        assert finished[job_id]["status"] == "succeeded" and finished[job_id]["attempts"] == 1, finished[job_id]
        assert received_by_the_worker(worker_log, job_id) == 1, job_id  # sent once, with two dispatchers

    # One webhook a job, with both APIs' delivery loops running: wait for all, then a few rounds more for a twin.
    deadline = time.monotonic() + 30
    while len(Hooks.received) < len(jobs) + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    delivered = [hook["id"] for hook in Hooks.received]
    assert sorted(delivered) == sorted([*jobs, long_job]), delivered
