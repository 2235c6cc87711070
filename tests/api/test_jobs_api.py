"""Job records over HTTP without a worker: creation, listing, pagination, tenancy, idempotency."""
from __future__ import annotations

SPEC = {"preset": "paper_cmnist_sd", "steps": 30, "seeds": [0]}


def test_created_job_is_queued_with_the_resolved_spec(client, tenant):
    headers = tenant()
    response = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC, "tags": {"a": "b"}}, headers=headers)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["error"] is None
    assert job["spec"]["steps"] == 30 and job["spec"]["method"]["name"] == "sd"
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}"
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).json() == job
    # 30 steps end inside the preset's 450-step warm-up: accepted (a smoke run), and said
    assert len(job["warnings"]) == 1 and "warm-up" in job["warnings"][0]
    longer = client.post("/v1/jobs", json={"kind": "train", "spec": {**SPEC, "steps": 451}}, headers=headers).json()
    assert longer["warnings"] == []


def test_cursor_pagination_walks_every_job_once(client, tenant):
    headers = tenant()
    ids = {client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers).json()["id"] for _ in range(7)}
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=headers).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and set(seen) == ids


def test_filters_by_kind_status_and_tag(client, tenant):
    headers = tenant()
    tagged = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC, "tags": {"team": "x"}}, headers=headers).json()
    client.post("/v1/jobs", json={"kind": "train", "spec": SPEC, "tags": {"team": "y"}}, headers=headers)
    found = client.get("/v1/jobs", params={"tag": "team:x", "kind": "train", "status": "queued"}, headers=headers).json()
    assert [j["id"] for j in found["items"]] == [tagged["id"]]
    assert client.get("/v1/jobs", params={"status": "running"}, headers=headers).json()["items"] == []
    assert len(client.get("/v1/jobs", params={"status": ""}, headers=headers).json()["items"]) == 2  # empty: any


def test_another_key_gets_404_for_everything_of_mine(client, tenant):
    mine, theirs = tenant("a"), tenant("b")
    job = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=mine).json()
    for method, path in [("get", ""), ("post", "/cancel"), ("delete", ""), ("get", "/metrics"), ("get", "/artifacts")]:
        response = getattr(client, method)(f"/v1/jobs/{job['id']}{path}", headers=theirs)
        missing = getattr(client, method)(f"/v1/jobs/{'0' * 32}{path}", headers=theirs)
        assert response.status_code == missing.status_code == 404, (method, path)
        # Indistinguishable from a job that does not exist, but for the id echoed back.
        assert response.text.replace(job["id"], "0" * 32) == missing.text
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs", headers=theirs).json()["items"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=mine).json()["status"] == "queued"


def test_idempotency_key_replays_and_refuses_a_different_body(client, tenant):
    headers = {**tenant(), "Idempotency-Key": "abc-1"}
    first = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers)
    again = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json={"kind": "train", "spec": {**SPEC, "steps": 31}}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_cancel_queued_then_delete(client, tenant):
    headers = tenant()
    job = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers).json()
    assert client.delete(f"/v1/jobs/{job['id']}", headers=headers).status_code == 409
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).status_code == 409
    assert client.delete(f"/v1/jobs/{job['id']}", headers=headers).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).status_code == 404


def test_openapi_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/checkpoints", "/v1/datasets"} <= set(paths)


def test_openapi_spells_job_status_as_one_enum_of_five_states(client):
    document = client.get("/openapi.json").json()
    states = ["queued", "running", "succeeded", "failed", "cancelled"]
    schemas = document["components"]["schemas"]
    status_schema = schemas["TrainJobOut"]["properties"]["status"]
    assert schemas[status_schema["$ref"].split("/")[-1]]["enum"] == states
    assert schemas["AuditJobOut"]["properties"]["status"] == schemas["RepairJobOut"]["properties"]["status"] == status_schema
    (status_filter,) = [p for p in document["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"]
    assert status_filter["schema"]["anyOf"][0] == status_schema  # the list filter takes the same enum


def test_a_job_is_found_by_a_unique_prefix_of_its_id(client, tenant):
    headers = tenant()
    ids = [client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers).json()["id"] for _ in range(3)]
    job_id = ids[0]
    assert client.get(f"/v1/jobs/{job_id[:12]}", headers=headers).json()["id"] == job_id
    assert client.post(f"/v1/jobs/{job_id[:8]}/cancel", headers=headers).json()["id"] == job_id
    assert client.get(f"/v1/jobs/{job_id[:7]}", headers=headers).status_code == 404  # too short to be a prefix
    assert client.get(f"/v1/jobs/{job_id[:12]}", headers=tenant("other")).status_code == 404  # not theirs
    assert client.get(f"/v1/jobs/{job_id[:11]}%25", headers=headers).status_code == 404  # no LIKE patterns


def test_an_ambiguous_prefix_is_a_409(client, tenant):
    from models.db import database
    from models.tables import Job

    headers = tenant()
    first = client.post("/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=headers).json()
    with database().session() as session:  # a second job whose id shares the first's first 10 digits
        twin = session.get(Job, first["id"])
        session.add(Job(id=first["id"][:10] + "f" * 22, owner_id=twin.owner_id, kind="train", spec=twin.spec,
                        tags={}, status=twin.status))
    response = client.get(f"/v1/jobs/{first['id'][:8]}", headers=headers)
    assert response.status_code == 409 and response.json()["error"]["code"] == "ambiguous_id"


def test_the_kind_filter_is_an_enum_of_the_kinds_a_job_can_be_created_with(client):
    document = client.get("/openapi.json").json()
    (kind_filter,) = [p for p in document["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "kind"]
    kinds = document["components"]["schemas"][kind_filter["schema"]["anyOf"][0]["$ref"].split("/")[-1]]["enum"]
    creatable = [schema["properties"]["kind"]["const"] for name, schema in document["components"]["schemas"].items()
                 if name.endswith("JobCreate")]
    assert sorted(kinds) == sorted(creatable) == ["audit", "repair", "sweep", "train"]


def test_an_unknown_kind_or_status_filter_is_a_422_and_an_empty_one_means_any(client):
    for query in ({"kind": "sweeep"}, {"status": "done"}):
        response = client.get("/v1/jobs", params=query)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", query
    assert client.get("/v1/jobs", params={"kind": "", "status": ""}).status_code == 200
    assert client.get("/v1/jobs", params={"kind": "audit"}).status_code == 200


def test_log_lines_never_show_where_the_server_keeps_its_files():
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from api.job_streams import log_line
    from core.settings import get_settings

    path = get_settings().var_dir.absolute() / "storage" / "x.npz"
    line = log_line(SimpleNamespace(at=datetime.now(UTC), level="error", message=f"failed: cannot read {path}"))
    assert str(get_settings().var_dir.absolute()) not in line["message"] and "x.npz" in line["message"]
