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
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "delete_job", "list_job_metrics", "stream_job_events",
            "get_report", "get_report_html", "list_artifacts", "get_artifact", "upload_checkpoint", "list_checkpoints",
            "get_checkpoint", "download_checkpoint", "list_datasets", "register_dataset", "create_api_key",
            "list_api_keys", "revoke_api_key", "healthz", "readyz", "prometheus_metrics"} == ids


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
