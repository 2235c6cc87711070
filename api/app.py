"""The FastAPI application: routers, the error shape, and the background loops (api/background.py)."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from api import background, dashboard, errors, sandbox
from api.deps import admin_token
from api.limits import BodySizeLimit
from api.settings import get_settings
from api.routes import checkpoints, datasets, jobs, keys, ops


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    admin_token()  # make the local admin token file on first start
    tasks = background.start()
    yield
    for task in tasks:
        task.cancel()
    sandbox.shutdown()


def create_app() -> FastAPI:
    app = FastAPI(
        title="Gradient Starvation service",
        version="1.0.0",
        description="Train classifiers with or without Spectral Decoupling; audit any model for "
        "reliance on a spurious feature.",
        lifespan=lifespan,
    )
    errors.install(app)
    settings = get_settings()
    app.add_middleware(
        BodySizeLimit, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    for module in (jobs, checkpoints, datasets, keys, ops, dashboard):
        app.include_router(module.router)
    return app


app = create_app()
