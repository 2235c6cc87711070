"""Image folders in the object store (moto's S3 server, the production client): registered only under the caller's
grant of GS_DATA_URLS, every other URL answered with the one `invalid_path` a missing local folder gets; checked from
the store into a ready dataset, or failed naming the line of a row that leaves its prefix."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.api.test_datasets_api import checked
from tests.api.test_tenancy import new_key
from tests.s3server import CREDENTIALS, client_credentials, s3_server

BUCKET = "gs-api-images"


@pytest.fixture(scope="module")
def server():
    with s3_server() as running:
        running.make_bucket(BUCKET)
        running.make_bucket("gs-api-other")
        yield running


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """Folders under s3://gs-api-images/data/ (GS_DATA_URLS), checked in the API's own process (its check children
    would need the credentials in their environment from the start)."""
    import boto3

    from api import dataset_checks
    from core.settings import get_settings

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = get_settings()
    monkeypatch.setattr(settings, "data_urls", f"s3://{BUCKET}/data/")
    monkeypatch.setattr(settings, "s3_endpoint_url", server.endpoint)
    monkeypatch.setattr(settings, "data_dir", tmp_path)
    monkeypatch.setattr(
        dataset_checks, "check_in_child", lambda s, dataset_id, root, info, niceness=0: dataset_checks.check_image_folder(
            s, dataset_id, root, info)
    )  # fmt: skip
    return boto3.client("s3", endpoint_url=server.endpoint, **client_credentials())


def put_folder(s3, prefix: str, extra_row: str | None = None, bucket: str = BUCKET) -> None:
    from PIL import Image

    lines = ["path,label,attribute,split"]
    for i in range(8):
        buffer = io.BytesIO()
        Image.fromarray(np.full((10, 10, 3), 30 * i, dtype=np.uint8)).save(buffer, "PNG")
        s3.put_object(Bucket=bucket, Key=f"{prefix}imgs/{i}.png", Body=buffer.getvalue())
        lines.append(f"imgs/{i}.png,{i % 2},{(i // 2) % 2},{'train' if i < 6 else 'test'}")
    s3.put_object(Bucket=bucket, Key=f"{prefix}metadata.csv", Body="\n".join([*lines, *filter(None, [extra_row])]) + "\n")


def register(client, folder: str, headers=None, metadata: str = "metadata.csv"):
    form = {"name": "faces", "format": "image_folder", "folder": folder, "metadata": metadata, "image_size": "8"}
    return client.post("/v1/datasets", data=form, headers=headers)


def test_a_keys_folder_in_the_store_is_checked_there_and_no_other_url_tells_what_exists(client, s3, tmp_path):
    a_id, a = new_key(client, "store-a")
    b_id, b = new_key(client, "store-b")
    for prefix in (f"data/{a_id}/faces/", f"data/{b_id}/faces/", f"data-evil/{a_id}/faces/", "data/faces/"):
        put_folder(s3, prefix)
    put_folder(s3, f"data/{a_id}/faces/", bucket="gs-api-other")
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": f"s3://{BUCKET}/data/{a_id}/faces",
                               "image_size": "8"}, a)  # fmt: skip
    assert dataset["status"] == "ready", dataset
    assert dataset["description"]["splits"] == {"train": 6, "test": 2} and dataset["description"]["image_bytes"] > 0

    tries = [
        f"s3://{BUCKET}/data/{b_id}/faces/",  # another key's folder, which exists
        f"s3://{BUCKET}/data/{a_id}/nowhere/",  # nothing there
        f"s3://{BUCKET}/data-evil/{a_id}/faces/",  # a look-alike prefix
        f"s3://{BUCKET}/data/faces/",  # the listed prefix itself: the admin's
        f"s3://gs-api-other/data/{a_id}/faces/",  # another bucket
        f"s3://{BUCKET}/data/{a_id}/../{b_id}/faces/",
        f"s3://{BUCKET}/data/{a_id}//faces/",
        f"s3://{BUCKET}/data/{a_id}/%2e%2e/{b_id}/faces/",
        f"s3://{BUCKET}/data/{a_id}/faces\\..\\..\\{b_id}\\faces/",
        f"s3://{BUCKET}@evil.example/data/{a_id}/faces/",
        "nowhere",  # a local folder that does not exist: the same answer
    ]
    refusals = [register(client, folder, a) for folder in tries]
    refusals.append(register(client, f"s3://{BUCKET}/data/{a_id}/faces/", a, metadata="../../" + b_id + "/x.csv"))
    refusals.append(register(client, f"s3://{BUCKET}/data/{a_id}/faces/", a, metadata="missing.csv"))
    assert {r.status_code for r in refusals} == {422}, [r.text for r in refusals]
    assert len({r.text for r in refusals}) == 1 and refusals[0].json()["error"]["code"] == "invalid_path"
    assert b_id not in refusals[0].text and "evil" not in refusals[0].text
    nul = register(client, f"s3://{BUCKET}/data/{a_id}/fa\x00ces/", a)  # refused before any folder is looked at
    assert nul.status_code == 422 and nul.json()["error"]["details"][0]["type"] == "unstorable_text", nul.text

    # The admin token keeps every listed prefix, and nothing beside one.
    assert register(client, f"s3://{BUCKET}/data/{b_id}/faces/").status_code == 202
    assert register(client, f"s3://{BUCKET}/data/faces/").status_code == 202
    assert register(client, f"s3://{BUCKET}/data-evil/{a_id}/faces/").json()["error"]["code"] == "invalid_path"


def test_a_row_naming_a_key_outside_its_prefix_fails_the_check_naming_the_line_not_the_value(client, s3):
    key_id, headers = new_key(client, "store-rows")
    put_folder(s3, f"data/{key_id}/faces/", extra_row="../../secret-folder/0.png,1,0,train")
    put_folder(s3, "data/secret-folder/")
    dataset = checked(client, {"name": "f", "format": "image_folder", "folder": f"s3://{BUCKET}/data/{key_id}/faces/",
                               "image_size": "8"}, headers)  # fmt: skip
    assert dataset["status"] == "failed" and "line 10: the path names a key outside" in dataset["error"], dataset
    assert "secret" not in dataset["error"]


def test_without_listed_prefixes_a_folder_in_the_store_is_refused(client, s3, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "data_urls", "")
    refused = register(client, f"s3://{BUCKET}/data/x/faces/")
    assert refused.status_code == 422 and "GS_DATA_URLS" in refused.json()["error"]["message"]


def test_a_store_that_is_down_is_a_503_at_registration_with_nothing_registered(client, s3, monkeypatch):
    from core.settings import get_settings
    from scripts.stack import free_port

    key_id, headers = new_key(client, "store-down")
    before = client.get("/v1/datasets", headers=headers).json()["items"]
    monkeypatch.setattr(get_settings(), "s3_endpoint_url", f"http://127.0.0.1:{free_port()}")
    down = register(client, f"s3://{BUCKET}/data/{key_id}/faces/", headers)
    assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable", down.text
    assert down.headers["Retry-After"] == "10"
    assert client.get("/v1/datasets", headers=headers).json()["items"] == before
