"""Browser sign-in for the dashboard: the API token, kept in an HttpOnly cookie scoped to /dashboard.

- The cookie is HttpOnly (page scripts cannot read it), SameSite=Strict (other sites cannot make the
  browser send it), Path=/dashboard (the /v1 API never accepts it: Bearer tokens only there), and
  Secure when the page came over HTTPS.
- It holds the token itself, so revoking an API key signs its browsers out at once.
- Forms that change something carry a CSRF token: an HMAC of the session under a server secret.
- Every POST (sign-in too: no login CSRF) is refused when the browser says it comes from another origin.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from api.deps import Principal, SessionDep, admin_token, current_principal
from api.errors import ApiError

COOKIE = "gs_session"
COOKIE_PATH = "/dashboard"
MAX_AGE_S = 12 * 3600
MAX_TOKEN_CHARS = 512


def principal_of(request: Request, session: Session) -> Principal | None:
    """Whoever the session cookie names, or None (no cookie, unknown or revoked token)."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return principal_for_token(session, token)


def principal_for_token(session: Session, token: str) -> Principal | None:
    # The same check as the API's Bearer auth, so both accept exactly the same tokens.
    try:
        return current_principal(session, authorization=f"Bearer {token}")
    except ApiError:
        return None


class SignInRequired(Exception):
    """A page asked for without a valid session cookie: answered by `to_login`."""


def signed_in(request: Request, session: SessionDep) -> Principal:
    """The pages' one sign-in guard: whoever the cookie names, or off to the sign-in page and back."""
    principal = principal_of(request, session)
    if principal is None:
        raise SignInRequired
    return principal


SignedInDep = Annotated[Principal, Depends(signed_in)]


async def sign_in_page(request: Request, _: Exception) -> Response:
    return to_login(request)


def require_principal(request: Request, session: Session) -> Principal:
    """For the JSON/SSE endpoints the pages call: 401 in the API's error shape."""
    principal = principal_of(request, session)
    if principal is None:
        raise ApiError(401, "unauthorized", "Sign in to the dashboard first (/dashboard/login).")
    return principal


def start(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def end(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=is_https(request))


def is_https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def csrf_token(request: Request) -> str:
    session_token = request.cookies.get(COOKIE, "")
    return hmac.new(admin_token().encode(), b"dashboard-csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def csrf_ok(request: Request, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(csrf_token(request), submitted or "")


def same_origin(request: Request) -> bool:
    """False when the Origin header (else the Referer) names another origin than this service's.

    A request with neither is allowed: browsers send Origin on every cross-site POST, so one without it
    comes from a non-browser client, which could send any header it liked anyway.
    """
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return True
    parts = urlsplit(claimed.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (sandboxed or privacy-stripped), file:, or garbage
    own_scheme = "https" if is_https(request) else request.url.scheme
    # Behind a proxy that rewrites Host, X-Forwarded-Host names us (a cross-site form cannot set it).
    own_hosts = {
        _host_port(own_scheme, request.headers.get(name, "").split(",")[0].strip())
        for name in ("host", "x-forwarded-host")
    }
    return parts.scheme == own_scheme and _host_port(parts.scheme, parts.netloc) in own_hosts - {""}


def _host_port(scheme: str, netloc: str) -> str:
    default = ":443" if scheme == "https" else ":80"
    netloc = netloc.rsplit("@", 1)[-1].lower()
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only a dashboard path of this site (no open redirect)."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard/jobs"


def to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboard/login?next={quote(target, safe='')}", status_code=303)
