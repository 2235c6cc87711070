"""Zoo models (tests/zoo.py) through the whole service: uploaded, audited and repaired in their jail; refusals
and hostile graphs answered with a 4xx and a code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import zoo
from tests.e2e.test_audit_flow import validate_against_openapi
from tests.science.test_zoo import IntoAnotherModulesBuffer, onnx_graph, run_plain

TIMEOUT_S = 300
DATASET = {"name": "colored_mnist", "params": {"n_train": zoo.N_TRAIN}}


def upload(stack, data: bytes, fmt: str, input_shape: str = "[2, 14, 14]"):
    return stack.client.post("/v1/checkpoints", files={"file": ("m", data)},
                             data={"format": fmt, "input_shape": input_shape})


def uploaded(stack, name: str, fmt: str) -> str:
    response = upload(stack, zoo.exported(name, fmt), fmt)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def finished(stack, kind: str, spec: dict) -> dict:
    response = stack.client.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert response.status_code == 202, response.text
    done = stack.wait_for(response.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=TIMEOUT_S)
    assert done["status"] == "succeeded", done["error"]
    return done


@pytest.mark.parametrize(("name", "fmt"), [("raw_parameters", "torchscript"), ("hand_built_onnx", "onnx")])
def test_a_model_of_ones_own_is_audited_and_repaired_through_the_service(embedded_stack, name, fmt):
    stack = embedded_stack
    checkpoint = uploaded(stack, name, fmt)
    head = stack.client.get(f"/v1/checkpoints/{checkpoint}").json()["model_info"]["head"]
    assert head["repairable"] and head["node"].startswith(("aten::matmul + aten::add", "MatMul + Add"))

    audit = finished(stack, "audit", {"checkpoint_id": checkpoint, "dataset": DATASET,
                                      "probes": ["counterfactual", "linear_probe"]})
    report = stack.client.get(f"/v1/jobs/{audit['id']}/report").json()
    validate_against_openapi(stack, report, "Report")
    assert report["head"] == head and report["linear_probe"]["layer"] == head["features"]
    assert report["linear_probe"]["core_accuracy"] is not None

    done = finished(stack, "repair", {"checkpoint_id": checkpoint, "dataset": DATASET, "probes": ["counterfactual"]})
    before, after = done["result"]["before"], done["result"]["after"]
    accuracy = {when: done["result"]["reports"][when]["counterfactual"]["accuracy"] for when in ("before", "after")}
    assert after["flip_rate"] <= before["flip_rate"] - 0.15 and accuracy["after"] >= accuracy["before"]
    assert done["result"]["repair"]["head"] == head

    # The downloaded file, run by plain torch.jit.load or onnxruntime, predicts what the after-audit measured.
    data = stack.client.get(f"/v1/checkpoints/{done['result']['checkpoint_id']}/file").content
    dataset = zoo.colored_mnist()
    test = dataset.splits["test"]
    scores = [np.asarray(run_plain(data, fmt, x)).reshape(len(x), -1)[:, 0] for x in (test.x, dataset.intervene(test).x)]
    threshold = 0.5 if "sigmoid" in head["output_form"] else 0.0
    predicted, swapped = (torch.from_numpy((s > threshold).astype(np.int64)) for s in scores)
    assert float((predicted != swapped).double().mean()) == pytest.approx(after["flip_rate"], abs=1e-9)
    assert float((predicted == test.y).double().mean()) == pytest.approx(accuracy["after"], abs=1e-9)


def test_heads_a_refit_cannot_rewrite_are_refused_at_submit_naming_why(embedded_stack):
    stack = embedded_stack
    cases = [(zoo.exported("tied_weights", "torchscript"), "torchscript", "tied"),
             (zoo.exported("head_from_input", "onnx"), "onnx", "ReduceMean"),
             (zoo.torchscript_bytes(IntoAnotherModulesBuffer()), "torchscript", "stats.table")]
    for data, fmt, named in cases:
        shape = "[4]" if named == "stats.table" else "[2, 14, 14]"
        response = upload(stack, data, fmt, shape)
        assert response.status_code == 201, response.text
        refused = stack.client.post("/v1/jobs", json={"kind": "repair", "spec": {
            "checkpoint_id": response.json()["id"], "dataset": DATASET}})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "no_linear_head" and named in error["message"], error
        assert ("finetune_sd" in error["message"]) == (fmt == "torchscript")


def test_hostile_graphs_get_a_4xx_with_a_code_and_nothing_else(embedded_stack):
    from onnx import helper, numpy_helper

    from starvation.checkpoints.graph import MAX_GRAPH_NODES

    stack = embedded_stack
    weight = numpy_helper.from_array(np.ones((4, 1), np.float32), "w")
    chain = [helper.make_node("Identity", ["x"], ["t0"])]
    chain += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(MAX_GRAPH_NODES)]
    hostile = {
        "cycle": onnx_graph([helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
                             helper.make_node("Identity", ["b"], ["y"])], [weight]),
        "feeds_itself": onnx_graph([helper.make_node("MatMul", ["x", "w"], ["m"]),
                                    helper.make_node("Add", ["m", "y"], ["y"])], [weight]),
        "huge": onnx_graph(chain + [helper.make_node("MatMul", [f"t{MAX_GRAPH_NODES}", "w"], ["y"])], [weight]),
    }
    codes = {}
    for name, proto in hostile.items():
        response = upload(stack, proto.SerializeToString(), "onnx", "[4]")
        assert 400 <= response.status_code < 500, response.text
        codes[name] = response.json()["error"]["code"]
    assert codes == {"cycle": "load_failed", "feeds_itself": "load_failed", "huge": "graph_too_large"}
