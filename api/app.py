"""The FastAPI application: routers, the error shape, and the outbox sweep in the background."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from api import errors
from api.deps import admin_token, database
from api.routes import checkpoints, datasets, jobs, keys, ops
from worker.queue import sweep_outbox

log = logging.getLogger("gs.api")
SWEEP_EVERY_S = 5.0


async def sweep_forever() -> None:
    """Jobs committed while the broker was down are sent once it is back."""
    while True:
        await asyncio.sleep(SWEEP_EVERY_S)
        try:
            await run_in_threadpool(sweep_outbox, database())
        except Exception as exc:
            log.warning("outbox sweep failed: %s", exc)


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    admin_token()  # make the local admin token file on first start
    sweeper = asyncio.create_task(sweep_forever())
    yield
    sweeper.cancel()


def create_app() -> FastAPI:
    app = FastAPI(
        title="Gradient Starvation service",
        version="1.0.0",
        description="Train classifiers with or without Spectral Decoupling; audit any model for "
        "reliance on a spurious feature.",
        lifespan=lifespan,
    )
    errors.install(app)
    for module in (jobs, checkpoints, datasets, keys, ops):
        app.include_router(module.router)
    return app


app = create_app()
