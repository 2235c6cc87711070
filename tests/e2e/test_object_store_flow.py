"""Workers on other hosts: one API process and two workers that share nothing but PostgreSQL, Redis and an S3 store
(moto's standalone server; the code under test is the production client). Each worker runs in its own mount
namespace with an empty tmpfs over the other processes' folders, so no file can pass except through the store.
Every job kind succeeds (an image folder in the store too), files download byte for byte as stored, a worker host
lost mid-job costs only the steps since its last saved state, and the API's folder holds no job files."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scripts.stack import ROOT
from tests.conftest import Stack, require_postgres, scratch_postgres, scratch_redis
from tests.fixtures_models import ColourBlind, ColourOnly, onnx_bytes, torchscript_bytes
from tests.s3server import CREDENTIALS, client_credentials, s3_server

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for mount namespaces"
)
BUCKET, PREFIX, DATA = "gs-e2e", "service", "data"  # the service's files; image folders (GS_DATA_URLS)
FAST_REAPER = {"GS_HEARTBEAT_S": "0.5", "GS_HEARTBEAT_TIMEOUT_S": "4", "GS_SWEEP_EVERY_S": "1"}
RESUMABLE = {"preset": "paper_cmnist_erm", "steps": 200, "eval_every": 50, "save_every": 10, "seeds": [0],
             "audit": False}  # fmt: skip


class Worker:
    """`scripts/serve.py --no-api` in a mount namespace of its own, which hides `hidden` folders under empty tmpfs."""

    def __init__(self, name: str, env: dict[str, str], var_dir: Path, hidden: list[Path]) -> None:
        var_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.var_dir = name, var_dir
        mounts = " && ".join(f"mount -t tmpfs none '{folder}'" for folder in hidden)
        log = (var_dir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"{mounts} && exec '{sys.executable}' scripts/serve.py --no-api"],
            cwd=ROOT, env={**os.environ, **env, "GS_VAR_DIR": str(var_dir)}, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip

    def runs(self, pid: int) -> bool:
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def lose_host(self) -> None:
        """Every process of the host killed at once, and its folder gone."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        shutil.rmtree(self.var_dir, ignore_errors=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import boto3

    # A database and a broker of its own: the session's PostgreSQL + Redis stack, whose worker shares no store with
    # these hosts, must not take their jobs.
    require_postgres()
    postgres, broker = scratch_postgres("gs_store_hosts"), scratch_redis(11)
    root = tmp_path_factory.mktemp("hosts")
    folders = {name: root / name for name in ("api", "worker1", "worker2")}
    for folder in folders.values():
        folder.mkdir()
    with s3_server() as server:
        server.make_bucket(BUCKET)
        env = {"GS_DATABASE_URL": postgres, "GS_BROKER_URL": broker, "GS_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
               "GS_S3_ENDPOINT_URL": server.endpoint, "GS_DATA_URLS": f"s3://{BUCKET}/{DATA}/", **CREDENTIALS,
               **FAST_REAPER}  # fmt: skip
        api = Stack("api", env, folders["api"], serve_args=("--no-worker",)).start()
        workers = [
            Worker(name, env, folders[name], [folder for other, folder in folders.items() if other != name])
            for name in ("worker1", "worker2")
        ]
        s3 = boto3.client("s3", endpoint_url=server.endpoint, **client_credentials())
        try:
            yield api, workers, s3
        finally:
            for worker in workers:
                worker.stop()
            api.stop()


