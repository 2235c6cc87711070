"""Operations: liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from api.deps import database
from models.tables import Job
from worker.celery_app import app as celery_app

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz() -> JSONResponse:
    checks = {}
    try:
        with database().session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    with database().session() as session:
        rows = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
    lines = ["# HELP gs_jobs Jobs by kind and status.", "# TYPE gs_jobs gauge"]
    lines += [f'gs_jobs{{kind="{kind}",status="{status}"}} {count}' for kind, status, count in rows]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
