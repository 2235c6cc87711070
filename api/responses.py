"""The error shape every route answers, and the OpenAPI helpers that document each route's answers: its errors,
its links from a create to the operations on the new object, and media types other than JSON."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# When each error status is answered; every error has the body of ErrorResponse, also on HTML and file routes.
ERROR_MEANINGS = {
    400: "A body that cannot be parsed (JSON that is not UTF-8, broken multipart), or a cursor or filter this API "
    "did not issue.",
    401: "No token, or one that is unknown or revoked.",
    403: "Only the admin token may do this.",
    404: "No such object, or one that belongs to another key.",
    409: "The object's state does not allow it, or a concurrent request with this Idempotency-Key failed.",
    413: "The body or the upload is over the size limit, or would take the key past its stored bytes "
    "(`storage_quota_exceeded`).",
    422: "Invalid input (the error names the field), or an Idempotency-Key reused with another body.",
    429: "Over a limit of this key or of the service; retry after Retry-After seconds (a count of stored datasets "
    "or checkpoints: after deleting some).",
    503: "The database (or the model checker) is unavailable; nothing was changed. Retry after Retry-After seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for our error shape, always JSON (also on HTML and file routes)."""
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {
            "model": ErrorResponse,
            "description": ERROR_MEANINGS[code],
            "content": {"application/json": {"schema": schema}},
        }
        for code in codes
    }


# Every route behind a key may answer: 401 (the token), 422 (a parameter, or NUL/invalid Unicode anywhere in the
# request: api/hygiene.py) and 503 (the database is unavailable). Routes add what else they can answer.
KEYED_ERRORS = (401, 422, 503)


# A POST that creates something: its body may not parse (400) or be too large (413), and its Idempotency-Key may
# race (409).
CREATE_ERRORS = (400, 409, 413)


def links_to(parameter: str, *operation_ids: str) -> dict[str, Any]:
    """The `links` of a create's answer: the operations that take the new object's `id` as `parameter`. A client (and
    schemathesis's stateful phase, tests/api/test_fuzz_openapi.py) follows them from POST to GET/DELETE."""
    return {
        "links": {
            operation_id: {"operationId": operation_id, "parameters": {parameter: "$response.body#/id"}}
            for operation_id in operation_ids
        }
    }


def media_response(description: str, *media_types: str, binary: bool = False) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers something else than JSON (a file, a page, an event stream), so a client reads
    bytes or text. Such a route keeps the plain `Response` class: FastAPI then documents its errors as JSON only."""
    schema = {"type": "string", "format": "binary"} if binary else {"type": "string"}
    return {200: {"description": description, "content": {media: {"schema": schema} for media in media_types}}}
