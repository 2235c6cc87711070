"""The whole pipeline: HTTP → database → broker → worker process → database → HTTP.

Every test here runs twice: on the embedded default and on PostgreSQL + Redis.
"""
from __future__ import annotations

import json
import time

SHORT_TRAIN = {"preset": "paper_cmnist_erm", "steps": 20, "eval_every": 10, "seeds": [0, 1]}
LONG_TRAIN = {"preset": "paper_moons_erm", "steps": 100_000, "eval_every": 1000, "seeds": [0]}


def submit(stack, spec: dict, **extra) -> dict:
    response = stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def test_train_job_succeeds_and_serves_its_metrics(stack):
    job = submit(stack, SHORT_TRAIN, tags={"suite": "e2e"})
    assert job["status"] == "queued" and job["attempts"] == 0

    done = stack.wait_for(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["attempts"] == 1
    assert done["started_at"] and done["finished_at"] >= done["started_at"]
    test_accuracy = done["result"]["splits"]["test"]["accuracy"]
    assert 0.0 <= test_accuracy["mean"] <= 1.0 and test_accuracy["std"] >= 0.0
    assert [c["seed"] for c in done["result"]["checkpoints"]] == [0, 1]

    metrics = stack.client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "accuracy"}).json()["items"]
    steps = sorted({m["step"] for m in metrics})
    assert steps == [0, 10, 20]  # before training, every eval_every, and after the last update
    assert {m["seed"] for m in metrics} == {0, 1}
    assert {"train", "test"} <= {m["split"] for m in metrics}

    later = stack.client.get(f"/v1/jobs/{job['id']}/metrics", params={"since_step": 10}).json()["items"]
    assert later and min(m["step"] for m in later) >= 10

    listed = stack.client.get("/v1/jobs", params={"tag": "suite:e2e", "status": "succeeded"}).json()
    assert job["id"] in [j["id"] for j in listed["items"]]

    checkpoint_id = done["result"]["checkpoints"][0]["torchscript"]
    download = stack.client.get(f"/v1/checkpoints/{checkpoint_id}/file")
    assert download.status_code == 200 and download.content[:2] == b"PK"  # a TorchScript zip

    lines = [line["message"] for line in stack.client.get(f"/v1/jobs/{job['id']}/logs").json()["items"]]
    assert lines[0].startswith("train job started: attempt 1 on worker ")
    assert [line.split(":")[0] for line in lines[1:-1]] == ["step 0/20", "step 10/20", "step 20/20"]
    assert "test accuracy" in lines[2] and lines[2].endswith("(mean of 2 seeds)")
    assert lines[-1].startswith("succeeded after ")
    followed = stack.client.get(f"/v1/jobs/{job['id']}/logs", params={"follow": "true"})  # finished: ends at once
    assert followed.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["message"] for line in followed.text.splitlines()] == lines


def test_cancelled_job_stops_within_seconds_and_frees_its_worker(stack):
    job = submit(stack, LONG_TRAIN)
    stack.wait_for(job["id"], ("running",), timeout_s=60)
    followed: list[dict] = []  # the log, followed while the job runs, ends when it does
    with stack.client.stream("GET", f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}) as stream:
        for line in stream.iter_lines():
            followed.append(json.loads(line))
            if len(followed) == 2:  # started, and the first evaluation: the job is well under way
                asked = time.monotonic()
                response = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
                assert response.status_code == 202 and response.json()["cancel_requested"] is True
    cancelled = stack.wait_for(job["id"], ("cancelled", "succeeded", "failed"), timeout_s=10)
    assert cancelled["status"] == "cancelled"
    assert time.monotonic() - asked < 5.0
    assert followed[1]["message"].startswith("step 0/100000:") and followed[-1]["message"].startswith("cancelled after")

    follow_up = submit(stack, {**SHORT_TRAIN, "seeds": [0]})
    assert stack.wait_for(follow_up["id"], ("succeeded", "failed"), timeout_s=90)["status"] == "succeeded"


def test_cancel_of_a_queued_job_is_immediate_and_it_never_runs(stack):
    blocker = submit(stack, LONG_TRAIN)
    queued = submit(stack, SHORT_TRAIN)
    response = stack.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.json()["status"] == "cancelled"
    stack.client.post(f"/v1/jobs/{blocker['id']}/cancel")
    stack.wait_for(blocker["id"], ("cancelled",), timeout_s=30)
    time.sleep(1.0)  # give the worker the chance to (wrongly) pick the cancelled job up
    again = stack.client.get(f"/v1/jobs/{queued['id']}").json()
    assert again["status"] == "cancelled" and again["attempts"] == 0 and again["started_at"] is None
    assert stack.client.delete(f"/v1/jobs/{queued['id']}").status_code == 204
    assert stack.client.get(f"/v1/jobs/{queued['id']}").status_code == 404


def test_train_job_mirrors_its_metric_history_to_mlflow(embedded_stack, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    job = submit(embedded_stack, {**SHORT_TRAIN, "seeds": [0], "audit": False,
                                  "mlflow": {"tracking_uri": uri, "experiment": "e2e"}})
    done = embedded_stack.wait_for(job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    run_id = done["result"]["mlflow"]["run_id"]
    lines = [line["message"] for line in embedded_stack.client.get(f"/v1/jobs/{job['id']}/logs").json()["items"]]
    assert f"MLflow run {run_id} in experiment e2e" in lines and done["warnings"] == []

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    ours = embedded_stack.client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "loss", "split": "test"}).json()
    theirs = client.get_metric_history(run_id, "loss/test/seed0")
    assert sorted((m.step, m.value) for m in theirs) == sorted((m["step"], m["value"]) for m in ours["items"])
    assert len(theirs) == 3


def test_mlflow_targets_on_the_workers_disk_are_refused(embedded_stack):
    response = embedded_stack.client.post("/v1/jobs", json={"kind": "train", "spec": {
        **SHORT_TRAIN, "mlflow": {"tracking_uri": "sqlite:////etc/x.db", "experiment": "e"}}})
    assert response.status_code == 422 and "tracking_uri" in response.json()["error"]["message"]
