"""The object store down for 10 s while a `save_every` train job runs (issue 32, "Faults"): an API process and a
worker process on PostgreSQL + Redis + moto's S3 server, each reaching the store through a TCP proxy written here
that is cut (every open connection reset, every new one reset at once) for 10 s. The fault is on the network, the
client under test is the production one. During the cut, routes that need the store answer 503
`store_unavailable` with Retry-After and change nothing, routes that do not still answer; afterwards the job
succeeds on its first attempt with every output, metric and checkpoint there and downloadable byte for byte."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scripts.stack import ROOT, free_port
from tests.conftest import Stack, require_postgres, scratch_postgres, scratch_redis
from tests.fixtures_models import ColourOnly, torchscript_bytes
from tests.s3server import CREDENTIALS, client_credentials, s3_server

BUCKET, PREFIX = "gs-outage", "service"
OUTAGE_S = 10.0
STEPS, EVAL_EVERY = 120, 40
TRAIN = {"preset": "paper_cmnist_erm", "steps": STEPS, "eval_every": EVAL_EVERY, "save_every": 10, "seeds": [0],
         "dataset": {"name": "colored_mnist", "params": {"n_train": 2000}}, "audit": False}  # fmt: skip


class CuttableProxy:
    """A TCP proxy to the store's port. `cut()` resets every open connection and, until `restore()`, resets every
    new one as soon as it is accepted (a client sees "connection reset"); `resets` counts those."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.cut_now, self.resets = target_port, False, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    @staticmethod
    def reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            sock.close()
        except OSError:
            pass

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.cut_now:
                self.resets += 1
                self.reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                self.reset(client)
                continue
            with self.lock:
                self.open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= {source, sink}
            self.reset(source)
            self.reset(sink)

    def cut(self) -> None:
        self.cut_now = True
        with self.lock:
            doomed, self.open = list(self.open), set()
        for sock in doomed:
            self.reset(sock)

    def restore(self) -> None:
        self.cut_now = False

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def outage(tmp_path_factory) -> Iterator[tuple[Stack, list[CuttableProxy], object, Path]]:
    import boto3

    require_postgres()
    postgres, broker = scratch_postgres("gs_store_outage"), scratch_redis(14)
    root = tmp_path_factory.mktemp("outage")
    with s3_server() as server:
        server.make_bucket(BUCKET)
        moto_port = int(server.endpoint.rsplit(":", 1)[1])
        proxies = [CuttableProxy(moto_port), CuttableProxy(moto_port)]  # the API's, the worker's
        env = {"GS_DATABASE_URL": postgres, "GS_BROKER_URL": broker, "GS_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
               **CREDENTIALS}  # fmt: skip
        api = Stack("api", {**env, "GS_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxies[0].port}"}, root / "api",
                    serve_args=("--no-worker",)).start()  # fmt: skip
        worker_dir = root / "worker"
        worker_dir.mkdir()
        log = (worker_dir / "serve.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "scripts/serve.py", "--no-api"], cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, **env, "GS_VAR_DIR": str(worker_dir), "GS_PORT": str(free_port()),
                 "GS_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxies[1].port}"},
        )  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=server.endpoint, **client_credentials())  # moto itself, never cut
        try:
            yield api, proxies, s3, worker_dir
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            api.stop()
            for proxy in proxies:
                proxy.close()


def stored_objects(s3, prefix: str) -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{prefix}")
    keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
    return {key.removeprefix(f"{PREFIX}/"): s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def npz_bytes() -> bytes:
    buffer, rng = io.BytesIO(), np.random.default_rng(0)
    np.savez(buffer, x=rng.random((40, 2), dtype=np.float32), y=rng.integers(0, 2, 40),
             attribute=rng.integers(0, 2, 40), split=np.array(["train"] * 30 + ["test"] * 10))  # fmt: skip
    return buffer.getvalue()


def assert_store_unavailable(response) -> None:
    assert response.status_code == 503, (response.request.method, response.request.url, response.text)
    assert response.json()["error"]["code"] == "store_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_a_store_down_for_ten_seconds_mid_job_costs_a_503_and_a_wait_and_loses_nothing(outage):
    api, proxies, s3, worker_dir = outage
    model = torchscript_bytes(ColourOnly())
    upload = api.client.post("/v1/checkpoints", files={"file": ("m.pt", model)}, data={"format": "torchscript"})
    assert upload.status_code == 201, upload.text
    checkpoint_id = upload.json()["id"]
    job_id = api.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}).json()["id"]
    deadline = time.monotonic() + 120
    while not stored_objects(s3, f"jobs/{job_id}/resume/"):  # the job runs and has saved a state in the store
        job = api.client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)

    for proxy in proxies:
        proxy.cut()
    cut_at = time.monotonic()
    assert_store_unavailable(api.client.get(f"/v1/checkpoints/{checkpoint_id}/file"))
    assert_store_unavailable(api.client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes())},
                                             data={"name": "during"}))  # fmt: skip
    assert_store_unavailable(api.client.delete(f"/v1/checkpoints/{checkpoint_id}"))
    # What needs only the database still answers.
    assert api.client.get("/readyz").status_code == 200
    assert api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert job_id in [job["id"] for job in api.client.get("/v1/jobs").json()["items"]]
    assert api.client.get(f"/v1/jobs/{job_id}/metrics").status_code == 200
    assert api.client.get(f"/v1/checkpoints/{checkpoint_id}").json()["sha256"] == hashlib.sha256(model).hexdigest()
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
    progress_in_the_cut = api.client.get(f"/v1/jobs/{job_id}").json()
    for proxy in proxies:
        proxy.restore()
    assert proxies[1].resets > 0, "the worker never tried the store during the outage"
    assert progress_in_the_cut["status"] == "running", progress_in_the_cut

    done = api.wait_for(job_id, ("succeeded", "failed", "cancelled"), 240)
    assert done["status"] == "succeeded" and done["attempts"] == 1, (done["error"], done["attempts"])
    # Nothing lost: every evaluation once, every output in the store and downloadable as stored.
    metrics = api.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "split": "train"}).json()
    assert [m["step"] for m in metrics["items"]] == list(range(0, STEPS + 1, EVAL_EVERY))
    objects = stored_objects(s3, f"jobs/{job_id}/")
    artifacts = api.client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert artifacts
    for artifact in artifacts:
        content = api.client.get(artifact["url"]).content
        assert len(content) == artifact["size_bytes"] and content in objects.values(), artifact["name"]
    checkpoints = api.client.get("/v1/checkpoints", params={"limit": 500}).json()["items"]
    (seed,) = done["result"]["checkpoints"]
    assert {checkpoint["id"] for checkpoint in checkpoints} == {checkpoint_id, seed["torchscript"], seed["safetensors"]}
    for checkpoint in checkpoints:
        content = api.client.get(f"/v1/checkpoints/{checkpoint['id']}/file").content
        assert hashlib.sha256(content).hexdigest() == checkpoint["sha256"]
    # And what the 503s refused was left as it was: the checkpoint kept, the dataset upload can be made again.
    assert api.client.get(f"/v1/checkpoints/{checkpoint_id}/file").content == model
    again = api.client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes())}, data={"name": "after"})
    assert again.status_code == 201, again.text
    assert not [p for p in (worker_dir / "scratch" / "jobs").rglob("*") if p.is_file()]  # all of it in the store