def stored(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()


def stored_digests(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{prefix}")
    keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
    return {hashlib.sha256(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest() for key in keys}


def upload(api: Stack, content: bytes, fmt: str) -> str:
    response = api.client.post("/v1/checkpoints", files={"file": ("m", io.BytesIO(content))}, data={"format": fmt})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def npz_dataset(api: Stack) -> str:
    buffer, rng = io.BytesIO(), np.random.default_rng(0)
    np.savez(buffer, x=rng.random((60, 2), dtype=np.float32), y=rng.integers(0, 2, 60),
             attribute=rng.integers(0, 2, 60), split=np.array(["train"] * 40 + ["test"] * 20))  # fmt: skip
    response = api.client.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue())}, data={"name": "toy"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(api: Stack, kind: str, spec: dict) -> str:
    response = api.client.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_every_job_kind_runs_on_workers_that_share_only_the_store(cluster):
    api, workers, s3 = cluster
    torchscript = upload(api, torchscript_bytes(ColourOnly()), "torchscript")
    onnx = upload(api, onnx_bytes(ColourBlind()), "onnx")
    trained = submit(api, "train", {"preset": "paper_cmnist_erm", "steps": 20, "eval_every": 10, "seeds": [0]})
    jobs = {
        "train": trained,
        "audit torchscript": submit(api, "audit", {"checkpoint_id": torchscript, "dataset": {"name": "colored_mnist"}}),
        "audit onnx": submit(api, "audit", {"checkpoint_id": onnx, "dataset": {"name": "colored_mnist"}}),
        "train npz": submit(api, "train", {"preset": "paper_moons_erm", "steps": 5, "dataset": {"name": npz_dataset(api)},
                                            "audit": False}),
        "sweep": submit(api, "sweep", {"preset": "paper_cmnist_sd", "steps": 10, "eval_every": 5, "seeds": [0],
                                       "dataset": {"name": "colored_mnist", "params": {"n_train": 600}},
                                       "method": {"warmup_steps": 2}, "grid": {"method.sd_lambda": [0.0, 2.0]}}),
    }  # fmt: skip
    assert api.wait_for(trained, ("succeeded", "failed"), 240)["status"] == "succeeded"
    jobs["repair"] = submit(api, "repair", {"train_job_id": trained, "seed": 0, "probes": ["groups"],
                                            "method": {"name": "last_layer_sd", "sd_lambdas": [1.0]}})  # fmt: skip
    for name, job_id in jobs.items():
        done = api.wait_for(job_id, ("succeeded", "failed", "cancelled"), 300)
        assert done["status"] == "succeeded", (name, done["error"])
        digests = stored_digests(s3, f"jobs/{job_id}/")
        for artifact in api.client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]:
            content = api.client.get(artifact["url"]).content
            assert len(content) == artifact["size_bytes"] and hashlib.sha256(content).hexdigest() in digests, name
        if name != "train npz" and name != "sweep":
            assert api.client.get(f"/v1/jobs/{job_id}/report").status_code == 200, name
    for checkpoint in api.client.get("/v1/checkpoints", params={"limit": 500}).json()["items"]:
        content = api.client.get(f"/v1/checkpoints/{checkpoint['id']}/file").content
        assert hashlib.sha256(content).hexdigest() == checkpoint["sha256"]
    assert stored(s3, f"checkpoints/{torchscript}.pt") == torchscript_bytes(ColourOnly())

    # A file a job needs and cannot find: said so, before any model runs.
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/checkpoints/{onnx}.onnx")
    lost = api.wait_for(submit(api, "audit", {"checkpoint_id": onnx, "dataset": {"name": "colored_mnist"}}),
                        ("succeeded", "failed"), 120)  # fmt: skip
    assert lost["status"] == "failed" and lost["error"]["code"] == "missing_input", lost["error"]
    assert onnx in lost["error"]["message"] and "/tmp" not in lost["error"]["message"]

    # Deleting a job deletes its objects.
    assert api.client.delete(f"/v1/jobs/{jobs['train npz']}").status_code == 204
    assert stored_digests(s3, f"jobs/{jobs['train npz']}/") == set()

    # The API's folder holds no job files: only its log.
    assert [p.name for p in api.var_dir.rglob("*") if p.is_file()] == ["serve.log"]
    for worker in workers:  # and a worker keeps a job's files only while it runs: the store has them
        assert not [p for p in (worker.var_dir / "scratch" / "jobs").rglob("*") if p.is_file()], worker.name


def test_a_lost_worker_host_costs_only_the_steps_since_its_last_saved_state(cluster):
    api, workers, s3 = cluster
    job_id = submit(api, "train", RESUMABLE)
    deadline = time.monotonic() + 300  # 2 cores shared with other test stacks: steps can be slow
    while (job := api.client.get(f"/v1/jobs/{job_id}").json())["progress"] < 0.4:  # past 35 %
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    child = int(job["worker_id"].rsplit(":", 1)[1])
    (host,) = [worker for worker in workers if worker.runs(child)]
    host.lose_host()
    done = api.wait_for(job_id, ("succeeded", "failed"), 240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and int(done["result"]["resumed"]["0"]) > 0, done["result"].get("resumed")
    metrics = api.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "split": "train"}).json()
    assert [m["step"] for m in metrics["items"]] == [0, 50, 100, 150, 200]  # each evaluation once
    assert not list(api.var_dir.rglob("jobs"))


def test_a_folder_in_the_store_is_trained_on_and_audited_by_workers_that_read_it_from_there(cluster, tmp_path):
    from tests.science.test_image_folders import N_TEST, coloured_folder

    api, workers, s3 = cluster
    coloured_folder(tmp_path / "coloured")  # 72 12x12 images and their counterfactuals
    for path in sorted(p for p in (tmp_path / "coloured").rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, f"{DATA}/coloured/{path.relative_to(tmp_path / 'coloured').as_posix()}")
    response = api.client.post("/v1/datasets", data={"name": "coloured", "format": "image_folder",
                                                     "folder": f"s3://{BUCKET}/{DATA}/coloured/", "image_size": "8"})  # fmt: skip
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 120
    while (dataset := api.client.get(f"/v1/datasets/{response.json()['id']}").json())["status"] == "pending":
        assert time.monotonic() < deadline, "the check never ended"
        time.sleep(0.2)
    assert dataset["status"] == "ready" and dataset["description"]["counterfactual"], dataset

    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn", "channels": [4]}, "steps": 4,
            "batch_size": 16, "eval_every": 4, "seeds": [0], "audit": False}  # fmt: skip
    trained = api.wait_for(submit(api, "train", spec), ("succeeded", "failed"), 240)
    assert trained["status"] == "succeeded", trained["error"]
    checkpoint = trained["result"]["checkpoints"][0]["safetensors"]
    audit = {"checkpoint_id": checkpoint, "dataset": {"name": dataset["id"]}, "spurious_attribute": "attribute"}
    audited = api.wait_for(submit(api, "audit", audit), ("succeeded", "failed"), 240)
    assert audited["status"] == "succeeded", audited["error"]
    report = api.client.get(f"/v1/jobs/{audited['id']}/report").json()
    assert sum(group["n"] for group in report["groups"]) == N_TEST and "counterfactual" in report
    cached = [p for worker in workers for p in (worker.var_dir / "cache").glob("*.png")]
    assert cached, "the workers read the images through their caches"
    assert not [p for p in api.var_dir.rglob("*.png")]  # the API's check kept none of them
