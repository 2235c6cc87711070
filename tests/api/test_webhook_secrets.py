"""Each API key signs its jobs' webhooks with a secret of its own, shown once when the key is made."""
from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from sqlalchemy import select, update

from tests.core.test_outbound import Listener


@pytest.fixture
def own_database(tmp_path):
    """A migrated database of its own: the in-process app's webhook loop must not race the test."""
    from models.db import Database
    from models.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'hooks.sqlite3'}"
    upgrade(url)
    db = Database(url)
    yield db
    db.engine.dispose()


def finished_job(session, owner_id: str, callback_url: str) -> str:
    from models import jobs as jobs_repo
    from models.tables import Job

    job = jobs_repo.create(session, owner_id=owner_id, kind="train", spec={}, tags={}, queue="cpu",
                           callback_url=callback_url)
    session.execute(update(Job).where(Job.id == job.id).values(**jobs_repo.terminal("succeeded")))
    return job.id


def test_a_new_key_shows_its_webhook_secret_once_and_keeps_it_for_signing(client):
    from models.db import database
    from models.tables import ApiKey

    issued = client.post("/v1/api-keys", json={"name": "signer"}).json()
    assert issued["webhook_secret"].startswith("whsec_") and issued["webhook_secret"] != issued["key"]
    with database().session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == issued["id"]))
        assert row.webhook_secret == issued["webhook_secret"]
    other = client.post("/v1/api-keys", json={"name": "signer"}).json()
    assert other["webhook_secret"] != issued["webhook_secret"]


def test_creating_a_key_honours_the_idempotency_key(client):
    from models.db import database
    from models.tables import ApiKey

    headers = {"Idempotency-Key": "key-create-1"}
    first = client.post("/v1/api-keys", json={"name": "once"}, headers=headers)
    again = client.post("/v1/api-keys", json={"name": "once"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == {**first.json(), "key": None, "webhook_secret": None}  # secrets shown once
    from models.tables import IdempotencyRecord

    with database().session() as session:  # and never stored in the clear
        kept = [row.response for row in session.scalars(select(IdempotencyRecord)).all()]
    assert first.json()["key"] not in str(kept) and first.json()["webhook_secret"] not in str(kept)
    other = client.post("/v1/api-keys", json={"name": "twice"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    with database().session() as session:
        assert len(session.scalars(select(ApiKey).where(ApiKey.name.in_(["once", "twice"]))).all()) == 1
    key = first.json()["key"]
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_webhooks_of_a_keys_jobs_are_signed_with_its_secret_and_the_admins_with_the_service_secret(
        own_database):
    from api import webhooks
    from models import auth as auth_repo

    receiver = Listener()
    try:
        with own_database.session() as session:
            key, _ = auth_repo.issue_key(session, name="tenant")
            hook = f"http://127.0.0.1:{receiver.port}"
            jobs = {"tenant": finished_job(session, key.id, f"{hook}/tenant"),
                    "admin": finished_job(session, "admin", f"{hook}/admin")}
            secrets = {"tenant": key.webhook_secret, "admin": "service-secret"}
        delivered = webhooks.deliver_due(own_database, "service-secret", timeout_s=5, max_attempts=3,
                                         allow="127.0.0.1")
        assert delivered == 2 and len(receiver.requests) == 2
        for raw in receiver.requests:
            head, body = raw.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            who = lines[0].split()[1].strip("/")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            signed = headers["x-gs-timestamp"].encode() + b"." + body
            expected = hmac.new(secrets[who].encode(), signed, hashlib.sha256).hexdigest()
            assert headers["x-gs-signature"] == f"sha256={expected}", who
            assert json.loads(body)["id"] == jobs[who]
    finally:
        receiver.close()


def test_a_callback_that_now_resolves_to_loopback_is_not_delivered(own_database):
    from api import webhooks
    from models.tables import Job

    receiver = Listener()
    try:
        with own_database.session() as session:  # e.g. a row from before the check, or a name that rebinds
            job_id = finished_job(session, "admin", f"http://127.0.0.1:{receiver.port}/hook")
        assert webhooks.deliver_due(own_database, "s", timeout_s=5, max_attempts=1, allow="") == 0
        with own_database.session() as session:
            assert session.get(Job, job_id).webhook_status == "failed"
        assert receiver.requests == []
    finally:
        receiver.close()
