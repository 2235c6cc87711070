"""Dashboard pages: sign-in, job list, a job's live curves, its report, two jobs side by side, API keys.

Handlers stay thin: who is signed in comes from `session.py`, what to show from `views.py`, and every
read or write goes through the same code as the /v1 API (so the dashboard can never do what the
token could not).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from api import job_streams, jobs_service, paging
from api.dashboard import session as browser
from api.dashboard import views
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.files_service import stored_file
from api.kinds import KINDS, repair
from api.kinds.repair import RepairJobCreate
from api.kinds.train import TrainJobCreate
from api.routes.keys import may_manage
from api.streams import open_stream
from core.settings import get_settings
from models import auth as auth_repo
from models import files as files_repo
from models.kinds import JobKind
from models.status import TERMINAL, JobStatus
from models.tables import Job

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["fmt"] = views.fmt
templates.env.globals.update(JobStatus=JobStatus, TERMINAL=TERMINAL)


class CrossSiteForm(Exception):
    """A POST whose Origin (or Referer) is another site: answered with `cross_site_page`."""


def refuse_cross_site_posts(request: Request) -> None:
    if request.method not in ("GET", "HEAD", "OPTIONS") and not browser.same_origin(request):
        raise CrossSiteForm


router = APIRouter(prefix="/dashboard", include_in_schema=False, dependencies=[Depends(refuse_cross_site_posts)])

STATIC = {
    "dashboard.css": "text/css",
    "charts.js": "text/javascript",
    "job.js": "text/javascript",
    "jobs.js": "text/javascript",
    "compare.js": "text/javascript",
}
SECURITY_HEADERS = {
    # Only our own scripts; inline style attributes (the sweep's heat maps); plots arrive as data: URIs.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
JOB_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, name, {"csrf": browser.csrf_token(request), **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def not_found_page(request: Request, what: str) -> HTMLResponse:
    return page(request, "message.html", {"title": "Not found", "message": f"No {what} here."}, 404)


def expired_form(request: Request) -> HTMLResponse:
    return page(request, "message.html", {"title": "Expired form", "message": "Reload the page and try again."}, 403)


async def cross_site_page(request: Request, _: Exception) -> Response:
    return page(request, "message.html", {"title": "Refused", "message": "This form was sent from another site."}, 403)


def owned_job(session: Session, job_id: str, owner_id: str) -> Job | None:
    """The API's ownership check; None (a "not found" page) where the API would answer 404."""
    if not JOB_ID.match(job_id):
        return None
    try:
        return jobs_service.owned_job(session, job_id, owner_id)
    except ApiError:
        return None


# ---- sign-in -------------------------------------------------------------------------------


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/dashboard/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return page(request, "login.html", {"next": browser.safe_next(next), "error": None})


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    token: Annotated[str, Form(max_length=512)],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    token = token.strip()
    if not token or browser.principal_for_token(session, token) is None:
        return page(
            request, "login.html", {"next": browser.safe_next(next), "error": "That token is unknown or revoked."}, 401
        )
    response = RedirectResponse(browser.safe_next(next), status_code=303)
    browser.start(response, request, token)
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str | None, Form()] = None) -> Response:
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    response = RedirectResponse("/dashboard/login", status_code=303)
    browser.end(response, request)
    return response


# ---- jobs ----------------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: SessionDep,
    principal: browser.SignedInDep,
    status: str | None = None,
    kind: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    error: str | None = None,
) -> Response:
    status = JobStatus(status) if status in set(JobStatus) else None  # an unknown filter: every job, as before
    kind = kind if kind in KINDS else None
    try:
        jobs, next_cursor = paging.list_jobs(
            session, principal.owner_id, limit=limit, cursor=cursor or None, kind=kind, status=status
        )
    except ApiError:
        return RedirectResponse("/dashboard/jobs", status_code=303)  # a stale cursor: start over
    rows = [views.job_row(job) for job in jobs]
    from starvation.presets import PRESETS

    return page(
        request,
        "jobs.html",
        {
            "rows": rows,
            "status": status,
            "kind": kind,
            "statuses": list(JobStatus),
            "kinds": list(KINDS),
            "next_cursor": next_cursor,
            "limit": limit,
            "presets": sorted(PRESETS),
            "any_active": any(r["active"] for r in rows),
            "form_key": secrets.token_hex(16),
            "error": error if error and len(error) < 500 else None,
            "principal": principal,
        },
    )


