"""What the job routes do, kept out of the handlers: validate a spec, record a job, enqueue it, list,
cancel and follow jobs. The /v1 routes and the dashboard both call these, so a page can never do what
the token could not.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api import streams
from api.checks import check_callback_url, check_mlflow_uri, check_quota, queue_for
from api.deps import Principal, still_valid
from api.dispatch import dispatch
from api.errors import ApiError, not_found, without_server_paths
from api.hygiene import MAX_DB_INT, first_unstorable
from api.idempotency import body_hash, replay_or_create
from api.job_bodies import job_out_adapter
from api.kinds import KINDS
from api.kinds.base import Submission
from api.schemas import JobCreateFields, JobOutFields, LogLine, LogPage, MetricOut
from core.paths import job_dir
from core.settings import Settings
from models import files as files_repo
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import database
from models.status import TERMINAL, JobStatus
from models.tables import ID_LENGTH, Job


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


JOB_ID = re.compile(f"[0-9a-f]{{{ID_LENGTH}}}")  # a uuid4's hex digits (models/tables.py new_id)
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


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def invalid_cursor() -> ApiError:
    # 400 as docs/api.md and the OpenAPI document promise: a cursor is an opaque token, and this one is not ours.
    return ApiError(400, "invalid_cursor", "The cursor is not one this API returned.")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(parts, list) or len(parts) != size or first_unstorable(parts, []) is not None:
            raise ValueError
        return parts
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_cursor() from None


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


def tag_filters(items: list[str]) -> dict[str, str]:
    """["team:x", ...] of ?tag= as {"team": "x"}."""
    tags: dict[str, str] = {}
    for item in items:
        if ":" not in item:
            raise ApiError(400, "invalid_tag_filter", f"Tag filter {item!r} is not of the form k:v.")
        key, value = item.split(":", 1)
        tags[key] = value
    return tags


def list_jobs(
    session: Session,
    owner_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    kind: str | None = None,
    status: JobStatus | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the owner's jobs, newest first, and the cursor of the next page (None on the last)."""
    after = job_after(cursor) if cursor else None
    page = jobs_repo.list_page(
        session, owner_id=owner_id, limit=limit, after=after, kind=kind, status=status, tags=tags or {}
    )
    items, more = page[:limit], len(page) > limit
    return items, encode_cursor(items[-1].created_at.isoformat(), items[-1].id) if more else None


def job_after(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a jobs cursor continues after: a UTC time and a job id, as `list_jobs` wrote them."""
    created_at, job_id = decode_cursor(cursor, 2)
    try:
        after = datetime.fromisoformat(created_at)
        if after.tzinfo is None or not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ValueError
        return after.astimezone(UTC), job_id
    except (TypeError, ValueError, OverflowError):  # OverflowError: an offset that moves it past year 1 or 9999
        raise invalid_cursor() from None


def after_row(cursor: str | None) -> int | None:
    """The row a metrics or logs cursor continues after (None: from the start)."""
    if not cursor:
        return None
    (after_id,) = decode_cursor(cursor, 1)
    if type(after_id) is not int or not 0 <= after_id <= MAX_DB_INT:  # not isinstance: JSON's true is a bool
        raise invalid_cursor()
    return after_id


def log_line(row: Any) -> dict[str, Any]:
    line = LogLine.model_validate(row, from_attributes=True).model_dump(mode="json")
    # The worker's lines are ours, but one may quote an error that names a file on this server.
    return {**line, "message": without_server_paths(line["message"])}


def logs_page(session: Session, job_id: str, *, cursor: str | None, limit: int) -> LogPage:
    rows = logs_repo.query(session, job_id, after_id=after_row(cursor), limit=limit + 1)
    items, more = rows[:limit], len(rows) > limit
    return LogPage(items=[log_line(r) for r in items], next_cursor=encode_cursor(items[-1].id) if more else None)


def follow_logs(
    job_id: str, cursor: str | None, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's log as JSON lines, as they are written, until the job has finished and every line was sent
    (or the key is revoked). The caller has checked the owner; the cursor is checked now."""
    after_id = after_row(cursor)

    def poll() -> tuple[str, bool]:
        nonlocal after_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            rows = logs_repo.query(session, job_id, after_id=after_id, limit=1000)
        if rows:
            after_id = rows[-1].id
        ended = state is None or (state[0] in TERMINAL and not rows)
        return "".join(json.dumps(log_line(r)) + "\n" for r in rows), ended

    return streams.polled(poll, is_disconnected)


def cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once, a running one asked to stop; a finished one is a 409."""
    if job.status in TERMINAL or not jobs_repo.request_cancel(session, job):
        raise ApiError(409, "job_finished", f"Job {job.id} is already {job.status}.")


def follow(
    session: Session, job_id: str, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's Server-Sent Events, once the owner is checked: `status` on every change of status or
    progress, `metrics` and `logs` for new rows, `end` when it has finished and everything was sent.
    A revoked key's stream ends without `end`."""
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
    last_state, last_metric_id, last_log_id = None, None, None

    def poll() -> tuple[str, bool]:
        nonlocal last_state, last_metric_id, last_log_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            if state is None:
                return "", True
            state = (state[0], round(state[1], 4))
            job = jobs_repo.get(session, job_id) if state != last_state else None  # the whole row only when news
            rows = metrics_repo.query(session, job_id, after_id=last_metric_id, limit=5000)
            lines = logs_repo.query(session, job_id, after_id=last_log_id, limit=1000)
        events = []
        if job is not None:
            last_state = (job.status, round(job.progress, 4))
            events.append(f"event: status\ndata: {json.dumps(job_out(job).model_dump(mode='json'))}\n\n")
        if rows:
            last_metric_id = rows[-1].id
            payload = [MetricOut.model_validate(m, from_attributes=True).model_dump() for m in rows]
            events.append(f"event: metrics\ndata: {json.dumps(payload)}\n\n")
        if lines:
            last_log_id = lines[-1].id
            events.append(f"event: logs\ndata: {json.dumps([log_line(r) for r in lines])}\n\n")
        ended = state[0] in TERMINAL and not rows and not lines
        if ended:
            events.append("event: end\ndata: {}\n\n")
        return "".join(events), ended

    return streams.polled(poll, is_disconnected)


def delete(session: Session, job: Job, settings: Settings) -> None:
    """A finished job, its files and checkpoints; one still queued or running is a 409."""
    if job.status not in TERMINAL:
        raise ApiError(409, "job_active", f"Job {job.id} is {job.status}; cancel it first.")
    shutil.rmtree(job_dir(settings, job.id), ignore_errors=True)
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
    from starvation.audit import standalone_page

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
            data = base64.b64encode(Path(artifact.path).read_bytes()).decode()
            urls[name] = f"data:{artifact.media_type};base64,{data}"
    return urls
