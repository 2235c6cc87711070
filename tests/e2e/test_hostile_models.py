"""Hostile models against the PostgreSQL + Redis stack (issue 29): each is a 4xx at upload or a job that fails once
with a code of its own; nothing leaks, nothing is stored, nothing is re-run."""
from __future__ import annotations

import io
import time

import pytest

from tests.fixtures_models import (
    BehindAnInterface,
    InAScriptClass,
    NotANumber,
    PrintsWhileLoading,
    ReadsPastItsTensor,
    SpinsOnRealData,
    UnsafeSparse,
    WritesPastItsTensor,
    torchscript_bytes,
)

SPEC = {"dataset": {"name": "colored_mnist"}, "spurious_attribute": "color"}


def upload(stack, model) -> dict:
    response = stack.client.post("/v1/checkpoints", files={"file": ("m.pt", io.BytesIO(torchscript_bytes(model)))},
                                 data={"format": "torchscript", "input_shape": "[2, 14, 14]"})
    return {"status": response.status_code, **response.json()}


def stored(stack) -> set[str]:
    return {c["id"] for c in stack.client.get("/v1/checkpoints", params={"limit": 100}).json()["items"]}


def test_hostile_uploads_are_refused_before_they_run_and_nothing_is_stored(services_stack):
    before = stored(services_stack)
    for model, op in [(ReadsPastItsTensor(), "aten::_reshape_alias"), (WritesPastItsTensor(), "aten::_reshape_alias"),
                      (UnsafeSparse(), "aten::_sparse_coo_tensor_unsafe"), (PrintsWhileLoading(), "prim::Print"),
                      (BehindAnInterface("/etc/passwd"), "aten::from_file"),
                      (InAScriptClass("/etc/passwd"), "aten::from_file")]:
        answer = upload(services_stack, model)
        assert answer["status"] == 422 and answer["error"]["code"] == "forbidden_op", (type(model).__name__, answer)
        assert op in answer["error"]["message"]
    assert stored(services_stack) == before


def run(stack, kind: str, spec: dict) -> dict:
    job = stack.client.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert job.status_code == 202, job.text
    return stack.wait_for(job.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=240)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_an_audit_and_a_repair_once_with_their_own_code(services_stack, value):
    answer = upload(services_stack, NotANumber(value))
    assert answer["status"] in (200, 201), answer
    for kind in ("audit", "repair"):
        done = run(services_stack, kind, {"checkpoint_id": answer["id"], **SPEC})
        assert (done["status"], done["error"]["code"], done["attempts"]) == ("failed", "non_finite_output", 1), done
        assert done["result"] is None


def test_a_spinning_model_is_cancelled_within_seconds(services_stack):
    answer = upload(services_stack, SpinsOnRealData())  # returns at once on the upload check's zeros
    assert answer["status"] in (200, 201), answer
    job = services_stack.client.post("/v1/jobs", json={"kind": "audit", "spec": {"checkpoint_id": answer["id"], **SPEC}})
    assert job.status_code == 202, job.text
    services_stack.wait_for(job.json()["id"], ("running",), timeout_s=120)
    time.sleep(3)
    asked = time.monotonic()
    assert services_stack.client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 202
    done = services_stack.wait_for(job.json()["id"], ("cancelled", "failed", "succeeded"), timeout_s=20)
    assert done["status"] == "cancelled" and time.monotonic() - asked < 15
