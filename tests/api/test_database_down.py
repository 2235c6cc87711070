"""A database that does not answer is a 503 with Retry-After on every route, never a 500."""
from __future__ import annotations

import pytest

from tests.conftest import ADMIN_TOKEN, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRAIN = {"kind": "train", "spec": {"preset": "paper_moons_erm", "steps": 5}}


@pytest.fixture
def database_down(client, monkeypatch):
    """The service pointed at a PostgreSQL port where nothing listens (connections are refused)."""
    from core.settings import get_settings
    from models.db import forget_database

    monkeypatch.setattr(get_settings(), "database_url", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gs")
    forget_database()
    yield
    forget_database()  # monkeypatch then restores the URL; the next use opens the real database again


@pytest.mark.parametrize("method, path, body", [
    ("get", "/v1/jobs", None), ("post", "/v1/jobs", TRAIN), ("get", "/v1/jobs/abc", None),
    ("get", "/v1/checkpoints", None), ("post", "/v1/api-keys", {"name": "team"}), ("get", "/metrics", None),
])
def test_routes_answer_503_with_retry_after(client, database_down, method, path, body):
    response = client.request(method, path, headers=ADMIN, json=body)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_a_tenant_gets_503_not_401_and_the_service_recovers(client, tenant, monkeypatch):
    headers = tenant()
    from core.settings import get_settings
    from models.db import forget_database

    real = get_settings().database_url
    monkeypatch.setattr(get_settings(), "database_url", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gs")
    forget_database()
    # The key cannot be checked: retry later (503), not "your key is wrong" (401).
    assert client.get("/v1/jobs", headers=headers).status_code == 503
    monkeypatch.setattr(get_settings(), "database_url", real)
    forget_database()
    assert client.get("/v1/jobs", headers=headers).status_code == 200


def test_the_dashboard_keeps_its_user_signed_in_through_an_outage(client, monkeypatch):
    from core.settings import get_settings
    from models.db import forget_database

    browser = {"Cookie": f"gs_session={ADMIN_TOKEN}", "Accept": "text/html"}
    assert client.get("/dashboard/jobs", headers=browser, follow_redirects=False).status_code == 200
    real = get_settings().database_url
    monkeypatch.setattr(get_settings(), "database_url", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gs")
    forget_database()
    page = client.get("/dashboard/jobs", headers=browser, follow_redirects=False)
    assert page.status_code == 503 and "still signed in" in page.text  # not a redirect to the sign-in page
    assert "set-cookie" not in page.headers and int(page.headers["Retry-After"]) > 0
    monkeypatch.setattr(get_settings(), "database_url", real)
    forget_database()
    assert client.get("/dashboard/jobs", headers=browser, follow_redirects=False).status_code == 200
