"""Jobs: create, read, list, cancel, delete, metrics, events, report and artifacts."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from api import jobs_service
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import ApiError, not_found, without_server_paths
from api.hygiene import MAX_DB_INT, first_unstorable
from api.idempotency import body_hash, replay_or_create
from api.schemas import (
    COMMON_ERRORS,
    MAX_SEED,
    ArtifactList,
    ArtifactOut,
    JobCreate,
    JobOut,
    JobPage,
    MetricOut,
    MetricPage,
    RepairReport,
    Report,
    error_responses,
)
from models import files as files_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import database
from models.tables import Job

ERRORS = error_responses(*COMMON_ERRORS, 404, 409)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

MAX_LIMIT = 500
# report.html is one self-contained page: inline <style>, plots as data: URIs, no script at all.
REPORT_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def job_out(job: Job) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        progress=job.progress,
        spec=job.spec,
        tags=job.tags,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        worker_id=job.worker_id,
        # The worker's messages are ours, but one may quote a file it could not read.
        error={**job.error, "message": without_server_paths(str(job.error.get("message", "")))} if job.error else None,
        result=job.result,
        links={
            "self": base,
            "metrics": f"{base}/metrics",
            "events": f"{base}/events",
            "report": f"{base}/report",
            "report_html": f"{base}/report.html",
            "artifacts": f"{base}/artifacts",
        },
    )


def owned_job(session: Session, job_id: str, owner_id: str) -> Job:
    job = jobs_repo.get(session, job_id, owner_id=owner_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(parts, list) or len(parts) != size or first_unstorable(parts, []) is not None:
            raise ValueError
        return parts
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "The cursor is not one this API returned.") from None


@router.post("", status_code=202, response_model=JobOut)
def create_job(
    body: Annotated[JobCreate, Body()],
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    def create() -> tuple[int, Any]:
        job = jobs_service.submit(session, body, principal, settings)
        return 202, job_out(job)

    response = replay_or_create(session, principal, idempotency_key, body_hash(body), create)
    # The row is committed before the message is sent: the database is the truth.
    session.commit()
    job_id = json.loads(response.body)["id"]
    job = jobs_repo.get(session, job_id)
    if job is not None and job.status == "queued" and job.enqueued_at is None:
        jobs_service.enqueue(session, job)
    return response


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    kind: str | None = None,
    status: str | None = None,
    tag: Annotated[list[str], Query(description="k:v, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
):
    tags: dict[str, str] = {}
    for item in tag:
        if ":" not in item:
            raise ApiError(400, "invalid_tag_filter", f"Tag filter {item!r} is not of the form k:v.")
        key, value = item.split(":", 1)
        tags[key] = value
    after = None
    if cursor:
        created_at, job_id = decode_cursor(cursor, 2)
        try:
            after = (datetime.fromisoformat(created_at), str(job_id))
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_cursor", "The cursor is not one this API returned.") from None
    page = jobs_repo.list_page(
        session, owner_id=principal.owner_id, limit=limit, after=after, kind=kind, status=status, tags=tags
    )
    items, more = page[:limit], len(page) > limit
    next_cursor = encode_cursor(items[-1].created_at.isoformat(), items[-1].id) if more else None
    return JobPage(items=[job_out(j) for j in items], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep):
    return job_out(owned_job(session, job_id, principal.owner_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    if job.status in jobs_repo.TERMINAL:
        raise ApiError(409, "job_finished", f"Job {job_id} is already {job.status}.")
    jobs_repo.request_cancel(session, job)
    return job_out(job)


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    job = owned_job(session, job_id, principal.owner_id)
    if job.status not in jobs_repo.TERMINAL:
        raise ApiError(409, "job_active", f"Job {job_id} is {job.status}; cancel it first.")
    jobs_service.delete(session, job, settings)


@router.get("/{job_id}/metrics", response_model=MetricPage)
def get_metrics(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    name: str | None = None,
    seed: Annotated[int | None, Query(ge=0, le=MAX_SEED)] = None,
    split: str | None = None,
    since_step: Annotated[int | None, Query(ge=0, le=MAX_DB_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    cursor: str | None = None,
):
    owned_job(session, job_id, principal.owner_id)
    after_id = None
    if cursor:
        (after_id,) = decode_cursor(cursor, 1)
        if not isinstance(after_id, int) or not 0 <= after_id <= MAX_DB_INT:
            raise ApiError(400, "invalid_cursor", "The cursor is not one this API returned.")
    rows = metrics_repo.query(
        session, job_id, name=name, seed=seed, split=split, since_step=since_step, after_id=after_id, limit=limit + 1
    )
    items, more = rows[:limit], len(rows) > limit
    return MetricPage(
        items=[MetricOut(step=m.step, name=m.name, value=m.value, seed=m.seed, split=m.split) for m in items],
        next_cursor=encode_cursor(items[-1].id) if more else None,
    )


@router.get("/{job_id}/events", response_class=StreamingResponse)
async def job_events(job_id: str, request: Request, principal: PrincipalDep):
    """Server-Sent Events: `status` on every change of status or progress, `metrics` for new rows."""
    with database().session() as session:
        owned_job(session, job_id, principal.owner_id)

    async def stream():
        last_state, last_metric_id = None, None
        while not await request.is_disconnected():
            with database().session() as session:
                job = jobs_repo.get(session, job_id)
                if job is None:
                    return
                rows = metrics_repo.query(session, job_id, after_id=last_metric_id, limit=5000)
                state = (job.status, round(job.progress, 4))
                if state != last_state:
                    last_state = state
                    yield f"event: status\ndata: {json.dumps(job_out(job).model_dump(mode='json'))}\n\n"
                if rows:
                    last_metric_id = rows[-1].id
                    payload = [MetricOut.model_validate(m, from_attributes=True).model_dump() for m in rows]
                    yield f"event: metrics\ndata: {json.dumps(payload)}\n\n"
                if job.status in jobs_repo.TERMINAL and not rows:
                    yield "event: end\ndata: {}\n\n"
                    return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.get("/{job_id}/report", response_model=Report | RepairReport)
def get_report(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    return jobs_service.report_of(job)


@router.get("/{job_id}/report.html", response_class=HTMLResponse)
def get_report_html(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    return HTMLResponse(jobs_service.report_html(session, job), headers=REPORT_HTML_HEADERS)


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, session: SessionDep, principal: PrincipalDep):
    owned_job(session, job_id, principal.owner_id)
    return ArtifactList(
        items=[
            ArtifactOut(
                name=a.name,
                media_type=a.media_type,
                size_bytes=a.size_bytes,
                url=f"/v1/jobs/{job_id}/artifacts/{a.name}",
            )
            for a in files_repo.artifacts_of_job(session, job_id)
        ]
    )


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse)
def get_artifact(job_id: str, name: str, session: SessionDep, principal: PrincipalDep):
    owned_job(session, job_id, principal.owner_id)
    artifact = files_repo.get_artifact(session, job_id, name)
    if artifact is None:
        raise not_found("artifact", name)
    return FileResponse(artifact.path, media_type=artifact.media_type, filename=artifact.name)
