"""The one error shape of the API: {"error": {"code", "message", "details"}}, never a stack trace."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.storage import STORE_RETRY_AFTER_S, StoredFileMissing, StoreUnavailable
from starvation.errors import CodedError

log = logging.getLogger("gs.api")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def coded_error(exc: CodedError) -> ApiError:
    """The one mapping from the science package's errors to the API's: a 422 with the error's code and message,
    and the field it names (or the details it carries)."""
    details = getattr(exc, "details", None)
    field = getattr(exc, "field", None)
    return ApiError(422, exc.code, exc.message, details or ({"field": f"spec.{field}"} if field else None))


def not_found(what: str, ident: str) -> ApiError:
    # The same answer for "missing" and "someone else's": tenants cannot probe each other.
    return ApiError(404, "not_found", f"No {what} with id {ident!r}.")


def without_server_paths(text: str) -> str:
    """`text` with absolute paths under the service's folders (GS_VAR_DIR, GS_DATA_DIR, the working
    directory) made relative to them: a response never shows where the server keeps its files."""
    from core.settings import get_settings

    settings = get_settings()
    folders = [settings.var_dir, Path.cwd(), *([settings.data_dir] if settings.data_dir else [])]
    roots = {str(p) for folder in folders for p in (Path(folder).absolute(), Path(folder).resolve())}
    for root in sorted(roots - {"/"}, key=len, reverse=True):
        # root/x -> x; the root itself -> "."; "/data" is left alone in "/database".
        text = re.sub(re.escape(root) + r"(?:/|(?![\w.-]))", lambda m: "" if m.group().endswith("/") else ".", text)
    return text


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


DATABASE_RETRY_AFTER_S = 5
DATABASE_DOWN_PAGE = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{DATABASE_RETRY_AFTER_S}"><title>Database unavailable</title></head>
<body><h1>The database is unavailable</h1><p>You are still signed in and nothing was changed. This page tries
again every {DATABASE_RETRY_AFTER_S} seconds.</p></body></html>"""


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse(error_body(exc.code, without_server_paths(exc.message), exc.details), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
        message = f"Invalid request: {where}: {first['msg']}"
        return JSONResponse(error_body("invalid_request", message, details), 422)

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value (out of range, too long, not valid text): the request's fault.
        # api/hygiene.py and declared bounds refuse these first; this is the net for a missed field.
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
        message = "Invalid request: a value is out of range or too long to be stored."
        return JSONResponse(error_body("invalid_request", message), 422)

    async def _database_unavailable(request: Request, exc: Exception) -> Response:
        # Down, restarting, refusing connections or out of them: the client should retry, nothing is lost.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        message = "The database is unavailable; nothing was changed. Retry shortly."
        headers = {"Retry-After": str(DATABASE_RETRY_AFTER_S)}
        if request.url.path.startswith("/dashboard") and "text/html" in request.headers.get("accept", ""):
            # A page, not a sign-out: the session cookie is left alone and the page retries by itself.
            return HTMLResponse(DATABASE_DOWN_PAGE, 503, headers)
        return JSONResponse(error_body("database_unavailable", message), 503, headers)

    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, _database_unavailable)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("object store unavailable on %s %s: %s", request.method, request.url.path, exc)
        message = "The file store is unavailable; nothing was changed. Retry shortly."
        return JSONResponse(error_body("store_unavailable", message), 503, {"Retry-After": str(STORE_RETRY_AFTER_S)})

    @app.exception_handler(StoredFileMissing)
    async def _file_missing(request: Request, exc: StoredFileMissing) -> JSONResponse:
        log.error("stored file %s missing on %s %s", exc.key, request.method, request.url.path)
        return JSONResponse(error_body("file_missing", "The stored file is missing."), 404)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "Internal server error."), 500)
