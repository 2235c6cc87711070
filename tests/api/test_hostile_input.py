"""Hostile input is a 4xx in the error shape of API.md, never a 500, and the service keeps serving.

Each test with `stack` runs twice, against real server processes: on the embedded default (SQLite) and on
PostgreSQL + Redis, which refuses what SQLite stores (NUL in text, integers past 32 bits).
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tests.conftest import ADMIN_TOKEN

QUICK_AUDITED_TRAIN = {"preset": "paper_moons_erm", "steps": 40, "eval_every": 20, "seeds": [0], "audit": True}
_trained: dict[str, str] = {}


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["message"]
    if code:
        assert error["code"] == code, error
    return error


def post_json(stack, path: str, document) -> object:
    # ensure_ascii: "\ud800" travels as the escape a hostile client would send.
    return stack.client.post(path, content=json.dumps(document).encode(), headers={"Content-Type": "application/json"})


def job_count(stack) -> int:
    return len(stack.client.get("/v1/jobs", params={"limit": 500}).json()["items"])


def assert_still_serving(stack) -> None:
    """The database connection survived: the next request is answered."""
    assert stack.client.get("/v1/jobs", params={"limit": 1}).status_code == 200


@pytest.fixture
def trained_job(stack) -> str:
    """A succeeded, audited train job on this stack (trained once per stack)."""
    if stack.name not in _trained:
        job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": QUICK_AUDITED_TRAIN})
        assert job.status_code == 202, job.text
        done = stack.wait_for(job.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=300)
        assert done["status"] == "succeeded", done["error"]
        _trained[stack.name] = done["id"]
    return _trained[stack.name]


# ---- text the database cannot store -----------------------------------------------------------

@pytest.mark.parametrize("url, where", [
    ("/v1/jobs?kind=%00", "query.kind"),
    ("/v1/jobs?tag=k:%00", "query.tag"),
    ("/v1/jobs/%00", "path"),
    ("/v1/jobs/a%00b/metrics", "path"),
    ("/v1/checkpoints?cursor=%00", "query.cursor"),
    ("/v1/checkpoints/%00", "path"),
    ("/v1/jobs?kind=%ED%A0%80", "query.kind"),  # a lone surrogate, UTF-8 encoded
    ("/v1/jobs/%ED%A0%80", "path"),
    ("/v1/jobs?status=%FF", "query.status"),  # not UTF-8 at all
])
def test_nul_or_invalid_unicode_in_a_url_is_422(stack, url, where):
    error = assert_error(stack.client.get(url), 422, "invalid_request")
    assert where in error["message"]
    assert_still_serving(stack)


@pytest.mark.parametrize("path, document, where", [
    ("/v1/jobs", {"kind": "audit", "spec": {"checkpoint_id": "a\u0000"}}, "spec.checkpoint_id"),
    ("/v1/jobs", {"kind": "train", "spec": {"preset": "paper_moons_erm"}, "tags": {"k": "\ud800"}}, "tags.k"),
    ("/v1/jobs", {"kind": "train", "spec": {"preset": "paper_moons_erm"}, "tags": {"k": "a\u0000b"}}, "tags.k"),
    ("/v1/jobs", {"kind": "train", "spec": {"preset": "paper_moons_erm"}, "tags": {"\u0000": "v"}}, "tags"),
    ("/v1/jobs", {"kind": "train", "spec": {"preset": "paper_moons_erm",
                                            "dataset": {"name": "two_moons", "params": {"x": [{"y": "\udfff"}]}}}},
     "spec.dataset.params.x.0.y"),
    ("/v1/api-keys", {"name": "a\u0000"}, "name"),
])
def test_nul_or_lone_surrogates_in_a_json_body_are_422_and_create_nothing(stack, path, document, where):
    before = job_count(stack)
    error = assert_error(post_json(stack, path, document), 422, "invalid_request")
    assert where in error["message"]
    assert job_count(stack) == before
    assert_still_serving(stack)


def test_raw_bytes_that_are_not_utf8_in_a_json_body_are_422(stack):
    body = b'{"kind": "train", "spec": {"preset": "paper_moons_erm"}, "tags": {"k": "\xed\xa0\x80"}}'
    response = stack.client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_request")
    assert_still_serving(stack)


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.normal(size=(20, 2)).astype("float32"), y=np.arange(20) % 2,
             attribute=(np.arange(20) // 2) % 2)
    return buffer.getvalue()


def test_form_text_is_checked_but_uploaded_bytes_are_not(stack):
    content = npz_bytes()
    assert b"\x00" in content  # a file may hold any bytes
    refused = stack.client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "bad\x00name"})
    assert "body.name" in assert_error(refused, 422, "invalid_request")["message"]
    accepted = stack.client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "moons"})
    assert accepted.status_code == 201, accepted.text


# ---- integers the database cannot store -------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"seed": "999999999999999999999"}, {"seed": str(2**31)}, {"seed": "-1"},
    {"since_step": str(2**63)}, {"since_step": str(2**31)}, {"limit": str(2**70)},
])
def test_out_of_range_integers_in_a_query_are_422(stack, params):
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}})
    error = assert_error(stack.client.get(f"/v1/jobs/{job.json()['id']}/metrics", params=params), 422,
                         "invalid_request")
    assert next(iter(params)) in error["message"]
    assert_still_serving(stack)


@pytest.mark.parametrize("cursor_parts", [[2**80], [-1], ["2020-01-01T00:00:00+00:00", "\ud800"]])
def test_cursors_that_decode_to_unstorable_values_are_400(stack, cursor_parts):
    cursor = base64.urlsafe_b64encode(json.dumps(cursor_parts).encode()).decode()
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}})
    path = "/v1/jobs" if len(cursor_parts) == 2 else f"/v1/jobs/{job.json()['id']}/metrics"
    assert_error(stack.client.get(path, params={"cursor": cursor}), 400, "invalid_cursor")


@pytest.mark.parametrize("route, cursor_parts", [
    ("jobs", ["0001-01-01", 1]),  # an ISO date, but naive, and an id that is a number
    ("jobs", ["0001-01-01T00:00:00+05:00", "0" * 32]),  # in UTC, a time before year 1
    ("jobs", ["2026-01-01T00:00:00+00:00", "not-a-job-id"]),
    ("logs", [True]), ("metrics", [True]), ("logs", [1.5]), ("metrics", ["7"]),
])
def test_cursors_whose_parts_are_not_what_the_api_wrote_are_400_on_postgres(services_stack, route, cursor_parts):
    stack = services_stack
    cursor = base64.urlsafe_b64encode(json.dumps(cursor_parts).encode()).decode()
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}})
    path = "/v1/jobs" if route == "jobs" else f"/v1/jobs/{job.json()['id']}/{route}"
    assert_error(stack.client.get(path, params={"cursor": cursor}), 400, "invalid_cursor")
    assert_still_serving(stack)


@pytest.mark.parametrize("spec, where", [
    ({"preset": "paper_moons_erm", "seeds": [2**40]}, "seeds"),
    ({"preset": "paper_moons_erm", "timeout_s": 2**80}, "timeout_s"),
    ({"preset": "paper_moons_erm", "device": "cuda:99999"}, "device"),
])
def test_out_of_range_train_fields_are_refused_at_submit(stack, spec, where):
    error = assert_error(stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec}), 422)
    assert where in error["message"]


# ---- audits: what the worker would fail on is refused at submit -------------------------------

@pytest.mark.parametrize("fields, where", [
    ({"seed": 2**80}, "seed"),
    ({"seed": 2**31}, "seed"),
    ({"device": "cuda:99999"}, "device"),
    ({"device": "cuda:64"}, "device"),
    ({"layer": "a..b"}, "layer"),
    ({"layer": "fc\u00001"}, "layer"),
    ({"layer": "x" * 201}, "layer"),
    ({"layer": "net.0; rm -rf /"}, "layer"),
    ({"dataset": {"name": "two_moons", "params": {"n_samples": "many"}}}, "dataset.params"),
    ({"dataset": {"name": "colored_mnist"}, "spurious_attribute": "shape"}, "shape"),
])
def test_bad_audit_fields_are_refused_at_submit(stack, trained_job, fields, where):
    spec = {"train_job_id": trained_job, "dataset": {"name": "two_moons"}, **fields}
    before = job_count(stack)
    error = assert_error(post_json(stack, "/v1/jobs", {"kind": "audit", "spec": spec}), 422)
    assert where in error["message"]
    assert job_count(stack) == before


@pytest.mark.parametrize("layer", ["net.0", "/fc1/Gemm_output_0", "onnx::Relu_5", "features.3"])
def test_layer_names_of_modules_and_onnx_tensors_are_accepted(stack, trained_job, layer):
    spec = {"train_job_id": trained_job, "dataset": {"name": "two_moons"}, "layer": layer, "seed": 2**31 - 1,
            "device": "cpu"}
    job = stack.client.post("/v1/jobs", json={"kind": "audit", "spec": spec})
    assert job.status_code == 202, job.text
    stack.client.post(f"/v1/jobs/{job.json()['id']}/cancel")


# ---- pages and operations ---------------------------------------------------------------------

def test_report_html_has_a_strict_content_security_policy(stack, trained_job):
    page = stack.client.get(f"/v1/jobs/{trained_job}/report.html")
    assert page.status_code == 200, page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src data:" in policy and "script-src" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in page.text.lower()


def test_metrics_need_the_admin_token(stack):
    anonymous = stack.client.get("/metrics", headers={"Authorization": ""})
    assert_error(anonymous, 401, "unauthorized")
    assert "gs_jobs" not in anonymous.text
    assert "gs_jobs" in stack.client.get("/metrics").text  # the admin token


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Referer": "https://evil.example/login-csrf.html"}, 403),
    ({"Origin": "http://127.0.0.1:1"}, 403),  # another port is another origin
    ({}, 303),  # no browser sent this: nothing to forge
    ("own", 303),
])
def test_dashboard_sign_in_from_another_origin_is_403(stack, headers, status):
    import httpx

    base = str(stack.client.base_url).rstrip("/")
    if headers == "own":
        headers = {"Origin": base, "Referer": f"{base}/dashboard/login"}
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as browser:
        response = browser.post("/dashboard/login", data={"token": ADMIN_TOKEN}, headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.headers["content-type"].startswith("text/html") and "another site" in response.text
        assert "gs_session" not in response.headers.get("set-cookie", "")
    else:
        assert "gs_session" in response.headers["set-cookie"]


def test_other_dashboard_posts_from_another_origin_are_403(stack):
    import httpx

    base = str(stack.client.base_url).rstrip("/")
    cookie = {"gs_session": ADMIN_TOKEN}
    for path in ("/dashboard/logout", "/dashboard/jobs", "/dashboard/jobs/0123456789abcdef/cancel"):
        response = httpx.post(f"{base}{path}", cookies=cookie, headers={"Origin": "https://evil.example"},
                              data={"preset": "paper_moons_erm", "steps": "5"})
        assert response.status_code == 403 and "another site" in response.text, path


# ---- no absolute server paths in responses ----------------------------------------------------

def test_errors_and_dataset_descriptions_show_no_server_paths(client, tmp_path, monkeypatch):
    from core.settings import get_settings
    from tests.api.test_datasets_api import checked, image_folder

    data_dir = tmp_path / "data"
    image_folder(data_dir / "faces")
    monkeypatch.setattr(get_settings(), "data_dir", data_dir)
    form = {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"}
    registered = checked(client, form)
    assert registered["status"] == "ready" and registered["description"]["metadata"] == "faces/metadata.csv"
    assert str(tmp_path) not in client.get("/v1/datasets").text

    (data_dir / "faces" / "imgs" / "3.png").unlink()  # the CSV now names an image that is not there
    broken = checked(client, form)
    assert broken["status"] == "failed" and "line 5: cannot read the image" in broken["error"], broken
    assert str(tmp_path) not in client.get(f"/v1/datasets/{broken['id']}").text


def test_a_job_error_quoting_a_server_file_is_shown_relative(client):
    from models.db import database
    from core.settings import get_settings
    from models import jobs as jobs_repo

    job = client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}}).json()
    where = get_settings().var_dir.resolve() / "storage" / "jobs" / job["id"] / "x.bin"
    with database().session() as session:
        row = jobs_repo.get(session, job["id"])
        row.error = {"code": "missing_input", "message": f"cannot read {where}"}
    shown = client.get(f"/v1/jobs/{job['id']}").json()["error"]
    assert shown == {"code": "missing_input", "message": f"cannot read storage/jobs/{job['id']}/x.bin"}


def test_without_server_paths_leaves_lookalikes_alone(monkeypatch, tmp_path):
    from api.errors import without_server_paths
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "data_dir", tmp_path / "data")
    text = f"{tmp_path}/data/a.csv; {tmp_path}/data; {tmp_path}/database/b; /v1/jobs/x"
    assert without_server_paths(text) == f"a.csv; .; {tmp_path}/database/b; /v1/jobs/x"
