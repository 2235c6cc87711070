"""The web dashboard: server-rendered pages under /dashboard, live curves over SSE, no build step."""
from fastapi import FastAPI

from api.dashboard.routes import CrossSiteForm, cross_site_page, router


def install(app: FastAPI) -> None:
    """The pages, and their own answer to a cross-site POST (a page, not the API's JSON error)."""
    app.include_router(router)
    app.add_exception_handler(CrossSiteForm, cross_site_page)


__all__ = ["install", "router"]
