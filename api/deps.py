"""Dependencies of route handlers: the database session and the caller's identity."""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.settings import Settings, get_settings
from models import auth as auth_repo
from models.db import database

ADMIN_OWNER = "admin"


def get_session():
    with database().new_session() as session:
        yield session
        session.commit()


# scope="function": the commit happens before the response is sent, so a client that reads
# right after a 2xx sees what it wrote.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@lru_cache
def admin_token() -> str:
    """GS_ADMIN_TOKEN, or for local use a token made once and kept in a file only the owner reads."""
    settings = get_settings()
    if settings.admin_token:
        return settings.admin_token
    path = settings.admin_token_file
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "gs_admin_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


class BearerHeader(HTTPBearer):
    """Declares the HTTP Bearer scheme in /openapi.json (a generated client then takes its token once) and
    hands over the raw Authorization header: `current_principal` checks it, and answers every failure."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        return request.headers.get("Authorization")


bearer = BearerHeader(scheme_name="bearer", description="An API key, or the admin token (GS_ADMIN_TOKEN).")
AuthorizationDep = Annotated[str | None, Security(bearer)]


@dataclass(frozen=True)
class Principal:
    owner_id: str
    is_admin: bool


def current_principal(session: SessionDep, authorization: AuthorizationDep) -> Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "unauthorized", "Send 'Authorization: Bearer <token>'.")
    token = authorization[7:].strip()
    if hmac.compare_digest(token.encode(), admin_token().encode()):
        return Principal(owner_id=ADMIN_OWNER, is_admin=True)
    key = auth_repo.find_by_secret(session, token)
    if key is None:
        raise ApiError(401, "unauthorized", "Unknown or revoked token.")
    return Principal(owner_id=key.id, is_admin=key.is_admin)


def still_valid(session: Session, principal: Principal) -> bool:
    """Whether the principal's key is still unrevoked (the admin token always is): long streams ask on every poll."""
    return principal.owner_id == ADMIN_OWNER or auth_repo.is_active(session, principal.owner_id)


def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "Only the admin token may do this.")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
