"""A kind is its own modules: a toy kind (tests/kinds/toy.py: spec, resolve, run, summary), entered in the registries
and nowhere else, runs end to end through the API and a worker on the embedded default, and is served, listed,
refused and failed like the built-in kinds."""

from __future__ import annotations

import os

import pytest

from cli import render
from scripts.stack import Stack
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def toy_stack(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("toy")
    hook = var_dir / "hook"
    hook.mkdir()
    # Every process of the stack (the API, the worker and its children) registers the kind before anything else.
    (hook / "sitecustomize.py").write_text("from tests.kinds import toy\n\ntoy.register()\n")
    path = os.pathsep.join(p for p in (str(hook), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    stack = Stack(
        "embedded+toy",
        {"GS_DATABASE_URL": f"sqlite:///{var_dir / 'gs.sqlite3'}", "GS_BROKER_URL": "filesystem://",
         "PYTHONPATH": path},
        var_dir,
    )
    yield stack.start()
    stack.stop()


def test_a_toy_kind_runs_end_to_end_and_is_summarised(toy_stack):
    client = toy_stack.client
    created = client.post("/v1/jobs", json={"kind": "toy", "spec": {"numbers": [1.5, 2.5, 3]}})
    assert created.status_code == 202, created.text
    assert created.json()["summary"] == {"what": "sum of 3 numbers", "on": None, "numbers": {}, "verdict": None}
    job = toy_stack.wait_for(created.json()["id"], ("succeeded", "failed"), timeout_s=60)
    assert job["status"] == "succeeded", job
    assert job["result"] == {"total": 7.0, "count": 3}
    assert job["summary"]["numbers"] == {"total": 7.0}
    assert render.what(job) == "toy sum of 3 numbers"  # the CLI knows nothing of the kind
    listed = client.get("/v1/jobs").json()["items"]
    assert [item["kind"] for item in listed] == ["toy"]
    logs = client.get(f"/v1/jobs/{job['id']}/logs").json()["items"]
    assert any(line["message"] == "adding 3 numbers" for line in logs)
    assert client.get(f"/v1/jobs/{job['id']}/report").json()["error"]["code"] == "no_report"
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"ToyJobCreate", "ToyJobOut", "ToyResult"} <= set(schemas)


def test_a_toy_kinds_bad_spec_is_a_422_naming_the_field_and_records_nothing(toy_stack):
    client = toy_stack.client
    before = client.get("/v1/jobs").json()["items"]
    too_many = client.post("/v1/jobs", json={"kind": "toy", "spec": {"numbers": [1.0] * 101}})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["code"] == "invalid_spec"
    assert too_many.json()["error"]["details"] == {"field": "spec.numbers"}
    empty = client.post("/v1/jobs", json={"kind": "toy", "spec": {"numbers": []}})
    assert empty.status_code == 422
    unknown = client.post("/v1/jobs", json={"kind": "toys", "spec": {"numbers": [1]}})
    assert unknown.status_code == 422
    assert client.get("/v1/jobs").json()["items"] == before


def test_a_malformed_result_fails_the_job_with_internal_error_and_a_log_line(toy_stack):
    created = toy_stack.client.post("/v1/jobs", json={"kind": "toy", "spec": {"numbers": [1], "malformed": True}})
    job = toy_stack.wait_for(created.json()["id"], ("succeeded", "failed"), timeout_s=60)
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["code"] == "internal_error"
    assert f"job {job['id']}: its result is not a ToyResult" in toy_stack.log()
    logs = toy_stack.client.get(f"/v1/jobs/{job['id']}/logs").json()["items"]
    assert any("malformed result" in line["message"] for line in logs)
