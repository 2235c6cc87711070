"""Datasets: built-ins are described; users register .npz arrays (never unpickled)."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_builtins_are_listed_with_their_parameters(client):
    items = {d["name"]: d for d in client.get("/v1/datasets").json()["items"] if d["builtin"]}
    assert {"colored_mnist", "two_moons"} <= set(items)
    assert "label_noise" in str(items["colored_mnist"]["description"])


def test_npz_dataset_is_registered_for_its_owner_only(client, tenant):
    mine, theirs = tenant("a"), tenant("b")
    rng = np.random.default_rng(0)
    content = npz_bytes(
        x=rng.random((40, 2), dtype=np.float32), y=rng.integers(0, 2, 40), attribute=rng.integers(0, 2, 40),
        split=np.array(["train"] * 30 + ["test"] * 10),
    )
    response = client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "toy"}, headers=mine)
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    assert dataset_id in [d["id"] for d in client.get("/v1/datasets", headers=mine).json()["items"]]
    assert dataset_id not in [d["id"] for d in client.get("/v1/datasets", headers=theirs).json()["items"]]
    body = {"kind": "train", "spec": {"preset": "paper_moons_erm", "dataset": {"name": dataset_id}}}
    assert client.post("/v1/jobs", json=body, headers=mine).status_code == 202
    assert client.post("/v1/jobs", json=body, headers=theirs).status_code == 422


def test_pickled_npz_is_refused(client, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([Payload()], dtype=object), y=np.zeros(1), attribute=np.zeros(1))
    for content in (buffer.getvalue(), pickle.dumps({"x": 1}), b"not a zip"):
        response = client.post("/v1/datasets", files={"file": ("d.npz", content)}, data={"name": "evil"})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_dataset"
    assert not marker.exists()


def image_folder(root, n: int = 8) -> None:
    from PIL import Image

    (root / "imgs").mkdir(parents=True)
    lines = ["path,label,attribute,split"]
    for i in range(n):
        Image.new("RGB", (10, 10), (30 * i % 255, 0, 0)).save(root / "imgs" / f"{i}.png")
        lines.append(f"imgs/{i}.png,{i % 2},{(i // 2) % 2},{'train' if i < 6 else 'test'}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def checked(client, form: dict, headers=None, timeout_s: float = 60.0) -> dict:
    """Register an image folder (202, pending) and wait for the API's background check to end it."""
    import time

    response = client.post("/v1/datasets", data=form, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    deadline = time.monotonic() + timeout_s
    while True:
        dataset = client.get(f"/v1/datasets/{response.json()['id']}", headers=headers).json()
        if dataset["status"] != "pending" or time.monotonic() > deadline:
            return dataset
        time.sleep(0.2)


def test_image_folder_under_the_data_dir_is_registered_then_checked(client, tmp_path, monkeypatch):
    from core.settings import get_settings

    image_folder(tmp_path / "faces")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"})
    assert dataset["status"] == "ready" and dataset["error"] is None, dataset
    description = dataset["description"]
    assert description["input_shape"] == [3, 8, 8] and description["splits"] == {"train": 6, "test": 2}
    assert sum(group["n"] for group in description["groups"]["test"]) == 2
    listed = {d["id"]: d for d in client.get("/v1/datasets").json()["items"] if d["id"]}
    assert listed[dataset["id"]]["status"] == "ready"


@pytest.mark.parametrize("line, message", [
    ("imgs/missing.png,1,0,train", "line 10: cannot read the image (No such file or directory)"),
    ("../escape.png,1,0,train", "line 10: the path leaves the image folder"),
    ("notes.txt,1,0,train", "line 10: cannot read the image (UnidentifiedImageError)"),
])
def test_a_bad_folder_ends_failed_naming_the_row_and_cannot_be_used(client, tmp_path, monkeypatch, line, message):
    from core.settings import get_settings

    image_folder(tmp_path / "faces")
    (tmp_path / "faces" / "notes.txt").write_text("not an image")
    (tmp_path / "escape.png").write_bytes((tmp_path / "faces" / "imgs" / "0.png").read_bytes())
    with open(tmp_path / "faces" / "metadata.csv", "a") as csv_file:
        csv_file.write(line + "\n")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"})
    assert dataset["status"] == "failed" and message in dataset["error"], dataset
    assert str(tmp_path) not in dataset["error"]
    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn"}, "batch_size": 4, "steps": 2}
    refused = client.post("/v1/jobs", json={"kind": "train", "spec": spec})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_not_ready", refused.text
    assert message in refused.json()["error"]["message"]


def test_a_csv_without_its_columns_ends_failed(client, tmp_path, monkeypatch):
    from core.settings import get_settings

    image_folder(tmp_path / "faces")
    (tmp_path / "faces" / "metadata.csv").write_text("file,label\nimgs/0.png,1\n")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces"})
    assert dataset["status"] == "failed" and "lacks column(s) attribute, path" in dataset["error"], dataset


def test_a_pending_folder_cannot_be_used_and_a_ready_one_needs_minibatches(client, tmp_path, monkeypatch):
    from core.settings import get_settings
    from models import files as files_repo
    from models.db import database

    image_folder(tmp_path / "faces")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    dataset = checked(client, {"name": "faces", "format": "image_folder", "folder": "faces", "image_size": "8"})
    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn"}, "steps": 2}
    full_batch = client.post("/v1/jobs", json={"kind": "train", "spec": spec})
    assert full_batch.status_code == 422 and full_batch.json()["error"]["details"]["field"] == "spec.batch_size"
    with database().session() as session:  # as it is between the POST and the end of its check
        files_repo.get_dataset(session, dataset["id"], owner_id=None).status = "pending"
    monkeypatch.setattr(get_settings(), "dataset_check_stale_s", 3600.0)
    with database().session() as session:  # claimed by a check in progress, so the loop leaves it alone
        from models.tables import utcnow
        files_repo.get_dataset(session, dataset["id"], owner_id=None).check_started_at = utcnow()
    pending = client.post("/v1/jobs", json={"kind": "train", "spec": {**spec, "batch_size": 4}})
    assert pending.status_code == 409 and "pending" in pending.json()["error"]["message"], pending.text
    with database().session() as session:  # the check "in progress" ends: the key's next folders would wait for it
        files_repo.finish_dataset_check(session, dataset["id"])


def test_someone_elses_dataset_is_a_404(client, tenant):
    other = tenant("other")
    assert client.get("/v1/datasets/nope").status_code == 404
    registered = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]),
                                                                              attribute=np.zeros(4, dtype=int)))},
                             data={"name": "mine"})
    assert registered.status_code == 201 and registered.json()["status"] == "ready", registered.text
    assert client.get(f"/v1/datasets/{registered.json()['id']}").status_code == 200
    assert client.get(f"/v1/datasets/{registered.json()['id']}", headers=other).status_code == 404


@pytest.mark.parametrize("folder, metadata", [
    ("../outside", "metadata.csv"), ("/etc", "metadata.csv"), ("faces", "../../secret.csv"),
])
def test_dataset_paths_that_leave_the_data_dir_are_refused(client, tmp_path, monkeypatch, folder, metadata):
    from core.settings import get_settings

    data_dir = tmp_path / "data"
    image_folder(data_dir / "faces")
    image_folder(tmp_path / "outside")
    monkeypatch.setattr(get_settings(), "data_dir", data_dir)
    response = client.post("/v1/datasets", data={"name": "x", "format": "image_folder", "folder": folder,
                                                 "metadata": metadata})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_path"