@router.post("/jobs")
def submit_train_job(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: browser.SignedInDep,
    preset: Annotated[str, Form(max_length=100)],
    steps: Annotated[int, Form(ge=1)],
    seeds: Annotated[str, Form(max_length=200)] = "0",
    eval_every: Annotated[int, Form(ge=1)] = 50,
    audit: Annotated[str | None, Form()] = None,
    form_key: Annotated[str | None, Form(max_length=64)] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    try:
        seed_list = [int(s) for s in seeds.replace(" ", "").split(",") if s]
        body = TrainJobCreate(
            kind="train",
            tags={"source": "dashboard"},
            spec={
                "preset": preset,
                "steps": steps,
                "seeds": seed_list,
                "eval_every": eval_every,
                "audit": audit == "on",
            },
        )
        # What POST /v1/jobs does: same validation, idempotency (the form's key) and enqueueing.
        created = jobs_service.submit_once(session, body, principal, settings, idempotency_key=form_key)
    except ValueError:  # pydantic's ValidationError too
        return jobs_error("Seeds are whole numbers separated by commas, e.g. 0,1,2.")
    except ApiError as exc:
        return jobs_error(exc.message)
    job_id = json.loads(created.body)["id"]
    return RedirectResponse(f"/dashboard/jobs/{job_id}", status_code=303)


def jobs_error(message: str) -> RedirectResponse:
    from urllib.parse import quote

    return RedirectResponse(f"/dashboard/jobs?error={quote(message[:300])}", status_code=303)


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, principal: browser.SignedInDep) -> Response:
    job = owned_job(session, job_id, principal.owner_id)
    if job is None:
        return not_found_page(request, "job")
    report = views.report_or_none(job)
    recent, _ = paging.list_jobs(session, principal.owner_id, limit=50, kind=JobKind.TRAIN)
    others = [views.job_row(j) for j in recent if j.id != job.id]
    return page(
        request,
        "job.html",
        {
            "job": job,
            "row": views.job_row(job),
            "report": report,
            "summary": views.summary_rows(job, report),
            "sweep": views.sweep_view(job),  # a finished sweep's settings (templates/kinds/sweep.html)
            "spec_json": json.dumps(job.spec, indent=2),
            "others": others,
            "downloads": views.downloads(session, job, principal.owner_id),
            "warnings": jobs_service.job_warnings(job),
            "mlflow_run": ((job.result or {}).get("mlflow") or {}).get("run_id") and (job.result or {})["mlflow"],
            "page_data": {
                "id": job.id,
                "kind": job.kind,
                "status": job.status,
                "steps": (job.spec or {}).get("steps"),
                "seeds": (job.spec or {}).get("seeds") or [],
                "terminal": job.status in TERMINAL,
                "terminal_statuses": sorted(TERMINAL),
            },
        },
    )


@router.post("/jobs/{job_id}/repair")
def repair_audited_model(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: browser.SignedInDep,
    form_key: Annotated[str | None, Form(max_length=64)] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    """ "Repair" on an audit: the audited model, data, attribute and seed, default method."""
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    job = owned_job(session, job_id, principal.owner_id)
    if job is None or (audited := repair.of_audit(job)) is None:
        return not_found_page(request, "audit job")
    try:
        body = RepairJobCreate(kind="repair", tags={"source": "dashboard", "audit_job": job.id}, spec=audited)
        created = jobs_service.submit_once(session, body, principal, settings, idempotency_key=form_key)
    except ValueError:
        return jobs_error("This audit's model cannot be repaired.")
    except ApiError as exc:
        return jobs_error(exc.message)
    return RedirectResponse(f"/dashboard/jobs/{json.loads(created.body)['id']}", status_code=303)


@router.get("/checkpoints/{checkpoint_id}/file")
def download_checkpoint(
    checkpoint_id: str, request: Request, session: SessionDep, principal: browser.SignedInDep
) -> Response:
    """A checkpoint file for the signed-in browser (e.g. a repaired model from its job's page)."""
    checkpoint = files_repo.get_checkpoint(session, checkpoint_id, owner_id=principal.owner_id)
    if checkpoint is None:
        return not_found_page(request, "checkpoint")
    suffix = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}.get(checkpoint.format, "")
    try:
        return stored_file(
            get_settings(), checkpoint.path, media_type="application/octet-stream", filename=f"{checkpoint.id}{suffix}"
        )
    except FileNotFoundError:
        return not_found_page(request, "checkpoint")


