"""Repair jobs through the whole service, on checkpoints built outside this project.

Every number asserted here comes from the job (its audits before and after); the tests only
build the models and data, upload them, and read what came back.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from starvation import datasets
from tests.e2e.test_audit_flow import validate_against_openapi
from tests.science.audit_fixtures import ColourBlind
from tests.science.repair_fixtures import erm_colored_mnist

REPAIR_TIMEOUT_S = 300


def script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def upload(stack, module: torch.nn.Module) -> str:
    response = stack.client.post("/v1/checkpoints", files={"file": ("m.pt", io.BytesIO(script_bytes(module)))},
                                 data={"format": "torchscript"})
    assert response.status_code in (200, 201), response.text  # 200: the same model, uploaded by another test
    return response.json()["id"]


def repair(stack, spec: dict) -> dict:
    response = stack.client.post("/v1/jobs", json={"kind": "repair", "spec": spec})
    assert response.status_code == 202, response.text
    done = stack.wait_for(response.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=REPAIR_TIMEOUT_S)
    assert done["status"] == "succeeded", done["error"]
    return done


def load_downloaded(stack, checkpoint_id: str) -> torch.jit.ScriptModule:
    response = stack.client.get(f"/v1/checkpoints/{checkpoint_id}/file")
    assert response.status_code == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(response.content)).eval()


def test_default_repair_of_an_erm_model_stops_it_leaning_on_colour(embedded_stack):
    stack = embedded_stack
    parent = upload(stack, erm_colored_mnist())
    done = repair(stack, {"checkpoint_id": parent, "dataset": {"name": "colored_mnist"}})
    result = done["result"]
    before, after = result["before"], result["after"]
    assert before["flip_rate"] >= 0.7 and before["verdict"] == "high"  # the fixture leans on colour
    assert after["average_accuracy"] >= 0.55 and after["flip_rate"] <= 0.40 and after["verdict"] != "high"
    assert result["method"]["name"] == "last_layer" and result["parent_checkpoint_id"] == parent
    assert result["selection"]["test_split_used"] is False
    assert result["selection"]["fitted_on"]["splits"] == ["train1", "train2"]

    checkpoint = stack.client.get(f"/v1/checkpoints/{result['checkpoint_id']}").json()
    assert checkpoint["parent_checkpoint_id"] == parent and checkpoint["job_id"] == done["id"]
    assert checkpoint["format"] == "torchscript"

    report = stack.client.get(f"/v1/jobs/{done['id']}/report").json()
    validate_against_openapi(stack, report, "RepairReport")
    assert report["after"]["counterfactual"]["flip_rate"] == after["flip_rate"]
    assert report["repair"]["checkpoint_id"] == result["checkpoint_id"]
    page = stack.client.get(f"/v1/jobs/{done['id']}/report.html")
    assert page.status_code == 200 and "Before" in page.text and "After" in page.text
    assert page.text.count('src="data:image/png;base64,') == len(report["before"]["plots"]) + len(
        report["after"]["plots"])

    # The downloaded file, loaded with plain torch, predicts what the after audit measured.
    model = load_downloaded(stack, result["checkpoint_id"])
    data = datasets.build("colored_mnist", {}, seed=0, data_dir=None)
    test = data.splits["test"]
    with torch.no_grad():
        predicted = (model(test.x)[:, 0] > 0).long()
        swapped = (model(data.intervene(test).x)[:, 0] > 0).long()
    assert float((predicted == test.y).double().mean()) == report["after"]["counterfactual"]["accuracy"]
    assert float((predicted != swapped).double().mean()) == after["flip_rate"]
    assert model.head.weight.shape == erm_colored_mnist().head.weight.shape


def test_a_colour_blind_model_is_left_essentially_unchanged(embedded_stack):
    stack = embedded_stack
    train = datasets.build("colored_mnist", {}, seed=0, data_dir=None).train_data()
    done = repair(stack, {"checkpoint_id": upload(stack, ColourBlind.fit_template(train)),
                          "dataset": {"name": "colored_mnist"}, "probes": ["groups", "counterfactual"]})
    before, after = done["result"]["before"], done["result"]["after"]
    assert before["verdict"] == "low" and after["verdict"] == "low"
    assert after["flip_rate"] <= 0.02  # its features hold no colour: no head on them can read it
    assert abs(after["average_accuracy"] - before["average_accuracy"]) <= 0.05
    assert "nothing to repair" in done["result"]["repair"]["note"]


def test_what_a_repair_cannot_do_is_refused_at_submit(embedded_stack, tmp_path):
    stack = embedded_stack
    parent = upload(stack, erm_colored_mnist())

    def refused(spec: dict) -> dict:
        response = stack.client.post("/v1/jobs", json={"kind": "repair", "spec": spec})
        assert 400 <= response.status_code < 500, response.text
        return response.json()["error"]

    assert refused({"checkpoint_id": parent, "dataset": {"name": "two_moons"}})["code"] == "no_attribute"
    assert refused({"checkpoint_id": parent, "method": {"name": "magic"}})["code"] == "invalid_request"  # an enum
    assert refused({"checkpoint_id": parent, "method": {"name": "last_layer", "inverse_strengths": [-1]}})[
        "code"] == "invalid_spec"
    assert refused({"checkpoint_id": "nope"})["code"] == "invalid_spec"
    assert refused({})["code"] == "invalid_spec"
    assert refused({"checkpoint_id": parent, "spurious_attribute": "shape"})["code"] == "invalid_spec"
    assert refused({"train_job_id": "nope"})["code"] == "invalid_spec"
    unsplit = npz_bytes(x=np.zeros((8, 2, 14, 14), np.float32), y=np.arange(8) % 2, attribute=np.arange(8) // 4)
    registered = stack.client.post("/v1/datasets", files={"file": ("d.npz", unsplit)}, data={"name": "unsplit"})
    assert registered.status_code == 201, registered.text
    assert refused({"checkpoint_id": parent, "dataset": {"name": registered.json()["id"]},
                    "spurious_attribute": "attribute"})["code"] == "no_test_split"

    from tests.science.audit_fixtures import save_onnx

    onnx_path = save_onnx(erm_colored_mnist(), tmp_path / "m.onnx", torch.zeros(1, 2, 14, 14))
    response = stack.client.post("/v1/checkpoints", files={"file": ("m.onnx", onnx_path.read_bytes())},
                                 data={"format": "onnx"})
    assert response.status_code == 201, response.text
    error = refused({"checkpoint_id": response.json()["id"], "method": {"name": "finetune_sd"}})  # ONNX is not trained
    assert error["code"] == "unsupported_format" and "use last_layer" in error["message"]


def test_a_train_job_seed_is_repaired_and_a_repaired_checkpoint_can_be_repaired_again(services_stack):
    stack = services_stack  # PostgreSQL + Redis: lineage through the migrated schema
    train = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {
        "preset": "paper_cmnist_erm", "steps": 20, "seeds": [0, 1], "eval_every": 10, "audit": False}})
    assert train.status_code == 202, train.text
    trained = stack.wait_for(train.json()["id"], ("succeeded", "failed"), timeout_s=REPAIR_TIMEOUT_S)
    assert trained["status"] == "succeeded", trained["error"]
    seed1 = next(c for c in trained["result"]["checkpoints"] if c["seed"] == 1)

    missing = stack.client.post("/v1/jobs", json={"kind": "repair", "spec": {"train_job_id": trained["id"], "seed": 5}})
    assert missing.status_code == 422 and missing.json()["error"]["details"] == {"field": "spec.seed"}

    probes = ["groups", "counterfactual"]
    first = repair(stack, {"train_job_id": trained["id"], "seed": 1, "probes": probes,
                           "method": {"name": "last_layer_sd", "sd_lambdas": [0.1, 1.0]}})["result"]
    assert first["parent_checkpoint_id"] == seed1["safetensors"]
    assert first["method"] == {"name": "last_layer_sd", "sd_lambdas": [0.1, 1.0], "validation_fraction": 0.2,
                               "max_iter": 200, "criterion": "worst_group_accuracy"}
    ids = first["repair"]["checkpoint_ids"]
    assert first["checkpoint_id"] == ids["safetensors"] and set(ids) == {"safetensors", "torchscript"}

    # Again, from the TorchScript file the first repair wrote: it goes through the jail this time.
    second = repair(stack, {"checkpoint_id": ids["torchscript"], "probes": probes})["result"]
    assert second["parent_checkpoint_id"] == ids["torchscript"]
    assert stack.client.get(f"/v1/checkpoints/{second['checkpoint_id']}").json()["parent_checkpoint_id"] == ids[
        "torchscript"]
    assert stack.client.get(f"/v1/checkpoints/{ids['torchscript']}").json()["parent_checkpoint_id"] == seed1[
        "safetensors"]


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_the_test_split_is_never_used_to_fit_or_choose(embedded_stack):
    """Two datasets with the same training splits and opposite test splits: were the test split
    used to fit or choose, the chosen head would differ; the audits before must differ."""
    stack = embedded_stack
    data = datasets.build("colored_mnist", {"n_train": 2_000}, seed=0, data_dir=None)
    train1, train2, test = data.splits["train1"], data.splits["train2"], data.splits["test"]
    aligned_test = data.intervene(test)  # colour now agrees with the label 90% of the time
    dataset_ids = []
    for name, held_out in (("reversed", test), ("aligned", aligned_test)):
        content = npz_bytes(
            x=torch.cat([train1.x, train2.x, held_out.x]).numpy(),
            y=torch.cat([train1.y, train2.y, held_out.y]).numpy(),
            attribute=torch.cat([train1.attribute, train2.attribute, held_out.attribute]).numpy(),
            split=np.array(["train1"] * len(train1) + ["train2"] * len(train2) + ["test"] * len(held_out)),
        )
        response = stack.client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": name})
        assert response.status_code == 201, response.text
        dataset_ids.append(response.json()["id"])
    parent = upload(stack, erm_colored_mnist())
    results = [repair(stack, {"checkpoint_id": parent, "dataset": {"name": dataset_id}, "spurious_attribute": "attribute",
                              "probes": ["groups"]})["result"] for dataset_id in dataset_ids]
    assert results[0]["before"]["average_accuracy"] != results[1]["before"]["average_accuracy"]
    assert results[0]["selection"] == results[1]["selection"]
    assert results[0]["selection"]["changed"]
    heads = [load_downloaded(stack, r["checkpoint_id"]).head.weight for r in results]
    assert torch.equal(heads[0], heads[1])


def test_the_dashboard_offers_repair_on_a_high_audit_and_the_repaired_model_downloads(embedded_stack):
    import re

    import httpx

    from tests.conftest import ADMIN_TOKEN

    stack = embedded_stack
    spec = {"checkpoint_id": upload(stack, erm_colored_mnist()), "probes": ["groups", "counterfactual"]}
    audit = stack.client.post("/v1/jobs", json={"kind": "audit", "spec": spec}).json()
    assert stack.wait_for(audit["id"], ("succeeded", "failed"), timeout_s=REPAIR_TIMEOUT_S)["status"] == "succeeded"
    base, cookie = str(stack.client.base_url), {"gs_session": ADMIN_TOKEN}
    with httpx.Client(base_url=base, cookies=cookie, timeout=60) as browser:
        page = browser.get(f"/dashboard/jobs/{audit['id']}").text
        assert 'id="repair-form"' in page
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        submitted = browser.post(f"/dashboard/jobs/{audit['id']}/repair", data={"csrf": csrf})
        assert submitted.status_code == 303, submitted.text
        repair_id = submitted.headers["location"].rsplit("/", 1)[1]
        done = stack.wait_for(repair_id, ("succeeded", "failed"), timeout_s=REPAIR_TIMEOUT_S)
        assert done["status"] == "succeeded", done["error"]
        assert done["spec"]["probes"] == ["groups", "counterfactual"] and done["spec"]["method"]["name"] == "last_layer"
        repaired_page = browser.get(f"/dashboard/jobs/{repair_id}").text
        assert "(before → after)" in repaired_page and 'id="repaired-download"' in repaired_page
        download = browser.get(f"/dashboard/checkpoints/{done['result']['checkpoint_id']}/file")
        assert download.status_code == 200 and download.content.startswith(b"PK")
        assert browser.get("/dashboard/checkpoints/nope/file").status_code == 404


def test_finetune_sd_trains_the_whole_network_on_from_a_train_jobs_seed_and_chooses_on_held_out_rows(services_stack):
    stack = services_stack  # PostgreSQL + Redis (the embedded default runs the same worker code in other tests)
    train = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {
        "preset": "paper_cmnist_erm", "steps": 100, "seeds": [0], "eval_every": 100, "audit": False}})
    trained = stack.wait_for(train.json()["id"], ("succeeded", "failed"), timeout_s=REPAIR_TIMEOUT_S)
    assert trained["status"] == "succeeded", trained["error"]
    parent = trained["result"]["checkpoints"][0]["safetensors"]

    done = repair(stack, {"train_job_id": trained["id"], "probes": ["groups", "counterfactual"], "method": {
        "name": "finetune_sd", "sd_lambdas": [0.5, 4.0], "steps": 40, "lr": 1e-4}})
    result = done["result"]
    assert result["method"] == {"name": "finetune_sd", "sd_lambdas": [0.5, 4.0], "steps": 40, "lr": 1e-4,
                                "batch_size": None, "criterion": "worst_group_accuracy", "validation_fraction": 0.2}
    selection = result["selection"]
    assert selection["test_split_used"] is False and selection["chosen_on"]["n"] == 800  # 20% of 4,000 digits
    scores = [c["validation"]["worst_group_accuracy"] for c in selection["candidates"]]
    assert selection["chosen"] == {"sd_lambda": [0.5, 4.0][scores.index(max(scores))]}
    assert result["parent_checkpoint_id"] == parent
    ids = result["repair"]["checkpoint_ids"]
    for checkpoint_id in ids.values():
        assert stack.client.get(f"/v1/checkpoints/{checkpoint_id}").json()["parent_checkpoint_id"] == parent
    report = stack.client.get(f"/v1/jobs/{done['id']}/report").json()
    validate_against_openapi(stack, report, "RepairReport")
    before, after = (load_downloaded(stack, i) for i in (trained["result"]["checkpoints"][0]["torchscript"],
                                                           ids["torchscript"]))
    assert not torch.equal(before.head.weight, after.head.weight)  # the whole network moved, from where it was
    assert before.head.weight.shape == after.head.weight.shape


def test_an_onnx_model_gets_its_gemm_head_refitted_and_the_downloaded_graph_predicts_what_the_audit_measured(
        embedded_stack, tmp_path):
    import onnxruntime

    from tests.science.audit_fixtures import save_onnx

    stack = embedded_stack
    onnx_path = save_onnx(erm_colored_mnist(), tmp_path / "erm.onnx", torch.zeros(1, 2, 14, 14))
    uploaded = stack.client.post("/v1/checkpoints", files={"file": ("erm.onnx", onnx_path.read_bytes())},
                                 data={"format": "onnx"})
    assert uploaded.status_code in (200, 201), uploaded.text
    parent = uploaded.json()["id"]
    done = repair(stack, {"checkpoint_id": parent, "probes": ["groups", "counterfactual"]})
    result = done["result"]
    before, after = result["before"], result["after"]
    assert before["flip_rate"] >= 0.7 and before["verdict"] == "high"
    assert after["average_accuracy"] >= 0.55 and after["flip_rate"] <= 0.40 and after["verdict"] != "high"
    assert result["repair"]["format"] == "onnx" and result["repair"]["feature_layer"].endswith("Relu_output_0")
    checkpoint = stack.client.get(f"/v1/checkpoints/{result['checkpoint_id']}").json()
    assert checkpoint["format"] == "onnx" and checkpoint["parent_checkpoint_id"] == parent

    downloaded = stack.client.get(f"/v1/checkpoints/{result['checkpoint_id']}/file")
    assert downloaded.status_code == 200
    session = onnxruntime.InferenceSession(downloaded.content, providers=["CPUExecutionProvider"])
    data = datasets.build("colored_mnist", {}, seed=0, data_dir=None)
    test = data.splits["test"]
    predicted, swapped = ((session.run(None, {"x": x.numpy()})[0][:, 0] > 0)
                          for x in (test.x, data.intervene(test).x))
    report = stack.client.get(f"/v1/jobs/{done['id']}/report").json()
    assert float(np.mean(predicted == test.y.numpy())) == pytest.approx(report["after"]["counterfactual"]["accuracy"])
    assert float(np.mean(predicted != swapped)) == pytest.approx(after["flip_rate"])


def test_finetune_sd_trains_an_uploaded_torchscript_model_in_its_jail(embedded_stack):
    stack = embedded_stack
    parent = upload(stack, erm_colored_mnist())
    done = repair(stack, {"checkpoint_id": parent, "probes": ["groups", "counterfactual"], "method": {
        "name": "finetune_sd", "sd_lambdas": [0.5, 4.0], "steps": 60, "lr": 1e-4}})
    result = done["result"]
    selection = result["selection"]
    assert result["repair"]["format"] == "torchscript" and set(result["repair"]["checkpoint_ids"]) == {"torchscript"}
    assert selection["test_split_used"] is False and selection["chosen_on"]["n"] == 800
    scores = [c["validation"]["worst_group_accuracy"] for c in selection["candidates"]]
    assert selection["chosen"] == {"sd_lambda": [0.5, 4.0][scores.index(max(scores))]}
    assert scores[0] != scores[1]  # each candidate trained from the uploaded weights, with its own lambda
    assert result["repair"]["head_shape"] == [1, 128]
    assert stack.client.get(f"/v1/checkpoints/{result['checkpoint_id']}").json()["parent_checkpoint_id"] == parent

    # Every weight moved, not only the head's; the downloaded file predicts what the after audit measured.
    original, tuned = erm_colored_mnist(), load_downloaded(stack, result["checkpoint_id"])
    tuned_weights, original_weights = tuned.state_dict(), original.state_dict()
    assert set(tuned_weights) == set(original_weights)
    assert all(not torch.equal(tuned_weights[name], original_weights[name]) for name in original_weights)
    test = datasets.build("colored_mnist", {}, seed=0, data_dir=None).splits["test"]
    with torch.no_grad():
        predicted = (tuned(test.x)[:, 0] > 0).long()
    report = stack.client.get(f"/v1/jobs/{done['id']}/report").json()
    assert float((predicted == test.y).double().mean()) == report["after"]["counterfactual"]["accuracy"]
