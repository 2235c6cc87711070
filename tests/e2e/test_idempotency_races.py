"""Idempotency-Key on PostgreSQL, where column lengths are enforced and concurrent requests really race."""
from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from torch import nn

from tests.fixtures_models import torchscript_bytes

TRAIN = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5, "seeds": [0], "audit": False}}


def post_many(stack, count: int, path: str, **request) -> list[httpx.Response]:
    """`count` copies of one request at once, each on its own connection."""
    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(stack.client.base_url), headers=stack.client.headers, timeout=120) as client:
            return client.post(path, **request)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_concurrent_job_submissions_with_one_key_make_one_job(services_stack):
    tag = uuid.uuid4().hex
    body = {**TRAIN, "tags": {"race": tag}}
    responses = post_many(services_stack, 12, "/v1/jobs", json=body, headers={"Idempotency-Key": f"race-{tag}"})
    assert [r.status_code for r in responses] == [202] * 12, [r.text for r in responses if r.status_code != 202]
    assert len({r.json()["id"] for r in responses}) == 1
    listed = services_stack.client.get("/v1/jobs", params={"tag": f"race:{tag}"}).json()["items"]
    assert len(listed) == 1


def test_checkpoint_uploads_with_one_key_store_one_checkpoint_and_one_file(services_stack):
    # Freshly initialised weights: bytes no other test uploaded (the same bytes again would answer 200, no check).
    model = torchscript_bytes(nn.Sequential(nn.Flatten(), nn.Linear(2 * 14 * 14, 1)))
    folder = services_stack.var_dir / "storage" / "checkpoints"
    before = files_in(folder)
    key = {"Idempotency-Key": f"upload-{uuid.uuid4().hex}"}
    # Twenty at once, far past the key's two model checks (GS_UPLOAD_CHECKS_PER_KEY): the duplicates wait for the
    # first's check and replay it, none is refused.
    responses = post_many(services_stack, 20, "/v1/checkpoints", files={"file": ("m.pt", model)},
                          data={"format": "torchscript"}, headers=key)
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert files_in(folder) - before == {f"{ids.pop()}.pt"}
    again = services_stack.client.post("/v1/checkpoints", files={"file": ("m.pt", model)},
                                       data={"format": "torchscript"}, headers=key)
    assert again.status_code == 201 and again.json()["id"] == responses[0].json()["id"]


def test_npz_registration_with_a_key_replays_on_postgresql(services_stack):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(40, 2)).astype(np.float32), y=rng.integers(0, 2, 40),
             attribute=rng.integers(0, 2, 40))
    key = {"Idempotency-Key": f"npz-{uuid.uuid4().hex}"}
    first, second = (services_stack.client.post("/v1/datasets", data={"name": "blobs"}, headers=key,
                                                files={"file": ("d.npz", buffer.getvalue())}) for _ in range(2))
    assert first.status_code == 201, first.text
    assert second.status_code == 201 and second.json()["id"] == first.json()["id"]
