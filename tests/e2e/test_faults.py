"""No job lost, none stuck: killed workers and a broker that is down, with real processes.

Runs on PostgreSQL + Redis (scratch databases, so the shared stack is not disturbed).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import Stack, free_port, scratch_postgres, scratch_redis

FAST_REAPER = {"GS_HEARTBEAT_S": "0.5", "GS_HEARTBEAT_TIMEOUT_S": "4", "GS_SWEEP_EVERY_S": "1", "GS_MAX_ATTEMPTS": "3"}
# Long enough to be killed mid-run (several seconds on 2 cores), short enough to finish.
JOB = {"preset": "paper_cmnist_erm", "steps": 300, "eval_every": 50, "seeds": [0], "audit": False}


def worker_pids(job: dict) -> tuple[int, int]:
    """(child, parent) pids of the Celery process running the job."""
    child = int(job["worker_id"].rsplit(":", 1)[1])
    with open(f"/proc/{child}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    return child, parent


def wait_running_attempt(stack: Stack, job_id: str, attempt: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stack.client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["attempts"] == attempt and job["worker_id"]:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"attempt {attempt} of job {job_id} never ran\n{stack.log()}")


@pytest.fixture
def fault_stack(tmp_path):
    broker = scratch_redis(7)
    stack = Stack("faults", {"GS_DATABASE_URL": scratch_postgres("gs_faults"), "GS_BROKER_URL": broker,
                             **FAST_REAPER}, tmp_path)
    yield stack.start()
    stack.stop()


def test_killed_workers_never_leave_a_job_running(fault_stack):
    stack = fault_stack
    job_id = stack.client.post("/v1/jobs", json={"kind": "train", "spec": JOB}).json()["id"]

    # Attempt 1: the worker's child dies. Attempt 2: the whole worker (parent and child) dies.
    child, _ = worker_pids(wait_running_attempt(stack, job_id, 1))
    os.kill(child, signal.SIGKILL)
    child, parent = worker_pids(wait_running_attempt(stack, job_id, 2))
    os.kill(parent, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)

    # Attempt 3 runs on a new worker (serve.py restarted it) and finishes.
    done = stack.wait_for(job_id, ("succeeded", "failed"), timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 3
    metrics = stack.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "split": "train"}).json()
    steps = [m["step"] for m in metrics["items"]]
    assert steps == sorted(set(steps)), "a re-run must not leave the lost attempts' metrics behind"

    # Killed at every attempt: it fails with worker_lost after max attempts, never stays running.
    job_id = stack.client.post("/v1/jobs", json={"kind": "train", "spec": JOB}).json()["id"]
    for attempt in (1, 2, 3):
        child, _ = worker_pids(wait_running_attempt(stack, job_id, attempt))
        os.kill(child, signal.SIGKILL)
    failed = stack.wait_for(job_id, ("succeeded", "failed"), timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert failed["attempts"] == 3


# A ResNet (narrow: its BatchNorm state is what a resume must carry, not its size) saving a resumable state every few
# steps: killed past its first saves, the next attempt goes on from there.
RESUMABLE = {"preset": "paper_cmnist_erm", "model": {"arch": "resnet18", "width": 8}, "batch_size": 64, "steps": 120,
             "eval_every": 40, "save_every": 5, "seeds": [0], "audit": False}


def test_a_killed_resnet_job_resumes_from_its_last_saved_step(fault_stack):
    stack = fault_stack
    job_id = stack.client.post("/v1/jobs", json={"kind": "train", "spec": RESUMABLE}).json()["id"]
    child, _ = worker_pids(wait_running_attempt(stack, job_id, 1))
    deadline = time.monotonic() + 240
    while (job := stack.client.get(f"/v1/jobs/{job_id}").json())["progress"] < 0.3:  # past step 36: saves at 5..35
        assert job["status"] == "running" and time.monotonic() < deadline, job
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)

    done = stack.wait_for(job_id, ("succeeded", "failed"), timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and int(done["result"]["resumed"]["0"]) >= 35, done["result"].get("resumed")
    metrics = stack.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "split": "train"}).json()
    assert [m["step"] for m in metrics["items"]] == [0, 40, 80, 120]  # each evaluation once, none lost or repeated
    lines = [line["message"] for line in stack.client.get(f"/v1/jobs/{job_id}/logs").json()["items"]]
    assert any(line.startswith("seed 0 resumed from its state saved at step ") for line in lines)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_jobs_submitted_while_the_broker_is_down_run_exactly_once_when_it_is_back(tmp_path):
    port = free_port()
    stack = Stack("dead-broker", {"GS_DATABASE_URL": scratch_postgres("gs_dead_broker"),
                                  "GS_BROKER_URL": f"redis://127.0.0.1:{port}/0", **FAST_REAPER}, tmp_path)
    stack.start(probe="/healthz")
    broker = None
    try:
        assert stack.client.get("/readyz").status_code == 503
        asked = time.monotonic()
        ids = [stack.client.post("/v1/jobs", json={"kind": "train", "spec": {**JOB, "steps": 20}}).json()["id"]
               for _ in range(3)]
        assert time.monotonic() - asked < 5, "a dead broker must not hold up submissions"
        time.sleep(2)
        assert {stack.client.get(f"/v1/jobs/{i}").json()["status"] for i in ids} == {"queued"}

        broker = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
        for job_id in ids:
            done = stack.wait_for(job_id, ("succeeded", "failed"), timeout_s=120)
            assert done["status"] == "succeeded" and done["attempts"] == 1, done
        metrics = stack.client.get(f"/v1/jobs/{ids[0]}/metrics", params={"name": "loss", "split": "train"}).json()
        assert [m["step"] for m in metrics["items"]] == [0, 20]  # each step once: it ran once
    finally:
        stack.stop()
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)


class CuttableLink:
    """A TCP relay in front of PostgreSQL that a test can cut: open connections are reset and new ones are
    closed at once, as when the server stops; restored, it relays again."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target, self.up, self.open = target, True, set()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def cut(self) -> None:
        import socket

        self.up = False
        with self.lock:
            for end in self.open:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_ten_second_database_outage_mid_job_is_503s_and_the_job_succeeds_once(tmp_path):
    from urllib.parse import urlsplit

    broker = scratch_redis(7)
    database = scratch_postgres("gs_outage")
    real = urlsplit(database)
    link = CuttableLink((real.hostname, real.port or 5432))
    stack = Stack("outage", {"GS_DATABASE_URL": database.replace(f":{real.port or 5432}/", f":{link.port}/"),
                             "GS_BROKER_URL": broker, "GS_SWEEP_EVERY_S": "1"}, tmp_path).start()
    try:
        spec = {"preset": "paper_moons_erm", "steps": 2000, "eval_every": 250, "seeds": [0], "audit": False}
        job_id = stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec}).json()["id"]
        stack.wait_for(job_id, ("running",), timeout_s=60)
        link.cut()
        try:
            during = stack.client.get(f"/v1/jobs/{job_id}")
            assert during.status_code == 503 and int(during.headers["Retry-After"]) > 0, during.text
            time.sleep(10)
        finally:
            link.restore()
        done = stack.wait_for(job_id, ("succeeded", "failed", "cancelled"), timeout_s=180)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, stack.log())
        losses = stack.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "split": "train"}).json()
        assert [m["step"] for m in losses["items"]] == list(range(0, 2001, 250))  # each evaluation kept, once
        lines = [line["message"] for line in stack.client.get(f"/v1/jobs/{job_id}/logs").json()["items"]]
        assert sum("job started" in line for line in lines) == 1 and lines[-1].startswith("succeeded after")
        assert sum("database is unavailable" in line for line in lines) <= 1  # said once, not at every poll
    finally:
        stack.stop()
        link.close()
