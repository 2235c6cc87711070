"""API keys: issued by the admin, each a tenant of its own; listed and revoked through the API."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from api.deps import AdminDep, Principal, PrincipalDep, SessionDep
from api.errors import not_found
from api.idempotency import body_hash, replay_or_create
from api.responses import CREATE_ERRORS, KEYED_ERRORS, error_responses, links_to
from api.schemas import ApiKeyCreate, ApiKeyOut, ApiKeyPage, ApiKeySummary
from models import auth as auth_repo

router = APIRouter(prefix="/v1/api-keys", tags=["auth"], responses=error_responses(*KEYED_ERRORS))


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyOut,
    responses={201: links_to("key_id", "revoke_api_key"), **error_responses(*CREATE_ERRORS, 403)},
)
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
    return replay_or_create(
        session,
        admin,
        idempotency_key,
        body_hash(body),
        create,
        stored=lambda first: {**first, "key": None, "webhook_secret": None},
    )


def summary(key) -> ApiKeySummary:
    return ApiKeySummary(id=key.id, name=key.name, created_at=key.created_at, revoked_at=key.revoked_at)


@router.get("", response_model=ApiKeyPage)
def list_api_keys(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
):
    """The admin sees every key (revoked ones too); a key sees itself. Secrets are never listed."""
    only = None if principal.is_admin else principal.owner_id
    rows = auth_repo.list_keys(session, limit=limit, after_id=cursor, only_id=only)
    items = rows[:limit]
    return ApiKeyPage(items=[summary(k) for k in items], next_cursor=items[-1].id if len(rows) > limit else None)


@router.delete("/{key_id}", response_model=ApiKeySummary, responses=error_responses(404))
def revoke_api_key(key_id: str, session: SessionDep, principal: PrincipalDep):
    """Revoke at once: the admin any key, a key itself (e.g. when it leaked). Its jobs and files stay."""
    if not may_manage(principal, key_id):
        raise not_found("API key", key_id)
    key = auth_repo.revoke(session, key_id)
    if key is None:
        raise not_found("API key", key_id)
    return summary(key)


def may_manage(principal: Principal, key_id: str) -> bool:
    return principal.is_admin or principal.owner_id == key_id
