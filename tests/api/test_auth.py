"""Auth: keys are stored hashed; without GS_ADMIN_TOKEN a local admin token is made once, private."""
from __future__ import annotations

import stat

from sqlalchemy import select


def test_api_keys_are_stored_as_hashes_only(client):
    from models.db import database
    from models.auth import hash_secret
    from models.tables import ApiKey

    issued = client.post("/v1/api-keys", json={"name": "hashed"}).json()
    with database().session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == issued["id"]))
        assert row.key_hash == hash_secret(issued["key"])
        assert issued["key"] not in {row.name, row.key_hash}
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {issued['key']}"}).status_code == 200


def test_local_admin_token_is_made_once_and_readable_only_by_its_owner(tmp_path, monkeypatch):
    from api import deps
    from core.settings import get_settings

    monkeypatch.delenv("GS_ADMIN_TOKEN")
    monkeypatch.setenv("GS_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    deps.admin_token.cache_clear()
    try:
        token = deps.admin_token()
        path = tmp_path / "admin_token"
        assert path.read_text().strip() == token and len(token) > 30
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        deps.admin_token.cache_clear()
        assert deps.admin_token() == token  # the second start reads the same file
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        deps.admin_token.cache_clear()
