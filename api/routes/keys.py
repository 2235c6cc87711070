"""API keys: issued by the admin, each a tenant of its own."""
from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminDep, SessionDep
from api.schemas import COMMON_ERRORS, ApiKeyCreate, ApiKeyOut, error_responses
from models import auth as auth_repo

router = APIRouter(prefix="/v1/api-keys", tags=["auth"], responses=error_responses(*COMMON_ERRORS, 403))


@router.post("", status_code=201, response_model=ApiKeyOut)
def create_api_key(body: ApiKeyCreate, session: SessionDep, _: AdminDep):
    key, secret = auth_repo.issue_key(session, name=body.name)
    return ApiKeyOut(id=key.id, name=key.name, key=secret, created_at=key.created_at)
