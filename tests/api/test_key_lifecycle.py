"""API keys have a lifecycle over HTTP: listed (never their secrets) and revoked at once, their objects kept."""
from __future__ import annotations

from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRAIN = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}}


def new_key(client, name: str) -> tuple[str, dict[str, str]]:
    response = client.post("/v1/api-keys", json={"name": name}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['key']}"}


def every_key(client, headers) -> list[dict]:
    items, cursor = [], None
    while True:
        page = client.get("/v1/api-keys", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                          headers=headers).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_the_admin_lists_every_key_and_a_key_sees_only_itself(client):
    first, first_headers = new_key(client, "first")
    second, _ = new_key(client, "second")
    listed = every_key(client, ADMIN)
    assert {first, second} <= {k["id"] for k in listed}
    assert len({k["id"] for k in listed}) == len(listed)  # the cursor walks each key once
    assert all(set(k) == {"id", "name", "created_at", "revoked_at"} for k in listed)  # no secrets
    own = client.get("/v1/api-keys", headers=first_headers).json()["items"]
    assert [k["id"] for k in own] == [first]


def test_a_revoked_key_is_refused_at_once_and_its_jobs_stay(client):
    key_id, headers = new_key(client, "leaky")
    job = client.post("/v1/jobs", json=TRAIN, headers=headers).json()
    revoked = client.delete(f"/v1/api-keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/v1/jobs", headers=headers).status_code == 401
    again = client.delete(f"/v1/api-keys/{key_id}", headers=ADMIN)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]

    from models import jobs as jobs_repo
    from models.db import database

    with database().session() as session:
        assert jobs_repo.get(session, job["id"], owner_id=key_id) is not None


def test_a_key_may_revoke_itself_but_not_another(client):
    mine, my_headers = new_key(client, "mine")
    theirs, their_headers = new_key(client, "theirs")
    assert client.delete(f"/v1/api-keys/{theirs}", headers=my_headers).status_code == 404
    assert client.get("/v1/jobs", headers=their_headers).status_code == 200
    assert client.delete(f"/v1/api-keys/{mine}", headers=my_headers).status_code == 200
    assert client.get("/v1/jobs", headers=my_headers).status_code == 401


def test_revoking_an_unknown_key_is_404(client):
    assert client.delete("/v1/api-keys/nope", headers=ADMIN).status_code == 404
