"""Datasets: built-ins are described; users register .npz arrays (never unpickled)."""
from __future__ import annotations

import io
import pickle

import numpy as np


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
