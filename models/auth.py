"""API keys (the secret stored as its sha256, the webhook secret as-is) and Idempotency-Key records."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.tables import ApiKey, IdempotencyRecord, utcnow


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_key(session: Session, *, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """A new key; the secret is returned once and only its hash is stored. Its webhook secret
    (`key.webhook_secret`) is stored as-is: the service signs with it."""
    secret = "gs_" + secrets.token_urlsafe(32)
    webhook_secret = "whsec_" + secrets.token_urlsafe(32)
    key = ApiKey(name=name, key_hash=hash_secret(secret), is_admin=is_admin, webhook_secret=webhook_secret)
    session.add(key)
    session.flush()
    return key, secret


def find_by_secret(session: Session, secret: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret), ApiKey.revoked_at.is_(None)))


def is_active(session: Session, key_id: str) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))) is not None


def list_keys(
    session: Session, *, limit: int, after_id: str | None = None, only_id: str | None = None
) -> Sequence[ApiKey]:
    """Keys by id (one more than `limit`, to tell whether a page follows), revoked ones included."""
    stmt = select(ApiKey)
    if only_id is not None:
        stmt = stmt.where(ApiKey.id == only_id)
    if after_id:
        stmt = stmt.where(ApiKey.id > after_id)
    return session.scalars(stmt.order_by(ApiKey.id).limit(limit + 1)).all()


def revoke(session: Session, key_id: str) -> ApiKey | None:
    """Revoke the key now (its jobs, checkpoints and datasets stay); revoking twice keeps the first time."""
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def webhook_secrets(session: Session, owner_ids: set[str]) -> dict[str, str]:
    """{key id: its webhook secret} for those of `owner_ids` that are keys with one."""
    if not owner_ids:
        return {}
    rows = session.execute(
        select(ApiKey.id, ApiKey.webhook_secret).where(ApiKey.id.in_(owner_ids), ApiKey.webhook_secret.is_not(None))
    )
    return {key_id: secret for key_id, secret in rows if secret is not None}


def get_idempotent(session: Session, owner_id: str, key: str) -> IdempotencyRecord | None:
    return session.get(IdempotencyRecord, (owner_id, key))


def save_idempotent(
    session: Session, owner_id: str, key: str, request_hash: str, status_code: int, response: Any
) -> None:
    session.add(
        IdempotencyRecord(
            owner_id=owner_id,
            key=key,
            request_hash=request_hash,
            status_code=status_code,
            response=response,
        )
    )
