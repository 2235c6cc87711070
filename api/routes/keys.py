"""API keys: issued by the admin, each a tenant of its own."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header

from api.deps import AdminDep, SessionDep
from api.idempotency import body_hash, replay_or_create
from api.schemas import COMMON_ERRORS, ApiKeyCreate, ApiKeyOut, error_responses
from models import auth as auth_repo

router = APIRouter(prefix="/v1/api-keys", tags=["auth"], responses=error_responses(*COMMON_ERRORS, 403))


@router.post("", status_code=201, response_model=ApiKeyOut)
def create_api_key(
    body: ApiKeyCreate,
    session: SessionDep,
    admin: AdminDep,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    def create() -> tuple[int, Any]:
        key, secret = auth_repo.issue_key(session, name=body.name)
        return 201, ApiKeyOut(
            id=key.id, name=key.name, key=secret, webhook_secret=key.webhook_secret, created_at=key.created_at
        )

    # A replay names the key made the first time but not its secrets: they are shown once and
    # never stored in the clear (the key is kept only as a hash).
    return replay_or_create(session, admin, idempotency_key, body_hash(body), create,
                            stored=lambda first: {**first, "key": None, "webhook_secret": None})
