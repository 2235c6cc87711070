"""What one key stores is its own: image folders granted per key, storage quotas, and DELETE for what it keeps."""
from __future__ import annotations

import numpy as np
import pytest

from tests.api.test_datasets_api import checked, image_folder, npz_bytes
from tests.fixtures_models import ColourBlind, ColourOnly, torchscript_bytes


@pytest.fixture
def settings():
    from core.settings import get_settings

    return get_settings()


def new_key(client, name: str) -> tuple[str, dict[str, str]]:
    response = client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['key']}"}


def register_npz(client, headers, rows: int = 40):
    rng = np.random.default_rng(rows)
    content = npz_bytes(x=rng.random((rows, 2), dtype=np.float32), y=np.arange(rows) % 2,
                        attribute=np.arange(rows) // 2 % 2, split=np.array(["train", "test"] * (rows // 2)))
    return client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "toy"}, headers=headers)


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
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=b).status_code == 404
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


def test_storage_quotas_count_what_a_key_keeps_and_delete_frees_it(client, monkeypatch, settings):
    _, headers = new_key(client, "quota")
    stored = settings.storage_dir / "datasets"
    first = register_npz(client, headers)
    assert first.status_code == 201, first.text
    size = (stored / f"{first.json()['id']}.npz").stat().st_size
    monkeypatch.setattr(settings, "max_stored_bytes_per_key", size * 3 // 2)  # the one kept fits, two would not
    files_before = set(stored.iterdir())
    over_bytes = register_npz(client, headers)
    assert over_bytes.status_code == 413, over_bytes.text
    error = over_bytes.json()["error"]
    assert error["code"] == "storage_quota_exceeded" and error["details"]["limit_bytes"] == size * 3 // 2
    assert set(stored.iterdir()) == files_before  # nothing kept of a refused upload

    monkeypatch.setattr(settings, "max_stored_bytes_per_key", 10 << 20)
    monkeypatch.setattr(settings, "max_datasets_per_key", 1)
    over_count = register_npz(client, headers)
    assert over_count.status_code == 429 and over_count.json()["error"]["code"] == "too_many_datasets"
    assert client.delete(f"/v1/datasets/{first.json()['id']}", headers=headers).status_code == 204
    assert register_npz(client, headers).status_code == 201

    monkeypatch.setattr(settings, "max_checkpoints_per_key", 1)
    kept = upload(client, headers, ColourOnly())
    assert kept.status_code == 201, kept.text
    assert upload(client, headers, ColourOnly()).status_code == 200  # the same bytes again store nothing new
    refused = upload(client, headers, ColourBlind())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_checkpoints", refused.text
    assert client.delete(f"/v1/checkpoints/{kept.json()['id']}", headers=headers).status_code == 204
    assert upload(client, headers, ColourBlind()).status_code == 201

    monkeypatch.setattr(settings, "max_datasets_per_key", 0)
    assert register_npz(client, None).status_code == 201  # the admin token has no quota


def test_delete_waits_for_the_jobs_that_use_it_then_frees_the_files(client, settings):
    _, headers = new_key(client, "deleter")
    dataset = register_npz(client, headers).json()
    (npz_file,) = (settings.storage_dir / "datasets").glob(f"{dataset['id']}.npz")
    model = upload(client, headers, ColourOnly()).json()
    train = job(client, headers, "train", {"preset": "paper_moons_erm", "dataset": {"name": dataset["id"]}})
    audit = job(client, headers, "audit", {"checkpoint_id": model["id"], "dataset": {"name": "colored_mnist"}})
    assert train.status_code == audit.status_code == 202, (train.text, audit.text)  # queued: no worker here

    for path, job_id, code in ((f"/v1/datasets/{dataset['id']}", train.json()["id"], "dataset_in_use"),
                               (f"/v1/checkpoints/{model['id']}", audit.json()["id"], "checkpoint_in_use")):
        busy = client.delete(path, headers=headers)
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["code"] == code and busy.json()["error"]["details"]["jobs"] == [job_id]
        assert client.get(path, headers=headers).status_code == 200
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 202
        assert client.delete(path, headers=headers).status_code == 204
        assert client.get(path, headers=headers).status_code == 404
        assert client.delete(path, headers=headers).status_code == 404
    assert not npz_file.exists() and not (settings.storage_dir / "checkpoints" / f"{model['id']}.pt").exists()


def test_deleting_an_image_folder_drops_its_index_and_keeps_the_images(client, tmp_path, monkeypatch, settings):
    from core.paths import dataset_index_path

    monkeypatch.setattr(settings, "data_dir", tmp_path)
    key_id, headers = new_key(client, "folders")
    image_folder(tmp_path / key_id / "faces")
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces"}, headers)
    index = dataset_index_path(settings, dataset["id"])
    assert dataset["status"] == "ready" and index.exists()
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 204
    assert not index.exists() and len(list((tmp_path / key_id / "faces" / "imgs").iterdir())) == 8
