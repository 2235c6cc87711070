"""Audits through the whole pipeline, on checkpoints built outside this project."""
from __future__ import annotations

import io

from tests.fixtures_models import ColourBlind, ColourOnly, RaisesOnRealData, torchscript_bytes


def validate_against_openapi(stack, document: dict, component: str) -> None:
    """The JSON as served validates against the schema our OpenAPI document declares for it."""
    from jsonschema import Draft202012Validator

    openapi = stack.client.get("/openapi.json").json()
    schema = {"$ref": f"#/components/schemas/{component}", "components": openapi["components"]}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(document)]
    assert errors == []


def submit_audit(stack, model) -> dict:
    """Upload `model` as TorchScript, audit it on Colored MNIST, return the finished job."""
    upload = stack.client.post(
        "/v1/checkpoints", files={"file": ("m.pt", io.BytesIO(torchscript_bytes(model)))}, data={"format": "torchscript"}
    )
    assert upload.status_code in (200, 201), upload.text  # 200: another test of this stack uploaded it first
    spec = {"checkpoint_id": upload.json()["id"], "dataset": {"name": "colored_mnist"}, "spurious_attribute": "color"}
    job = stack.client.post("/v1/jobs", json={"kind": "audit", "spec": spec})
    assert job.status_code == 202, job.text
    return stack.wait_for(job.json()["id"], ("succeeded", "failed"), timeout_s=180)


def audit(stack, model) -> dict:
    done = submit_audit(stack, model)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_audit_tells_a_colour_reader_from_a_colour_blind_model(embedded_stack):
    stack = embedded_stack
    reader = audit(stack, ColourOnly())
    report = stack.client.get(f"/v1/jobs/{reader['id']}/report").json()
    assert report["counterfactual"]["flip_rate"] >= 0.95
    summary = report["summary"]
    assert summary["reliance_score"] == report["counterfactual"]["flip_rate"] == report["counterfactual"]["flip_rate_towards"]
    assert (summary["verdict"], summary["basis"], summary["direction"]) == ("high", "counterfactual", "towards")
    assert summary["interval"][0] <= summary["reliance_score"] <= summary["interval"][1]
    assert report["worst_group_accuracy"] <= report["average_accuracy"]

    blind = audit(stack, ColourBlind())
    blind_report = stack.client.get(f"/v1/jobs/{blind['id']}/report").json()
    assert blind_report["counterfactual"]["flip_rate"] <= 0.02
    assert blind_report["summary"]["verdict"] == "low"

    artifacts = {a["name"] for a in stack.client.get(f"/v1/jobs/{reader['id']}/artifacts").json()["items"]}
    assert set(report["plots"]) <= artifacts and "report.json" in artifacts
    plot = stack.client.get(f"/v1/jobs/{reader['id']}/artifacts/{report['plots'][0]}")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")

    validate_against_openapi(stack, report, "Report")

    page = stack.client.get(f"/v1/jobs/{reader['id']}/report.html")
    assert page.status_code == 200 and page.text.count('src="data:image/png;base64,') == len(report["plots"])


def test_report_of_an_unaudited_job_is_404(embedded_stack):
    job = embedded_stack.client.post(
        "/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5, "audit": False}}
    ).json()
    embedded_stack.wait_for(job["id"], ("succeeded",), timeout_s=60)
    response = embedded_stack.client.get(f"/v1/jobs/{job['id']}/report")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_report"


def test_an_uploaded_model_is_audited_in_the_jail_on_both_stacks(stack):
    done = audit(stack, ColourOnly())
    assert done["result"]["device"] == "cpu"  # foreign models run on the CPU, in the jail
    assert stack.client.get(f"/v1/jobs/{done['id']}/report").json()["counterfactual"]["flip_rate"] >= 0.95


def test_a_model_failing_on_real_data_leaves_only_our_words_in_the_job(stack):
    done = submit_audit(stack, RaisesOnRealData())  # harmless on the upload check's zeros
    assert done["status"] == "failed" and done["error"]["code"] == "model_failed"
    assert "exfiltrated" not in done["error"]["message"] and "admin_token" not in done["error"]["message"]
    assert done["error"]["message"].startswith("The model raised")


def test_an_ntk_audit_of_a_train_jobs_checkpoint_returns_the_kernel_and_a_torchscript_upload_is_refused(embedded_stack):
    trained = embedded_stack.client.post("/v1/jobs", json={"kind": "train", "spec": {
        "preset": "paper_cmnist_erm", "steps": 6, "eval_every": 3, "ntk_every": 3, "seeds": [0], "audit": True}})
    assert trained.status_code == 202, trained.text
    assert embedded_stack.wait_for(trained.json()["id"], ("succeeded", "failed"), timeout_s=180)["status"] == "succeeded"
    # The train job's own report draws its alignments over training.
    curves = embedded_stack.client.get(f"/v1/jobs/{trained.json()['id']}/report").json()
    assert "seed0-ntk_alignment.png" in curves["plots"]
    png = embedded_stack.client.get(f"/v1/jobs/{trained.json()['id']}/artifacts/seed0-ntk_alignment.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    page = embedded_stack.client.get(f"/v1/jobs/{trained.json()['id']}/report.html").text
    assert "is the starvation the paper describes" in page  # the plot's caption
    spec = {"train_job_id": trained.json()["id"], "dataset": {"name": "colored_mnist"}, "probes": ["groups", "ntk"]}
    job = embedded_stack.client.post("/v1/jobs", json={"kind": "audit", "spec": spec})
    assert job.status_code == 202, job.text
    done = embedded_stack.wait_for(job.json()["id"], ("succeeded", "failed"), timeout_s=240)
    assert done["status"] == "succeeded", done["error"]
    report = embedded_stack.client.get(f"/v1/jobs/{done['id']}/report").json()
    kernel = report["ntk"]
    assert kernel["sample"]["n"] == len(kernel["sample"]["indices"]) == 1024
    assert set(kernel["alignment"]) == {"label", "attribute", "core"} and kernel["eigenvalues"][0] > 0
    validate_against_openapi(embedded_stack, report, "Report")
    assert "Neural tangent kernel" in embedded_stack.client.get(f"/v1/jobs/{done['id']}/report.html").text

    upload = embedded_stack.client.post("/v1/checkpoints", files={"file": ("m.pt", io.BytesIO(torchscript_bytes(
        ColourOnly())))}, data={"format": "torchscript"})
    refused = embedded_stack.client.post("/v1/jobs", json={"kind": "audit", "spec": {
        "checkpoint_id": upload.json()["id"], "dataset": {"name": "colored_mnist"}, "probes": ["ntk"]}})
    assert refused.status_code == 422 and refused.json()["error"]["details"] == {"field": "spec.probes"}
    assert "'ntk'" in refused.json()["error"]["message"]
