"""GS_PRESIGNED_DOWNLOADS_S: on an object store, a download the owner may read is a 307 to a short-lived presigned
GET of the object (moto's S3 server, the production client), byte for byte what was stored; the owner check comes
first, a missing object or a store that is down answers as it does when streamed, the URL is never logged, and the
file backend ignores the setting."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlparse

import httpx
import pydantic
import pytest

from core.settings import Settings
from scripts.stack import free_port
from tests.api.test_object_store_api import on_the_store, server  # noqa: F401 (fixtures)
from tests.fixtures_models import ColourBlind, ColourOnly, torchscript_bytes

LIFETIME_S = 60


@pytest.fixture
def presigned(on_the_store, monkeypatch):  # noqa: F811 (the imported fixture)
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "presigned_downloads_s", LIFETIME_S)
    return on_the_store


def uploaded(client, headers: dict[str, str], content: bytes) -> str:
    response = client.post(
        "/v1/checkpoints", files={"file": ("m.pt", content)}, data={"format": "torchscript"}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def followed(response: httpx.Response) -> bytes:
    """The redirect's target fetched as a browser would: with no token of ours."""
    assert response.status_code == 307, response.text
    assert response.headers["cache-control"] == "no-store"
    target = httpx.get(response.headers["location"], timeout=30)
    assert target.status_code == 200, target.text
    return target.content


def test_a_checkpoint_download_redirects_to_a_presigned_url_that_serves_its_bytes(client, tenant, presigned, caplog):
    caplog.set_level(logging.INFO)  # the service's level (core/logging_config.py)
    owner, stranger = tenant("owner"), tenant("stranger")
    content = torchscript_bytes(ColourOnly())
    checkpoint_id = uploaded(client, owner, content)

    caplog.clear()
    response = client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=owner, follow_redirects=False)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert followed(response) == content
    query = parse_qs(urlparse(response.headers["location"]).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == [str(LIFETIME_S)]
    assert f"{checkpoint_id}.pt" in query["response-content-disposition"][0]
    signature = query["X-Amz-Signature"][0]
    assert signature not in logged and "X-Amz-Signature" not in logged

    # Another key: a 404 as before, and no URL.
    refused = client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=stranger, follow_redirects=False)
    assert refused.status_code == 404 and "location" not in refused.headers
    assert signature not in refused.text


def test_a_job_artifact_redirects_after_the_owner_check(client, tenant, presigned):
    from core.settings import get_settings
    from core.storage import job_key, store
    from models import files as files_repo
    from models.db import database

    owner, stranger = tenant("owner"), tenant("stranger")
    job = client.post("/v1/jobs", json={"kind": "train", "spec": {"preset": "paper_moons_erm"}}, headers=owner).json()
    content = b'{"accuracy": 0.9}' * 1000
    key = job_key(job["id"], "report.json")
    scratch = get_settings().var_dir / "presigned-report.json"
    scratch.write_bytes(content)
    store(get_settings()).put(key, scratch)
    with database().session() as session:
        files_repo.add_artifact(session, job_id=job["id"], name="report.json", path=key,
                                media_type="application/json", size_bytes=len(content))  # fmt: skip

    url = f"/v1/jobs/{job['id']}/artifacts/report.json"
    assert followed(client.get(url, headers=owner, follow_redirects=False)) == content
    assert presigned(key) == content
    refused = client.get(url, headers=stranger, follow_redirects=False)
    assert refused.status_code == 404 and "location" not in refused.headers


def test_a_missing_object_or_a_store_that_is_down_answers_as_a_stream_would(client, tenant, presigned, monkeypatch):
    import boto3

    from core.settings import get_settings
    from tests.s3server import client_credentials

    owner = tenant()
    gone = uploaded(client, owner, torchscript_bytes(ColourBlind()))
    kept = uploaded(client, owner, torchscript_bytes(ColourOnly()))
    endpoint = get_settings().s3_endpoint_url
    boto3.client("s3", endpoint_url=endpoint, **client_credentials()).delete_object(
        Bucket="gs-api", Key=f"api/checkpoints/{gone}.pt"
    )
    missing = client.get(f"/v1/checkpoints/{gone}/file", headers=owner, follow_redirects=False)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_missing"

    monkeypatch.setattr(get_settings(), "s3_endpoint_url", f"http://127.0.0.1:{free_port()}")  # nothing listens
    down = client.get(f"/v1/checkpoints/{kept}/file", headers=owner, follow_redirects=False)
    assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
    assert int(down.headers["Retry-After"]) > 0 and "location" not in down.headers


def test_the_file_backend_ignores_the_setting(client, tenant, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "presigned_downloads_s", LIFETIME_S)
    owner, content = tenant(), torchscript_bytes(ColourOnly())
    response = client.get(f"/v1/checkpoints/{uploaded(client, owner, content)}/file", headers=owner,
                          follow_redirects=False)  # fmt: skip
    assert response.status_code == 200 and response.content == content


@pytest.mark.parametrize("lifetime", [-1, 3601])
def test_a_lifetime_past_an_hour_or_below_zero_is_refused_at_start(lifetime):
    with pytest.raises(pydantic.ValidationError):
        Settings(presigned_downloads_s=lifetime)


def test_a_presigned_url_names_the_host_clients_reach(tmp_path, monkeypatch):
    """GS_S3_PUBLIC_ENDPOINT_URL: the API reaches the store as http://minio:9000, clients as a public name."""
    from core.storage import store
    from tests.s3server import CREDENTIALS

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = Settings(var_dir=tmp_path, storage_url="s3://gs-pub/p", s3_endpoint_url="http://minio:9000",
                        s3_public_endpoint_url="https://files.example.org")  # fmt: skip
    url = store(settings).presigned_get("jobs/j/a.png", expires_s=30, filename="a.png", media_type="image/png")
    assert url is not None and url.startswith("https://files.example.org/gs-pub/p/jobs/j/a.png?")
    assert "X-Amz-Expires=30" in url
