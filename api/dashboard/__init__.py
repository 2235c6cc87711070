"""The web dashboard: server-rendered pages under /dashboard, live curves over SSE, no build step."""

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from api.dashboard.routes import CrossSiteForm, cross_site_page, router
from api.dashboard.session import SignInRequired, sign_in_page


def to_the_dashboard() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


def install(app: FastAPI) -> None:
    """The pages (`/` leads to them), and their own answers to a cross-site POST and to a visitor not signed in
    (a page or a redirect, not the API's JSON error)."""
    app.include_router(router)
    app.add_api_route("/", to_the_dashboard, include_in_schema=False)
    app.add_exception_handler(CrossSiteForm, cross_site_page)
    app.add_exception_handler(SignInRequired, sign_in_page)


__all__ = ["install", "router"]
