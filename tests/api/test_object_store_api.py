"""The API on an object store (moto's S3 server, the production client): uploads go to the store and not to the
API's folder, downloads stream back byte for byte, deletes remove the objects, and a store that is down is a 503
with Retry-After, never a 500, with nothing lost."""

from __future__ import annotations

import io

import numpy as np
import pytest

from scripts.stack import free_port
from tests.fixtures_models import ColourBlind, ColourOnly, torchscript_bytes
from tests.s3server import CREDENTIALS, client_credentials, s3_server


@pytest.fixture(scope="module")
def server():
    with s3_server() as running:
        running.make_bucket("gs-api")
        yield running


@pytest.fixture
def on_the_store(server, monkeypatch):
    """The service's files in s3://gs-api/api (the client fixture's app reads get_settings() on every request)."""
    import boto3

    from core.settings import get_settings

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(get_settings(), "storage_url", "s3://gs-api/api")
    monkeypatch.setattr(get_settings(), "s3_endpoint_url", server.endpoint)
    s3 = boto3.client("s3", endpoint_url=server.endpoint, **client_credentials())
    return lambda key: s3.get_object(Bucket="gs-api", Key=f"api/{key}")["Body"].read()


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(
        buffer, x=rng.random((40, 2), dtype=np.float32), y=rng.integers(0, 2, 40), attribute=rng.integers(0, 2, 40),
        split=np.array(["train"] * 30 + ["test"] * 10),
    )  # fmt: skip
    return buffer.getvalue()


def test_a_checkpoint_lives_in_the_store_downloads_byte_for_byte_and_is_deleted_there(client, tenant, on_the_store):
    from core.settings import get_settings

    headers = tenant()
    content = torchscript_bytes(ColourOnly())
    response = client.post(
        "/v1/checkpoints", files={"file": ("m.pt", content)}, data={"format": "torchscript"}, headers=headers
    )
    assert response.status_code == 201, response.text
    checkpoint_id = response.json()["id"]
    assert on_the_store(f"checkpoints/{checkpoint_id}.pt") == content
    assert not list(get_settings().storage_dir.glob(f"checkpoints/{checkpoint_id}*"))  # not in the API's folder
    download = client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=headers)
    assert download.status_code == 200 and download.content == content
    assert download.headers["content-length"] == str(len(content))
    assert client.delete(f"/v1/checkpoints/{checkpoint_id}", headers=headers).status_code == 204
    with pytest.raises(Exception, match="NoSuchKey"):
        on_the_store(f"checkpoints/{checkpoint_id}.pt")


def test_an_npz_dataset_is_stored_under_its_id(client, tenant, on_the_store):
    content = npz_bytes()
    response = client.post(
        "/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "blobs"}, headers=tenant()
    )
    assert response.status_code == 201, response.text
    assert on_the_store(f"datasets/{response.json()['id']}.npz") == content


def test_a_store_that_is_down_is_a_503_with_retry_after_and_nothing_is_lost(client, tenant, on_the_store, monkeypatch):
    from core.settings import get_settings

    headers = tenant()
    content = torchscript_bytes(ColourOnly())
    upload = {"files": {"file": ("m.pt", content)}, "data": {"format": "torchscript"}, "headers": headers}
    checkpoint_id = client.post("/v1/checkpoints", **upload).json()["id"]
    real = get_settings().s3_endpoint_url
    monkeypatch.setattr(get_settings(), "s3_endpoint_url", f"http://127.0.0.1:{free_port()}")  # nothing listens
    for response in (
        client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=headers),
        client.post("/v1/checkpoints", **{**upload, "files": {"file": ("n.pt", torchscript_bytes(ColourBlind()))}}),
    ):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "store_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    assert client.get("/v1/checkpoints", headers=headers).json()["items"][0]["id"] == checkpoint_id
    monkeypatch.setattr(get_settings(), "s3_endpoint_url", real)
    assert client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=headers).content == content


def test_an_object_gone_from_the_store_is_a_404_file_missing(client, tenant, on_the_store, server):
    import boto3

    headers = tenant()
    content = torchscript_bytes(ColourOnly())
    response = client.post(
        "/v1/checkpoints", files={"file": ("m.pt", content)}, data={"format": "torchscript"}, headers=headers
    )
    checkpoint_id = response.json()["id"]
    boto3.client("s3", endpoint_url=server.endpoint, **client_credentials()).delete_object(
        Bucket="gs-api", Key=f"api/checkpoints/{checkpoint_id}.pt"
    )
    missing = client.get(f"/v1/checkpoints/{checkpoint_id}/file", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_missing"
    assert "api/" not in missing.text and "127.0.0.1" not in missing.text
