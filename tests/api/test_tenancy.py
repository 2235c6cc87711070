"""What one key stores is its own: image folders granted per key."""
from __future__ import annotations

import numpy as np
import pytest

from tests.api.test_datasets_api import checked, image_folder, npz_bytes
from tests.fixtures_models import ColourOnly, torchscript_bytes


@pytest.fixture
def settings():
    from core.settings import get_settings

    return get_settings()


def new_key(client, name: str) -> tuple[str, dict[str, str]]:
    response = client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['key']}"}


def upload(client, headers, module):
    return client.post("/v1/checkpoints", files={"file": ("m.pt", torchscript_bytes(module))},
                       data={"format": "torchscript"}, headers=headers)


def job(client, headers, kind: str, spec: dict):
    return client.post("/v1/jobs", json={"kind": kind, "spec": spec}, headers=headers)


def test_a_keys_image_folder_is_a_404_to_other_keys_and_so_is_all_built_on_it(client, tmp_path, monkeypatch,
                                                                              settings):
    monkeypatch.setattr(settings, "data_dir", tmp_path)
    a_id, a = new_key(client, "a")
    b_id, b = new_key(client, "b")
    image_folder(tmp_path / a_id / "faces")
    (tmp_path / b_id).mkdir()
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"}, a)
    assert dataset["status"] == "ready", dataset

    # B reaches A's folder by no path, and cannot tell it from a folder that does not exist.
    tries = ["faces", f"../{a_id}/faces", str(tmp_path / a_id / "faces"), "nowhere", f"../{a_id}/nowhere"]
    refusals = [client.post("/v1/datasets", data={"name": "x", "format": "image_folder", "folder": folder},
                            headers=b) for folder in tries]
    assert {r.status_code for r in refusals} == {422}
    assert len({r.text for r in refusals}) == 1 and refusals[0].json()["error"]["code"] == "invalid_path"
    assert a_id not in refusals[0].text

    # A's dataset and the job trained on it are a 404 to B.
    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn", "channels": [4]}, "batch_size": 4,
            "steps": 2}
    trained = job(client, a, "train", spec)
    assert trained.status_code == 202, trained.text
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=b).status_code == 404
    assert client.get(f"/v1/jobs/{trained.json()['id']}", headers=b).status_code == 404
    assert dataset["id"] not in client.get("/v1/datasets", headers=b).text

    # Every kind of job B names it in is answered as if it did not exist.
    b_model = upload(client, b, ColourOnly())
    assert b_model.status_code == 201, b_model.text
    target = {"dataset": {"name": ""}, "checkpoint_id": b_model.json()["id"], "spurious_attribute": "attribute"}
    bodies = {"train": spec, "sweep": {**spec, "grid": {"optimizer.lr": [0.1, 0.01]}}, "audit": target,
              "repair": {**target, "method": {"name": "last_layer"}}}
    for kind, body in bodies.items():
        answers = [job(client, b, kind, {**body, "dataset": {"name": name}}) for name in (dataset["id"], "f" * 32)]
        assert answers[0].status_code == answers[1].status_code == 422, (kind, answers[0].text)
        assert answers[0].text.replace(dataset["id"], "f" * 32) == answers[1].text, kind

    # The admin token keeps the whole data folder.
    assert checked(client, {"name": "faces", "format": "image_folder", "folder": f"{a_id}/faces",
                            "image_size": "8"})["status"] == "ready"


def test_a_folder_listing_a_bad_value_names_the_line_and_not_the_value(client, tmp_path, monkeypatch, settings):
    monkeypatch.setattr(settings, "data_dir", tmp_path)
    key_id, headers = new_key(client, "csv")
    image_folder(tmp_path / key_id / "faces")
    with open(tmp_path / key_id / "faces" / "metadata.csv", "a") as csv_file:
        csv_file.write("imgs/0.png,secret-token-42,0,train\n")
    dataset = checked(client, {"name": "f", "format": "image_folder", "folder": "faces"}, headers)
    assert dataset["status"] == "failed" and "line 10: label must be an integer" in dataset["error"], dataset
    assert "secret-token-42" not in dataset["error"]
