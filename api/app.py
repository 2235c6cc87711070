"""The FastAPI application: routers, the error shape, and the background loops (api/background.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from api import background, dashboard, errors
from api.deps import admin_token
from api.docs_security import DocsSecurityHeaders
from api.hygiene import refuse_unstorable_text
from api.limits import BodySizeLimit
from api.routes import checkpoints, datasets, jobs, keys, ops
from core.settings import get_settings


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    admin_token()  # make the local admin token file on first start
    tasks = background.start()
    yield
    for task in tasks:
        task.cancel()


def operation_id(route: APIRoute) -> str:
    """The handler's name (`create_job`, `upload_checkpoint`): what a generated client calls the operation."""
    return route.name


def create_app() -> FastAPI:
    # /docs and /redoc load Swagger UI and ReDoc from /static-offline-docs (files in the fastapi-offline
    # package), not from a CDN: they work on a machine without the internet.
    app = FastAPIOffline(
        title="Gradient Starvation service",
        version="1.0.0",
        description="Train classifiers with or without Spectral Decoupling; audit any model for "
        "reliance on a spurious feature.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        dependencies=[Depends(refuse_unstorable_text)],  # NUL or invalid Unicode anywhere: a 422
    )
    errors.install(app)
    settings = get_settings()
    app.add_middleware(
        BodySizeLimit, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    app.add_middleware(DocsSecurityHeaders)
    for module in (jobs, checkpoints, datasets, keys, ops):
        app.include_router(module.router)
    dashboard.install(app)
    return app


app = create_app()
