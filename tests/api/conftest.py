from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_TOKEN


@pytest.fixture(scope="session")
def client():
    """The app in-process on a private embedded default (see tests/conftest.py); no worker."""
    from models.db import database
    from core.settings import get_settings
    from models.migrate import upgrade

    upgrade(get_settings().database_url)
    database.cache_clear()
    from api.app import app

    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as test_client:
        yield test_client


@pytest.fixture
def tenant(client):
    """A fresh API key: a tenant of its own."""

    def make(name: str = "team") -> dict[str, str]:
        response = client.post("/v1/api-keys", json={"name": name})
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['key']}"}

    return make
