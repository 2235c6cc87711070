"""The OpenAPI document is one a client generator can use as it is: names a person would choose, a Bearer
scheme instead of an `authorization` parameter on every call, files as binary, the errors each operation
really answers, and the media types of what is not JSON."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def document(client) -> dict:
    return client.get("/openapi.json").json()


def operations(document: dict) -> dict[str, dict]:
    """{operationId: operation} of every operation; a repeated id is a failure."""
    found: dict[str, dict] = {}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert operation["operationId"] not in found, f"{method} {path} repeats {operation['operationId']}"
            found[operation["operationId"]] = {**operation, "path": path, "method": method}
    return found


def test_operation_ids_are_the_names_a_person_would_choose(document):
    ids = set(operations(document))
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "delete_job", "list_job_metrics", "get_job_logs", "stream_job_events",
            "get_report", "get_report_html", "list_artifacts", "get_artifact", "upload_checkpoint", "list_checkpoints",
            "get_checkpoint", "download_checkpoint", "delete_checkpoint", "list_datasets", "get_dataset", "register_dataset",
            "delete_dataset", "create_api_key", "list_api_keys", "revoke_api_key", "healthz", "readyz", "prometheus_metrics"} == ids


def test_a_bearer_scheme_replaces_the_authorization_parameter(document):
    (scheme,) = document["components"]["securitySchemes"].values()
    assert {k: scheme[k] for k in ("type", "scheme")} == {"type": "http", "scheme": "bearer"}
    for operation_id, operation in operations(document).items():
        names = [p["name"].lower() for p in operation.get("parameters", [])]
        assert "authorization" not in names, operation_id
        needs_key = operation["path"].startswith("/v1/") or operation_id == "prometheus_metrics"
        assert (operation.get("security") == [{"bearer": []}]) == needs_key, operation_id


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-key", "bearer  "])
def test_a_missing_or_wrong_token_is_still_a_401_with_our_error_shape(client, header):
    headers = {"Authorization": header} if header is not None else {}
    client_headers = client.headers.copy()
    client.headers.pop("Authorization")
    try:
        response = client.get("/v1/jobs", headers=headers)
    finally:
        client.headers = client_headers
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


def test_a_token_is_read_whatever_the_case_of_its_scheme(client, tenant):
    token = tenant()["Authorization"].split(" ", 1)[1]
    assert client.get("/v1/jobs", headers={"Authorization": f"bEaReR {token}"}).status_code == 200


def test_every_file_field_is_binary_so_a_generated_client_uploads_it(document):
    bodies = [op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
              for op in operations(document).values() if "multipart/form-data" in op.get("requestBody", {}).get("content", {})]
    assert sorted(bodies) == ["Body_register_dataset", "Body_upload_checkpoint"]
    for body in bodies:
        file_field = document["components"]["schemas"][body]["properties"]["file"]
        variants = [v for v in file_field.get("anyOf", [file_field]) if v.get("type") == "string"]
        assert variants and all(v["format"] == "binary" for v in variants), body


def test_files_pages_and_streams_declare_their_media_types_and_errors_stay_json(document):
    found = {operation_id: sorted(operation["responses"]["200"].get("content", {}))
             for operation_id, operation in operations(document).items() if "200" in operation["responses"]}
    assert found["download_checkpoint"] == ["application/octet-stream"]
    assert "application/octet-stream" in found["get_artifact"]
    assert found["stream_job_events"] == ["text/event-stream"]
    assert found["get_report_html"] == ["text/html"]
    assert found["prometheus_metrics"] == ["text/plain"]
    for operation_id, operation in operations(document).items():
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")) and operation_id != "readyz":
                assert response["content"] == {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ErrorResponse"}}}, (operation_id, status)


def test_what_a_create_answers_links_to_the_routes_that_take_the_new_id(document):
    """OpenAPI links: a client (and the fuzzer's stateful phase) goes from the POST to GET/cancel/DELETE with the id."""
    ops = operations(document)
    followed: dict[tuple[str, str], set[str]] = {}
    for operation_id, operation in ops.items():
        for status, response in operation["responses"].items():
            for name, link in response.get("links", {}).items():
                target = ops[link["operationId"]]
                path_parameters = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
                assert link["parameters"] == {p: "$response.body#/id" for p in path_parameters}, (operation_id, name)
                followed.setdefault((operation_id, status), set()).add(link["operationId"])
    one_job = {o for o, op in ops.items() if op["path"].startswith("/v1/jobs/{job_id}") and op["path"].count("{") == 1}
    assert followed == {
        ("create_job", "202"): one_job,
        ("upload_checkpoint", "201"): {"get_checkpoint", "download_checkpoint", "delete_checkpoint"},
        ("upload_checkpoint", "200"): {"get_checkpoint", "download_checkpoint", "delete_checkpoint"},  # the same bytes
        ("register_dataset", "201"): {"get_dataset", "delete_dataset"},
        ("register_dataset", "202"): {"get_dataset", "delete_dataset"},  # an image folder, checked in the background
        ("create_api_key", "201"): {"revoke_api_key"},
    }
    assert {"get_job", "cancel_job", "delete_job"} <= one_job


def test_readyz_documents_its_503(document):
    responses = operations(document)["readyz"]["responses"]
    assert responses["503"]["content"]["application/json"]["schema"] == responses["200"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}


def test_each_operation_lists_the_errors_of_what_it_does(document):
    ops = operations(document)
    errors = {operation_id: {int(s) for s in op["responses"] if s.startswith(("4", "5"))} for operation_id, op in ops.items()}
    for operation_id, op in ops.items():
        keyed = "security" in op
        assert ({401, 503} <= errors[operation_id]) == keyed, operation_id
        assert 422 in errors[operation_id], operation_id  # api/hygiene.py checks every URL
        assert (404 in errors[operation_id]) == ("{" in op["path"]), operation_id
        assert ({400, 413} <= errors[operation_id]) == ("requestBody" in op), operation_id  # unparsable, too large
    job_routes = {o for o, op in ops.items() if op["path"].startswith("/v1/jobs/{job_id}")}  # 409: a shared id prefix
    assert {o for o, codes in errors.items() if 409 in codes} == {
        "create_job", "upload_checkpoint", "register_dataset", "create_api_key", "delete_checkpoint",
        "delete_dataset"} | job_routes  # a delete: a job still uses it
    assert {o for o, codes in errors.items() if 429 in codes} == {"create_job", "upload_checkpoint", "register_dataset",
                                                                  "get_job_logs", "stream_job_events"}  # streams
    assert {o for o, codes in errors.items() if 403 in codes} == {"create_api_key", "prometheus_metrics"}
    assert {o for o, codes in errors.items() if 400 in codes} == {  # a cursor or filter; a body that does not parse
        "list_jobs", "list_job_metrics", "get_job_logs", "create_job", "upload_checkpoint", "register_dataset",
        "create_api_key"}
    assert errors["healthz"] == {422}


def test_probes_and_repair_methods_are_enums_and_a_misspelt_one_is_a_422_naming_it(client, document, tenant):
    schemas = document["components"]["schemas"]
    assert set(schemas["ProbeName"]["enum"]) == {"groups", "counterfactual", "four_corners", "linear_probe", "ntk"}
    assert set(schemas["RepairMethodName"]["enum"]) == {"last_layer", "last_layer_sd", "finetune_sd"}
    audit = {"kind": "audit", "spec": {"checkpoint_id": "c" * 32, "probes": ["groups", "counterfactaul"]}}
    answer = client.post("/v1/jobs", json=audit, headers=tenant())
    assert answer.status_code == 422 and "spec.probes.1" in answer.text and "'counterfactual'" in answer.text, answer.text
    repair = {"kind": "repair", "spec": {"checkpoint_id": "c" * 32, "method": {"name": "last_layers"}}}
    answer = client.post("/v1/jobs", json=repair, headers=tenant())
    assert answer.status_code == 422 and "spec.method.name" in answer.text and "'last_layer'" in answer.text, answer.text


def test_train_and_repair_results_are_typed_where_their_shape_is_stable(document):
    schemas = document["components"]["schemas"]

    def ref(schema: str, field: str) -> str:
        prop = schemas[schema]["properties"][field]
        options = prop.get("anyOf", [prop])
        return next(option["$ref"].rsplit("/", 1)[1] for option in options if "$ref" in option)

    assert (ref("TrainResult", "execution"), ref("TrainResult", "timing")) == ("TrainExecution", "TrainTiming")
    assert set(schemas["TrainExecution"]["properties"]["used"]["enum"]) == {"batched", "sequential"}
    assert {"step_ms", "train_s", "eval_s", "compile_s", "total_s"} <= set(schemas["TrainTiming"]["properties"])
    assert [ref("RepairResult", f) for f in ("method", "selection", "repair")] == [
        "RepairMethodOut", "RepairSelection", "RepairDetails"]
    assert schemas["RepairSelection"]["properties"]["test_split_used"]["const"] is False
    assert [schemas["SweepResult"]["properties"][f]["items"]["$ref"].rsplit("/", 1)[1]
            for f in ("settings", "execution")] == ["SweepSetting", "SweepRun"]
    assert ref("TrainAudit", "summary") == "PooledReliance"


def test_a_train_job_whose_pooled_verdict_is_uncertain_is_shown(document):
    """pool_reliance says `uncertain` when the interval over seeds spans a threshold; the job's shape must
    allow every verdict the engine gives (it was a 500 on GET /v1/jobs/{id} once; the worker now checks a result
    against this model before recording it)."""
    from results.train import TrainResult
    from starvation.audit import pool_reliance

    summary = {"basis": "counterfactual", "verdict": "partial", "measure": "flip rate"}
    reports = [{"seed": seed, "summary": {**summary, "reliance_score": score, "interval": [score - 0.02, score + 0.02]}}
               for seed, score in ((0, 0.55), (1, 0.30), (2, 0.55))]
    pooled = pool_reliance(reports)
    assert pooled["verdict"] == "uncertain"
    result = {"splits": {}, "seeds": [0, 1, 2], "checkpoints": [], "device": "cpu",
              "audit": {"reports": [], "summary": pooled}}
    assert TrainResult.model_validate(result).audit.summary.verdict == "uncertain"
    assert "uncertain" in document["components"]["schemas"]["PooledReliance"]["properties"]["verdict"]["anyOf"][0][
        "enum"]
