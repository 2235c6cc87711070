"""On PostgreSQL + Redis with a worker: a key's folder and all built on it are a 404 to another key, what a key
stores is bounded, and DELETE waits for the jobs that use it."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tests.conftest import POSTGRES_URL, Stack, scratch_postgres
from tests.science.test_image_folders import coloured_folder


def new_key(stack, name: str) -> tuple[str, dict[str, str]]:
    response = stack.client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['key']}"}


def ready_folder(stack, headers, folder: str) -> dict:
    response = stack.client.post("/v1/datasets", headers=headers, data={
        "name": folder, "format": "image_folder", "folder": folder, "image_size": "8"})
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    while (dataset := stack.client.get(f"/v1/datasets/{response.json()['id']}", headers=headers).json())[
            "status"] == "pending":
        assert time.monotonic() < deadline, "the check never ended"
        time.sleep(0.2)
    assert dataset["status"] == "ready", dataset
    return dataset


def wait_until(stack, job_id: str, headers, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := stack.client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_a_folder_and_its_jobs_are_a_404_to_another_key_and_deleting_waits_for_them(services_stack):
    stack = services_stack
    a_id, a = new_key(stack, "a")
    _, b = new_key(stack, "b")
    coloured_folder(stack.var_dir / "data" / a_id / "coloured")
    dataset = ready_folder(stack, a, "coloured")

    refused = [stack.client.post("/v1/datasets", headers=b, data={"name": "x", "format": "image_folder",
                                                                  "folder": folder})
               for folder in (f"../{a_id}/coloured", "coloured", "nowhere")]
    assert {r.status_code for r in refused} == {422} and len({r.text for r in refused}) == 1, refused[0].text

    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn", "channels": [4]}, "batch_size": 8,
            "steps": 100_000, "eval_every": 100_000, "seeds": [0]}
    running = stack.client.post("/v1/jobs", headers=a, json={"kind": "train", "spec": spec})
    assert running.status_code == 202, running.text
    job_id = running.json()["id"]
    for path in (f"/v1/datasets/{dataset['id']}", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/logs"):
        assert stack.client.get(path, headers=b).status_code == 404, path
    assert stack.client.delete(f"/v1/datasets/{dataset['id']}", headers=b).status_code == 404
    named_by_b = stack.client.post("/v1/jobs", headers=b, json={"kind": "train", "spec": spec})
    made_up = stack.client.post("/v1/jobs", headers=b, json={"kind": "train", "spec": {
        **spec, "dataset": {"name": "f" * 32}}})
    assert named_by_b.status_code == made_up.status_code == 422
    assert named_by_b.text.replace(dataset["id"], "f" * 32) == made_up.text

    wait_until(stack, job_id, a, ("running",))
    busy = stack.client.delete(f"/v1/datasets/{dataset['id']}", headers=a)
    assert busy.status_code == 409 and busy.json()["error"]["details"]["jobs"] == [job_id], busy.text
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=a).status_code == 202
    wait_until(stack, job_id, a, ("cancelled",))
    assert stack.client.delete(f"/v1/datasets/{dataset['id']}", headers=a).status_code == 204
    assert stack.client.get(f"/v1/datasets/{dataset['id']}", headers=a).status_code == 404
    assert not (stack.var_dir / "storage" / "datasets" / f"{dataset['id']}.index.npz").exists()
    assert (stack.var_dir / "data" / a_id / "coloured" / "metadata.csv").exists()


@pytest.fixture(scope="module")
def quota_api(tmp_path_factory):
    """The API alone (no worker: jobs stay queued) with small storage quotas, on a database of its own named after
    GS_TEST_POSTGRES_URL's."""
    database = scratch_postgres(POSTGRES_URL.rsplit("/", 1)[-1] + "_quota")
    var_dir = tmp_path_factory.mktemp("quota-postgres")
    stack = Stack("quota-postgres", {"GS_DATABASE_URL": database, "GS_BROKER_URL": "filesystem://",
                                     "GS_DATA_DIR": str(var_dir / "data"), "GS_MAX_DATASETS_PER_KEY": "2",
                                     "GS_MAX_STORED_BYTES_PER_KEY": str(STORED)}, var_dir, serve_args=("--no-worker",))
    yield stack.start(probe="/healthz")
    stack.stop()


