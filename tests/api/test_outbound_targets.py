"""Submitting a job whose callback_url or MLflow tracking_uri points inside our network is a 422."""
from __future__ import annotations

import time

import pytest

from tests.core.test_outbound import Listener

SPEC = {"preset": "paper_moons_erm", "steps": 5, "audit": False}


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def job_count(client, headers) -> int:
    return len(client.get("/v1/jobs", headers=headers, params={"limit": 500}).json()["items"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1", "0"])
def test_a_callback_url_on_loopback_is_refused_and_never_called(client, tenant, listener, host):
    headers = tenant()
    response = client.post("/v1/jobs", headers=headers, json={
        "kind": "train", "spec": SPEC, "callback_url": f"http://{host}:{listener.port}/hook"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_callback_url" and error["message"].startswith("callback_url is refused: ")
    assert "Traceback" not in error["message"] and error["details"] == {"field": "callback_url"}
    assert job_count(client, headers) == 0
    time.sleep(0.3)
    assert listener.requests == []


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "https://localhost:{port}/", "http://[::1]:{port}",
                                 "http://10.0.0.7:5000", "http://169.254.169.254/", "http://user:pw@8.8.8.8/"])
def test_an_mlflow_tracking_uri_inside_our_network_is_refused_and_never_called(client, tenant, listener, uri):
    headers = tenant()
    spec = {**SPEC, "mlflow": {"tracking_uri": uri.format(port=listener.port), "experiment": "e"}}
    response = client.post("/v1/jobs", headers=headers, json={"kind": "train", "spec": spec})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec" and error["message"].startswith("mlflow.tracking_uri is refused: ")
    assert job_count(client, headers) == 0
    time.sleep(0.3)
    assert listener.requests == []


def test_an_audit_job_callback_url_is_checked_too(client):
    from models import files as files_repo
    from models.db import database
    from models.tables import new_id

    key = client.post("/v1/api-keys", json={"name": "auditor"}).json()
    with database().session() as session:  # the audit's spec must pass: the callback is checked after it
        checkpoint = files_repo.add_checkpoint(session, id=new_id(), owner_id=key["id"], format="torchscript",
                                               path="/nonexistent.pt", sha256="0" * 64, size_bytes=1, model_info={})
    response = client.post("/v1/jobs", headers={"Authorization": f"Bearer {key['key']}"}, json={
        "kind": "audit", "spec": {"checkpoint_id": checkpoint.id}, "callback_url": "http://192.168.0.10/hook"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_callback_url", response.text


def test_a_spec_refused_on_its_own_merits_never_waits_for_dns(client, tenant, monkeypatch):
    """The fuzzer's callback hosts cost a resolver timeout each on a machine without DNS; a bad spec is
    answered first."""
    from core import outbound

    looked_up = []
    monkeypatch.setattr(outbound, "resolve", lambda host, port: looked_up.append(host) or [])
    spec = {**SPEC, "dataset": {"name": "no_such_dataset"},
            "mlflow": {"tracking_uri": "https://mlflow.invalid", "experiment": "e"}}
    response = client.post("/v1/jobs", headers=tenant(), json={
        "kind": "train", "spec": spec, "callback_url": "https://hooks.invalid/x"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_spec", response.text
    assert "no_such_dataset" in response.json()["error"]["message"] and looked_up == []


def test_a_public_callback_url_is_accepted(client, tenant):
    response = client.post("/v1/jobs", headers=tenant(), json={
        "kind": "train", "spec": SPEC, "callback_url": "https://8.8.8.8/hook"})
    assert response.status_code == 202, response.text
