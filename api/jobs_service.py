"""What the job routes do, kept out of the handlers: present a job, submit one (its kind resolves it: api/kinds/),
cancel, delete, and its report. Pages are in api/paging.py, live streams in api/job_streams.py. The /v1 routes and
the dashboard both call these, so a page can never do what the token could not.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.checks import check_callback_url, check_mlflow_uri, check_quota, queue_for
from api.deps import Principal
from api.dispatch import dispatch
from api.errors import ApiError, not_found, without_server_paths
from api.files_service import stored_bytes
from api.idempotency import body_hash, replay_or_create
from api.job_bodies import job_out_adapter
from api.kinds import KINDS
from api.kinds.base import Submission
from api.schemas import JobCreateFields, JobOutFields
from core.settings import Settings
from core.storage import job_key, store
from models import files as files_repo
from models import jobs as jobs_repo
from models.status import TERMINAL
from models.tables import ID_LENGTH, Job
from starvation.audit import standalone_page


def job_warnings(job: Job) -> list[str]:
    """Derived from what is stored (the resolved spec, the result), so every job, old ones too, shows them."""
    warnings = KINDS[job.kind].warnings(job)
    mlflow = (job.result or {}).get("mlflow") or {}
    if mlflow.get("error"):
        warnings.append(f"MLflow export failed: {without_server_paths(str(mlflow['error']))}")
    elif mlflow.get("live_error"):
        warnings.append(
            f"MLflow did not take the metrics while the job ran ("
            f"{without_server_paths(str(mlflow['live_error']))}); they were sent when it ended"
        )
    return warnings


def job_out(job: Job) -> JobOutFields:
    """The job as the API shows it; its kind picks the shape of `result` and computes its `summary`."""
    base = f"/v1/jobs/{job.id}"
    return job_out_adapter.validate_python(
        dict(
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
            error={**job.error, "message": without_server_paths(str(job.error.get("message", "")))}
            if job.error
            else None,
            result=job.result,
            warnings=job_warnings(job),
            summary=KINDS[job.kind].summary(job),
            links={
                "self": base,
                "metrics": f"{base}/metrics",
                "events": f"{base}/events",
                "report": f"{base}/report",
                "report_html": f"{base}/report.html",
                "artifacts": f"{base}/artifacts",
                "logs": f"{base}/logs",
            },
        )
    )


# A job id may be shortened to a unique prefix of this many hex digits or more (as `gs jobs` shows them).
MIN_ID_PREFIX = 8


def owned_job(session: Session, job_id: str, owner_id: str) -> Job:
    """The owner's job by its id or a unique prefix of it; 404 when none (or someone else's), 409 when ambiguous."""
    job = jobs_repo.get(session, job_id, owner_id=owner_id)
    if job is None and MIN_ID_PREFIX <= len(job_id) < ID_LENGTH:  # the repository takes hex digits only
        matches = jobs_repo.with_id_prefix(session, job_id, owner_id=owner_id, limit=2)
        if len(matches) > 1:
            raise ApiError(
                409, "ambiguous_id", f"More than one of your jobs has an id starting {job_id!r}; give more of it."
            )
        job = matches[0] if matches else None
    if job is None:
        raise not_found("job", job_id)
    return job


def submit(session: Session, body: JobCreateFields, principal: Principal, settings: Settings) -> Job:
    """Record a job of any kind: the quota, then the kind's own resolution (its checks, each reading what it needs
    once), then the outbound URLs."""
    check_quota(session, principal, settings)
    kind: str = body.kind  # every kind's Create has one (api/kinds/base.py)
    spec = KINDS[kind].resolve(Submission(session=session, principal=principal, settings=settings, body=body))
    # Last, the checks that ask DNS (seconds when a resolver is slow): a spec refused on its own merits never waits.
    if spec.get("mlflow"):
        check_mlflow_uri(spec["mlflow"]["tracking_uri"], settings)
    if body.callback_url:
        check_callback_url(str(body.callback_url), settings)
    return jobs_repo.create(
        session,
        owner_id=principal.owner_id,
        kind=kind,
        spec=spec,
        tags=body.tags,
        queue=queue_for(spec.get("device", "auto")),
        callback_url=str(body.callback_url) if body.callback_url else None,
    )


def submit_once(
    session: Session,
    body: JobCreateFields,
    principal: Principal,
    settings: Settings,
    idempotency_key: str | None,
) -> JSONResponse:
    """Record the job (or replay the first answer given to this Idempotency-Key), then send it."""

    def create() -> tuple[int, Any]:
        job = submit(session, body, principal, settings)
        return 202, job_out(job)

    response = replay_or_create(session, principal, idempotency_key, body_hash(body), create)
    # The row is committed before the message is sent: the database is the truth.
    session.commit()
    # In the request's own session: a second session per request would let concurrent submissions exhaust the
    # connection pool and stall. The job goes out now if its queue has room, else when a worker frees up.
    dispatch(session, settings)
    return response


def cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once, a running one asked to stop; a finished one is a 409."""
    if job.status in TERMINAL or not jobs_repo.request_cancel(session, job):
        raise ApiError(409, "job_finished", f"Job {job.id} is already {job.status}.")


def delete(session: Session, job: Job, settings: Settings) -> None:
    """A finished job, its files and checkpoints; one still queued or running is a 409."""
    if job.status not in TERMINAL:
        raise ApiError(409, "job_active", f"Job {job.id} is {job.status}; cancel it first.")
    store(settings).delete_prefix(job_key(job.id))
    for checkpoint in files_repo.checkpoints_of_job(session, job.id):
        session.delete(checkpoint)
    jobs_repo.remove(session, job)


def report_of(job: Job) -> dict[str, Any]:
    """GET /report's body, as the job's kind makes it; a 404 when it has none."""
    report = KINDS[job.kind].report(job)
    if report is None:
        raise ApiError(
            404, "no_report", f"Job {job.id} has no report ({job.kind}, {job.status}; train with audit: true)."
        )
    return report


def report_html(session: Session, job: Job) -> str:
    return standalone_page(*report_body(session, job))


def report_body(session: Session, job: Job) -> tuple[str, str]:
    """The report's title and its sections as HTML, without a page around them (the dashboard has its own)."""
    return KINDS[job.kind].report_body(job, report_of(job), lambda names: _plot_urls(session, job, names))


def _plot_urls(session: Session, job: Job, names: list[str]) -> dict[str, str]:
    # Plots inline as data URIs: the page needs no second authenticated request per image.
    urls = {}
    for name in names:
        artifact = files_repo.get_artifact(session, job.id, name)
        if artifact is not None:
            try:
                data = base64.b64encode(stored_bytes(artifact.path)).decode()
            except FileNotFoundError:
                continue
            urls[name] = f"data:{artifact.media_type};base64,{data}"
    return urls
