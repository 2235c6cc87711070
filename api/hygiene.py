"""Input the database cannot store is refused at the door with a 422, never a 500.

PostgreSQL refuses NUL in text, and a lone surrogate ("\\ud800", or raw bytes that are not UTF-8) cannot
be encoded for any database. Both can arrive in a path, a query string, a JSON body or a form field, so
one app-wide dependency (`refuse_unstorable_text`) checks all four on every route, after FastAPI has
parsed the body: uploads stream to disk as before, and a file's own bytes are never inspected.

Integers are bounded where they are declared (`ge`/`le` in api/schemas.py and the routes); a value the
database still refuses is a 422 too (api/errors.py maps SQLAlchemy's DataError).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import Request
from starlette.datastructures import UploadFile

from api.errors import ApiError

# INTEGER columns (metric steps and seeds, row ids) are 32-bit on PostgreSQL.
MAX_DB_INT = 2**31 - 1


def storable(text: str) -> bool:
    """True when `text` has no NUL and is valid Unicode (no lone surrogate): every database takes it."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decoded(raw: bytes) -> str | None:
    """Percent-decoded URL text, or None when it is not UTF-8 or holds a NUL."""
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if "\x00" not in text else None


def refused(loc: list[Any]) -> ApiError:
    where = ".".join(str(part) for part in loc)
    message = f"Invalid request: {where}: text with a NUL character or invalid Unicode is not accepted."
    details = [{"loc": loc, "msg": "NUL character or invalid Unicode", "type": "unstorable_text"}]
    return ApiError(422, "invalid_request", message, details)


def check_url(scope: MutableMapping[str, Any]) -> None:
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    if _decoded(raw_path.split(b"?", 1)[0]) is None:
        raise refused(["path"])
    for part in scope.get("query_string", b"").split(b"&"):
        name, _, value = part.replace(b"+", b" ").partition(b"=")
        label = _decoded(name)
        if label is None:
            raise refused(["query"])
        if _decoded(value) is None:
            raise refused(["query", label])


def first_unstorable(document: Any, loc: list[Any]) -> list[Any] | None:
    """Where in a parsed JSON document (keys and values, any depth) a string is not storable, or None."""
    stack = [(document, loc)]
    while stack:  # iterative: JSON may nest deeper than Python's recursion limit
        value, where = stack.pop()
        if isinstance(value, str):
            if not storable(value):
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not storable(key):
                    return where
                stack.append((item, [*where, key]))
        elif isinstance(value, list):
            stack.extend((item, [*where, index]) for index, item in enumerate(value))
    return None


async def refuse_unstorable_text(request: Request) -> None:
    """App-wide dependency: runs on every route before its own parameters are read."""
    check_url(request.scope)
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is None:
        return  # the route reads no body
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()  # the form FastAPI already parsed (cached on the request)
        for name, value in form.multi_items():
            if not storable(name):
                raise refused(["body"])
            text = value.filename if isinstance(value, UploadFile) else value
            if text is not None and not storable(text):
                raise refused(["body", name])
        return
    try:
        document = await request.json()  # parsed once: FastAPI's own parse is cached on the request
    except (ValueError, RecursionError):
        return  # not JSON: the route's own validation answers
    where = first_unstorable(document, ["body"])
    if where is not None:
        raise refused(where)