@router.post("/jobs/{job_id}/cancel")
def cancel(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: browser.SignedInDep,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    job = owned_job(session, job_id, principal.owner_id)
    if job is None:
        return not_found_page(request, "job")
    with contextlib.suppress(ApiError):  # already finished: the page shows how it ended
        jobs_service.cancel(session, job)
    return RedirectResponse(f"/dashboard/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/events")
def job_events(job_id: str, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """The API's event stream (status, progress, metrics), for a signed-in browser."""
    principal = browser.require_principal(request, session)
    events = job_streams.follow(session, job_id, principal, request.is_disconnected)
    # Proxies must pass events through as they come.
    return open_stream(
        principal.owner_id,
        settings,
        events,
        "text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/report")
def report_page(job_id: str, request: Request, session: SessionDep, principal: browser.SignedInDep) -> Response:
    """The report in the dashboard's frame (navigation, style), with the job's files to download."""
    job = owned_job(session, job_id, principal.owner_id)
    if job is None:
        return not_found_page(request, "job")
    try:
        title, body = jobs_service.report_body(session, job)
    except ApiError as exc:
        return page(request, "message.html", {"title": "No report", "message": exc.message}, exc.status)
    return page(
        request,
        "report.html",
        {"job": job, "title": title, "body": body, "downloads": views.downloads(session, job, principal.owner_id)},
    )


@router.get("/jobs/{job_id}/artifacts/{name}")
def download_artifact(
    job_id: str, name: str, request: Request, session: SessionDep, principal: browser.SignedInDep
) -> Response:
    """One of the job's artifacts (a plot, a JSON report) for the signed-in browser."""
    job = owned_job(session, job_id, principal.owner_id)
    artifact = files_repo.get_artifact(session, job.id, name) if job is not None else None
    if artifact is None:
        return not_found_page(request, "artifact")
    try:
        response = stored_file(get_settings(), artifact.path, media_type=artifact.media_type, filename=artifact.name)
    except FileNotFoundError:
        return not_found_page(request, "artifact")
    response.headers.update(SECURITY_HEADERS)
    return response


@router.get("/compare")
def compare_page(
    request: Request, session: SessionDep, principal: browser.SignedInDep, a: str | None = None, b: str | None = None
) -> Response:
    recent, _ = paging.list_jobs(session, principal.owner_id, limit=100)
    choices = [views.job_row(j) for j in recent]
    sides: list[dict[str, Any]] = []
    for label, job_id in (("A", a), ("B", b)):
        job = owned_job(session, job_id, principal.owner_id) if job_id else None
        if job_id and job is None:
            return not_found_page(request, f"job {job_id!r}")
        if job is not None:
            report = views.report_or_none(job)
            sides.append(
                {
                    "label": label,
                    "job": job,
                    "row": views.job_row(job),
                    "report": report,
                    "summary": views.summary_rows(job, report),
                    "plots": views.plot_images(session, job, report),
                }
            )
    labels: list[str] = []
    for side in sides:
        labels += [label for label, _ in side["summary"] if label not in labels]
    table = [(label, [dict(side["summary"]).get(label) for side in sides]) for label in labels]
    return page(
        request,
        "compare.html",
        {
            "choices": choices,
            "a": a,
            "b": b,
            "sides": sides,
            "table": table,
            "page_data": {
                "jobs": [
                    {"id": s["job"].id, "label": s["label"], "steps": (s["job"].spec or {}).get("steps")} for s in sides
                ]
            },
        },
    )


# ---- static files --------------------------------------------------------------------------


@router.get("/keys")
def keys_page(request: Request, session: SessionDep, principal: browser.SignedInDep) -> Response:
    """API keys: the admin sees and issues every key; a key sees itself. Either may revoke what it may manage."""
    return render_keys(request, session, principal)


def render_keys(request: Request, session: Session, principal: Any, created: dict[str, Any] | None = None) -> Response:
    rows = auth_repo.list_keys(session, limit=500, only_id=None if principal.is_admin else principal.owner_id)
    return page(
        request,
        "keys.html",
        {"keys": rows, "is_admin": principal.is_admin, "created": created, "own_id": principal.owner_id},
    )


@router.post("/keys")
def create_key(
    request: Request,
    session: SessionDep,
    principal: browser.SignedInDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    if not principal.is_admin:
        return page(request, "message.html", {"title": "Refused", "message": "Only the admin issues keys."}, 403)
    key, secret = auth_repo.issue_key(session, name=name)
    session.commit()
    # The secrets are shown on this one response, never again (a reload re-posts nothing: no-store).
    return render_keys(
        request,
        session,
        principal,
        created={"id": key.id, "name": key.name, "key": secret, "webhook_secret": key.webhook_secret},
    )


@router.post("/keys/{key_id}/revoke")
def revoke_key(
    key_id: str,
    request: Request,
    session: SessionDep,
    principal: browser.SignedInDep,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    if not browser.csrf_ok(request, csrf):
        return expired_form(request)
    if not may_manage(principal, key_id) or auth_repo.revoke(session, key_id) is None:
        return not_found_page(request, "API key")
    # Revoking the key this browser signed in with ends the session: the next page asks to sign in.
    return RedirectResponse("/dashboard/keys", status_code=303)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response(status_code=404)
    response = FileResponse(HERE / "static" / name, media_type=STATIC[name])
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response
