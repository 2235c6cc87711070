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


def test_image_folder_under_the_data_dir_is_registered(client, tmp_path, monkeypatch):
    from core.settings import get_settings

    image_folder(tmp_path / "faces")
    monkeypatch.setattr(get_settings(), "data_dir", tmp_path)
    response = client.post("/v1/datasets", data={"name": "faces", "format": "image_folder", "folder": "faces",
                                                 "image_size": "8"})
    assert response.status_code == 201, response.text
    assert response.json()["description"]["input_shape"] == [3, 8, 8]


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
