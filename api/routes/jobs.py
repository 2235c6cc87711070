"""Jobs: create, read, list, cancel, delete, metrics, events, report and artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import HTMLResponse, Response

from api import job_streams, jobs_service, paging
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import not_found
from api.files_service import stored_file
from api.hygiene import MAX_DB_INT
from api.job_bodies import JobCreate, JobOut, JobPage
from api.jobs_service import job_out, owned_job
from api.responses import CREATE_ERRORS, KEYED_ERRORS, error_responses, links_to, media_response
from api.schemas import MAX_SEED, ArtifactList, ArtifactOut, KindFilter, LogPage, MetricOut, MetricPage, StatusFilter
from api.streams import open_stream
from models import files as files_repo
from models import metrics as metrics_repo
from results.repair import RepairReport
from results.report import Report

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(*KEYED_ERRORS))
OF_A_JOB = error_responses(404, 409)  # every route under /v1/jobs/{job_id} (409: an id prefix two jobs share)
TOO_MANY_STREAMS = error_responses(429)  # the key's or the service's open streams (api/streams.py)
TO_THE_JOB = links_to(
    "job_id",
    "get_job",
    "cancel_job",
    "delete_job",
    "list_job_metrics",
    "get_job_logs",
    "stream_job_events",
    "get_report",
    "get_report_html",
    "list_artifacts",
)

MAX_LIMIT = 500
EVENT_STREAM = media_response(
    "`event: status` (the job), `event: metrics` and `event: logs` (new rows), `event: end`.", "text/event-stream"
)
# Checkpoints, plots and JSON reports, each with its own media type (the artifact list says which).
ARTIFACT_FILE = media_response(
    "The artifact's bytes.", "application/octet-stream", "image/png", "application/json", binary=True
)
REPORT_PAGE = media_response("The report as one self-contained page with its plots.", "text/html")
# report.html is one self-contained page: inline <style>, plots as data: URIs, no script at all.
REPORT_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Bodies that are accepted as they are: Swagger's "Try it out" starts from them, and the fuzzer's stateful phase
# mixes them in so that its jobs get created and their links followed (tests/api/test_fuzz_openapi.py).
JOB_EXAMPLES = {
    "train_preset": {
        "summary": "A recipe of the paper: SD on two moons",
        "value": {"kind": "train", "spec": {"preset": "paper_moons_sd"}},
    },
    "train": {
        "summary": "SD on Colored MNIST, 500 steps, tagged",
        "value": {
            "kind": "train",
            "tags": {"team": "vision"},
            "spec": {"dataset": {"name": "colored_mnist"}, "method": {"name": "sd", "sd_lambda": 2.0}, "steps": 500},
        },
    },
    "sweep": {
        "summary": "Two SD strengths on two moons",
        "value": {"kind": "sweep", "spec": {"preset": "paper_moons_sd", "grid": {"method.sd_lambda": [0.1, 1.0]}}},
    },
}


@router.post(
    "", status_code=202, response_model=JobOut, responses={202: TO_THE_JOB, **error_responses(*CREATE_ERRORS, 429)}
)
def create_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    return jobs_service.submit_once(session, body, principal, settings, idempotency_key)


@router.get("", response_model=JobPage, responses=error_responses(400))
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    kind: KindFilter = None,
    status: StatusFilter = None,
    tag: Annotated[list[str], Query(description="k:v, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
):
    tags = paging.tag_filters(tag)
    items, next_cursor = paging.list_jobs(
        session, principal.owner_id, limit=limit, cursor=cursor, kind=kind, status=status, tags=tags
    )
    return JobPage(items=[job_out(j) for j in items], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=OF_A_JOB)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep):
    return job_out(owned_job(session, job_id, principal.owner_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    jobs_service.cancel(session, job)
    return job_out(job)


@router.delete("/{job_id}", status_code=204, responses=error_responses(404, 409))
def delete_job(job_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    jobs_service.delete(session, owned_job(session, job_id, principal.owner_id), settings)


@router.get("/{job_id}/metrics", response_model=MetricPage, responses=error_responses(400, 404, 409))
def list_job_metrics(
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
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
    rows = metrics_repo.query(
        session,
        job_id,
        name=name,
        seed=seed,
        split=split,
        since_step=since_step,
        after_id=paging.after_row(cursor),
        limit=limit + 1,
    )
    items, more = rows[:limit], len(rows) > limit
    return MetricPage(
        items=[MetricOut(step=m.step, name=m.name, value=m.value, seed=m.seed, split=m.split) for m in items],
        next_cursor=paging.encode_cursor(items[-1].id) if more else None,
    )


@router.get(
    "/{job_id}/logs",
    response_model=LogPage,
    responses={
        200: {
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            "description": "A page of the job's log lines; with `follow=true`, a stream of JSON lines (LogLine) "
            "that ends when the job has finished.",
        },
        **error_responses(400, 404, 409),
        **TOO_MANY_STREAMS,
    },
)
def get_job_logs(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    follow: bool = False,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
):
    """The job's own log: its start, each evaluation, warnings, and how it ended."""
    job_id = owned_job(session, job_id, principal.owner_id).id
    if not follow:
        return job_streams.logs_page(session, job_id, cursor=cursor, limit=limit)
    lines = job_streams.follow_logs(job_id, cursor, principal, request.is_disconnected)
    return open_stream(principal.owner_id, settings, lines, "application/x-ndjson")


@router.get("/{job_id}/events", response_class=Response, responses={**EVENT_STREAM, **OF_A_JOB, **TOO_MANY_STREAMS})
def stream_job_events(
    job_id: str, request: Request, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
):
    """Server-Sent Events: `status` on every change of status or progress, `metrics` and `logs` for new rows."""
    events = job_streams.follow(session, job_id, principal, request.is_disconnected)
    return open_stream(principal.owner_id, settings, events, "text/event-stream")


@router.get("/{job_id}/report", response_model=Report | RepairReport, responses=OF_A_JOB)
def get_report(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    return jobs_service.report_of(job)


@router.get("/{job_id}/report.html", response_class=Response, responses={**REPORT_PAGE, **OF_A_JOB})
def get_report_html(job_id: str, session: SessionDep, principal: PrincipalDep):
    job = owned_job(session, job_id, principal.owner_id)
    return HTMLResponse(jobs_service.report_html(session, job), headers=REPORT_HTML_HEADERS)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=OF_A_JOB)
def list_artifacts(job_id: str, session: SessionDep, principal: PrincipalDep):
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
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


@router.get("/{job_id}/artifacts/{name}", response_class=Response, responses={**ARTIFACT_FILE, **OF_A_JOB})
def get_artifact(job_id: str, name: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
    artifact = files_repo.get_artifact(session, job_id, name)
    if artifact is None:
        raise not_found("artifact", name)
    return stored_file(settings, artifact.path, media_type=artifact.media_type, filename=artifact.name)