def npz(rows: int = 40) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((rows, 2), np.float32), y=np.arange(rows) % 2, attribute=np.arange(rows) // 2 % 2,
             split=np.array(["train", "test"] * (rows // 2)))
    return buffer.getvalue()


STORED = len(npz()) * 3 // 2  # one .npz below fits, two do not


def test_quotas_delete_of_a_queued_jobs_dataset_and_the_sweep_budget_on_postgresql(quota_api):
    stack = quota_api
    key_id, headers = new_key(stack, "quota")

    def register():
        return stack.client.post("/v1/datasets", headers=headers, data={"name": "toy"},
                                 files={"file": ("d.npz", npz())})

    first = register()
    assert first.status_code == 201, first.text
    over_bytes = register()
    assert over_bytes.status_code == 413 and over_bytes.json()["error"]["code"] == "storage_quota_exceeded"
    assert over_bytes.json()["error"]["details"]["stored_bytes"] == len(npz())
    coloured_folder(stack.var_dir / "data" / key_id / "coloured")
    ready_folder(stack, headers, "coloured")  # a folder's images are not ours: it counts, at 0 bytes
    over_count = register()
    assert over_count.status_code == 429 and over_count.json()["error"]["code"] == "too_many_datasets"
    assert stack.client.delete(f"/v1/datasets/{first.json()['id']}", headers=headers).status_code == 204
    again = register()
    assert again.status_code == 201, again.text

    queued = stack.client.post("/v1/jobs", headers=headers, json={"kind": "train", "spec": {
        "preset": "paper_moons_erm", "dataset": {"name": again.json()["id"]}}})
    assert queued.status_code == 202, queued.text
    busy = stack.client.delete(f"/v1/datasets/{again.json()['id']}", headers=headers)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use", busy.text
    assert stack.client.post(f"/v1/jobs/{queued.json()['id']}/cancel", headers=headers).status_code == 202
    assert stack.client.delete(f"/v1/datasets/{again.json()['id']}", headers=headers).status_code == 204
    assert not (stack.var_dir / "storage" / "datasets" / f"{again.json()['id']}.npz").exists()

    spec = {"preset": "paper_moons_sd", "model": {"arch": "mlp", "hidden": [4096, 4096]}, "seeds": [0],
            "grid": {"method.sd_lambda": [0.01 * (i + 1) for i in range(16)], "method.sd_gamma": [0.1, 0.2, 0.3, 0.4]}}
    refused = stack.client.post("/v1/jobs", headers=headers, json={"kind": "sweep", "spec": spec})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "over_budget" and error["details"]["field"] == "spec.grid"


def test_deleting_a_checkpoint_a_job_made_drops_its_artifact_and_file(services_stack):
    stack = services_stack
    _, headers = new_key(stack, "trainer")
    job = stack.client.post("/v1/jobs", headers=headers, json={"kind": "train", "spec": {
        "preset": "paper_moons_erm", "steps": 2, "eval_every": 2, "seeds": [0], "audit": False}})
    assert job.status_code == 202, job.text
    done = wait_until(stack, job.json()["id"], headers, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    checkpoint_id = done["result"]["checkpoints"][0]["torchscript"]
    path = stack.var_dir / "storage" / "jobs" / done["id"]
    before = {a["name"] for a in stack.client.get(f"/v1/jobs/{done['id']}/artifacts", headers=headers).json()["items"]}
    assert "seed0.torchscript.pt" in before and (path / "seed0.torchscript.pt").exists()
    assert stack.client.delete(f"/v1/checkpoints/{checkpoint_id}", headers=headers).status_code == 204
    after = {a["name"] for a in stack.client.get(f"/v1/jobs/{done['id']}/artifacts", headers=headers).json()["items"]}
    assert after == before - {"seed0.torchscript.pt"} and not (path / "seed0.torchscript.pt").exists()
