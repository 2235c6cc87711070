"""Idempotency-Key: the same key and body give back the first response; another body is a 422."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import Principal
from api.errors import ApiError
from models import auth as auth_repo


def body_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable_encoder(payload), sort_keys=True).encode()).hexdigest()


def replay_or_create(
    session: Session,
    principal: Principal,
    key: str | None,
    request_hash: str,
    create: Callable[[], tuple[int, Any]],
    stored: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> JSONResponse:
    """`stored` turns the first response into what is kept for replays (e.g. without secrets)."""
    if key is not None:
        if len(key) > 255:
            raise ApiError(422, "invalid_request", "Idempotency-Key is longer than 255 characters.")
        previous = auth_repo.get_idempotent(session, principal.owner_id, key)
        if previous is not None:
            if previous.request_hash != request_hash:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "This Idempotency-Key was used with a different request body.",
                )
            return JSONResponse(previous.response, previous.status_code)
    status, body = create()
    body = jsonable_encoder(body)
    if key is not None:
        kept = stored(body) if stored else body
        auth_repo.save_idempotent(session, principal.owner_id, key, request_hash, status, kept)
    return JSONResponse(body, status)
