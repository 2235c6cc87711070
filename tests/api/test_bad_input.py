"""Every bad input is a 4xx in the error shape of API.md, never a 500, and creates nothing."""
from __future__ import annotations

import pytest


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["message"] and "Traceback" not in error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "body, where",
    [
        ({"kind": "fly", "spec": {}}, "kind"),
        ({"spec": {"preset": "paper_cmnist_erm"}}, "kind"),
        ({"kind": "train", "spec": {"steps": "many"}}, "steps"),
        ({"kind": "train", "spec": {"preset": "paper_cmnist_erm", "steps": -5}}, "steps"),
        ({"kind": "train", "spec": {"preset": "paper_cmnist_erm", "seeds": []}}, "seeds"),
        ({"kind": "train", "spec": {"preset": "paper_cmnist_erm", "device": "tpu"}}, "device"),
        ({"kind": "train", "spec": {"preset": "paper_cmnist_erm", "bogus": 1}}, "bogus"),
        ({"kind": "audit", "spec": {"seed": 0}}, None),
        ([1, 2, 3], None),
    ],
)
def test_malformed_job_bodies_get_422_naming_the_field(client, body, where):
    before = len(client.get("/v1/jobs", params={"limit": 500}).json()["items"])
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    if where:
        assert where in error["message"]
    assert len(client.get("/v1/jobs", params={"limit": 500}).json()["items"]) == before


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"preset": "no_such_preset"}, "no_such_preset"),
        ({"preset": "paper_cmnist_erm", "dataset": {"name": "imagenet"}}, "imagenet"),
        ({"preset": "paper_cmnist_erm", "method": {"name": "magic"}}, "magic"),
        ({"preset": "paper_cmnist_erm", "steps": 10_000_000}, "limit"),
    ],
)
def test_specs_the_engine_refuses_get_invalid_spec(client, spec, words):
    error = assert_error(client.post("/v1/jobs", json={"kind": "train", "spec": spec}), 422, "invalid_spec")
    assert words in error["message"]


def test_audit_of_a_missing_checkpoint_is_invalid_spec(client):
    body = {"kind": "audit", "spec": {"checkpoint_id": "nope", "dataset": {"name": "colored_mnist"}}}
    assert_error(client.post("/v1/jobs", json=body), 422, "invalid_spec")


def test_not_json_is_422(client):
    response = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(response, 422)


@pytest.mark.parametrize("method, path", [
    ("get", "/v1/jobs/unknown"), ("post", "/v1/jobs/unknown/cancel"), ("delete", "/v1/jobs/unknown"),
    ("get", "/v1/jobs/unknown/metrics"), ("get", "/v1/jobs/unknown/report"), ("get", "/v1/checkpoints/unknown"),
])
def test_unknown_ids_are_404(client, method, path):
    assert_error(getattr(client, method)(path), 404, "not_found")


@pytest.mark.parametrize("cursor", ["garbage", "bm90IGpzb24=", "WzFd"])
def test_bad_cursor_is_400(client, cursor):
    assert_error(client.get("/v1/jobs", params={"cursor": cursor}), 400, "invalid_cursor")


@pytest.mark.parametrize("limit", [0, 501, -1])
def test_limit_out_of_range_is_422(client, limit):
    assert_error(client.get("/v1/jobs", params={"limit": limit}), 422)


@pytest.mark.parametrize("status", ["done", "QUEUED", "queued "])
def test_unknown_status_filter_is_422_not_an_empty_list(client, status):
    error = assert_error(client.get("/v1/jobs", params={"status": status}), 422, "invalid_request")
    assert "status" in error["message"]


def test_missing_or_wrong_token_is_401(client):
    assert_error(client.get("/v1/jobs", headers={"Authorization": ""}), 401, "unauthorized")
    assert_error(client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")


def test_only_admin_issues_keys(client, tenant):
    assert_error(client.post("/v1/api-keys", json={"name": "x"}, headers=tenant()), 403, "forbidden")


def test_oversize_json_body_is_413_and_creates_nothing(client):
    before = len(client.get("/v1/jobs", params={"limit": 500}).json()["items"])
    huge = {"kind": "train", "spec": {"preset": "paper_cmnist_erm"}, "tags": {"pad": "x" * 2_000_000}}
    assert_error(client.post("/v1/jobs", json=huge), 413, "too_large")
    assert len(client.get("/v1/jobs", params={"limit": 500}).json()["items"]) == before


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fapi%2Fsettings.py", "%2e%2e%2fgs.sqlite3"])
def test_artifact_names_cannot_escape(client, name):
    job = client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm"}}).json()
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert response.status_code == 404
    assert b"BaseSettings" not in response.content and b"root:" not in response.content


@pytest.mark.parametrize("kind", ["train", "sweep"])
@pytest.mark.parametrize("section, identity", [("dataset", "name"), ("model", "arch"), ("method", "name"),
                                               ("optimizer", "name")])
def test_a_section_named_by_a_list_is_a_422_naming_it(client, kind, section, identity):
    """Found by the fuzzer: a list where a name goes reached `name in DATASETS` and was a 500."""
    spec = {"preset": "paper_cmnist_sd", section: {identity: []}}
    if kind == "sweep":
        spec["grid"] = {"method.sd_lambda": [1.0]}
    response = client.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == {"field": f"spec.{section}.{identity}"}


@pytest.mark.parametrize("kind, extra", [("train", ""), ("sweep", ', "grid": {"method.sd_lambda": [1.0]}')])
def test_a_nan_where_null_means_a_default_is_refused_not_read_as_null(client, kind, extra):
    """Python's JSON reader takes NaN; a spec dumped in pydantic's JSON mode turned it into null, and a null
    batch_size is the full batch: the job would have run with a value nobody gave."""
    body = '{"kind": "%s", "spec": {"preset": "paper_cmnist_sd", "batch_size": NaN%s}}' % (kind, extra)
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "batch_size" in response.json()["error"]["message"], response.text
