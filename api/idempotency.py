"""Idempotency-Key: the same key and body give back the first response; another body is a 422.

Concurrent requests with one key race to insert the key's record in the same transaction as what they create: the
database's primary key lets one win; the others roll their work back and replay the winner's response.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
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
    request: str,
    create: Callable[[], tuple[int, Any]],
    stored: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    discard: Callable[[], None] | None = None,
) -> JSONResponse:
    """`request` identifies the request (any length: its sha256 is kept). `stored` turns the first response into
    what is kept for replays (e.g. without secrets). `discard` undoes what `create` did outside the database
    (a file moved into place) when a concurrent request with the same key won."""
    fingerprint = hashlib.sha256(request.encode()).hexdigest()
    if (replayed := replay_if_seen(session, principal, key, request)) is not None:
        return replayed
    status, body = create()
    body = jsonable_encoder(body)
    if key is not None:
        kept = stored(body) if stored else body
        auth_repo.save_idempotent(session, principal.owner_id, key, fingerprint, status, kept)
        try:
            session.flush()  # PostgreSQL: waits for a concurrent holder of the key, then refuses the duplicate
        except IntegrityError:
            session.rollback()  # what `create` added goes too: the winner's is the one
            if discard is not None:
                discard()
            return _replay(auth_repo.get_idempotent(session, principal.owner_id, key), fingerprint, request)
    return JSONResponse(body, status)


def replay_if_seen(session: Session, principal: Principal, key: str | None, request: str) -> JSONResponse | None:
    """The first response when this key was seen before; None when the request is new. Called early by routes
    whose work is costly (a model check), so a retry does not pay for it again."""
    if key is None:
        return None
    if len(key) > 255:
        raise ApiError(422, "invalid_request", "Idempotency-Key is longer than 255 characters.")
    previous = auth_repo.get_idempotent(session, principal.owner_id, key)
    if previous is None:
        return None
    return _replay(previous, hashlib.sha256(request.encode()).hexdigest(), request)


def _replay(previous: Any, fingerprint: str, request: str) -> JSONResponse:
    if previous is None:  # the winner rolled back after all: nothing to replay, the client may retry
        raise ApiError(409, "idempotency_conflict", "A concurrent request with this Idempotency-Key failed; retry.")
    if previous.request_hash not in (fingerprint, request):  # `request` itself: records kept before hashing
        raise ApiError(422, "idempotency_key_reused", "This Idempotency-Key was used with a different request body.")
    return JSONResponse(previous.response, previous.status_code)
