"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from api.deps import AuthorizationDep, SessionDep, SettingsDep, admin_principal, current_principal
from api.responses import error_responses, media_response
from api.schemas import Readiness
from core.queue import QUEUES, check_broker
from models.db import database
from models.kinds import JobKind
from models.status import JobStatus
from models.tables import Job, utcnow

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses=error_responses(422))
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "The database or the broker is unreachable."},
        **error_responses(422),
    },
)
def readyz() -> JSONResponse:
    checks = {}
    try:
        with database().session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        check_broker()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


# Upper bounds of the job duration histogram, in seconds: a smoke test to a day-long GPU run.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, 24 * 3600)


def job_metric_families(session: Session, now: datetime) -> list[Metric]:
    """The service's state as Prometheus families, read from the jobs table (the truth)."""
    counts: dict[tuple[str, str], int] = {
        (kind.value, status): 0 for kind in JobKind for status in JobStatus
    }  # zeros too: every series exists
    for kind, status, count in session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    ):
        counts[(kind, status)] = count
    jobs = GaugeMetricFamily("gs_jobs", "Jobs by kind and status.", labels=["kind", "status"])
    for (kind, status), count in sorted(counts.items()):
        jobs.add_metric([kind, status], count)

    depth = {name: 0 for name in QUEUES}
    for queue, count in session.execute(
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    ):
        depth[queue] = count
    queue_depth = GaugeMetricFamily("gs_queue_depth", "Queued jobs waiting for a worker.", labels=["queue"])
    for queue, count in sorted(depth.items()):
        queue_depth.add_metric([queue], count)

    families: list[Metric] = [jobs, queue_depth, duration_histogram(session)]
    newest, oldest = session.execute(
        select(func.max(Job.heartbeat_at), func.min(Job.heartbeat_at)).where(Job.status == JobStatus.RUNNING)
    ).one()
    # Only while a job runs: with none running there is no heartbeat to be late.
    if newest is not None and oldest is not None:
        families.append(
            GaugeMetricFamily(
                "gs_worker_heartbeat_age_seconds",
                "Seconds since the newest heartbeat of any running job.",
                value=max(0.0, (now - newest).total_seconds()),
            )
        )
        families.append(
            GaugeMetricFamily(
                "gs_running_job_heartbeat_max_age_seconds",
                "Seconds since the heartbeat of the most silent running job.",
                value=max(0.0, (now - oldest).total_seconds()),
            )
        )
    oldest_queued = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))
    families.append(
        GaugeMetricFamily(
            "gs_oldest_queued_job_age_seconds",
            "Seconds the oldest queued job has waited (0 when none).",
            value=max(0.0, (now - oldest_queued).total_seconds()) if oldest_queued is not None else 0.0,
        )
    )
    return families


def duration_histogram(session: Session) -> HistogramMetricFamily:
    """Run time (started_at to finished_at) of finished jobs, by kind and final status."""
    durations: dict[tuple[str, str], list[float]] = {}
    rows = session.execute(
        select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
            Job.started_at.is_not(None), Job.finished_at.is_not(None)
        )
    )
    for kind, status, started_at, finished_at in rows:
        if started_at is None or finished_at is None:  # (the query leaves none out: for the type checker)
            continue
        durations.setdefault((kind, status), []).append(max(0.0, (finished_at - started_at).total_seconds()))
    family = HistogramMetricFamily(
        "gs_job_duration_seconds", "Run time of finished jobs, from start to finish.", labels=["kind", "status"]
    )
    for (kind, status), values in sorted(durations.items()):
        buckets = [(str(float(bound)), sum(v <= bound for v in values)) for bound in DURATION_BUCKETS_S]
        family.add_metric([kind, status], buckets + [("+Inf", len(values))], sum_value=sum(values))
    return family


@dataclass
class Families:
    """What `generate_latest` needs: something with collect()."""

    items: list[Metric]

    def collect(self) -> list[Metric]:
        return self.items


def metrics_reader(session: SessionDep, settings: SettingsDep, authorization: AuthorizationDep) -> None:
    """The admin's to read (the counts span every tenant), unless GS_METRICS_PUBLIC admits any scraper."""
    if not settings.metrics_public:
        admin_principal(current_principal(session, authorization))


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_reader)],
    responses={**media_response("Prometheus text format.", "text/plain"), **error_responses(401, 403, 422, 503)},
)
def prometheus_metrics() -> Response:
    with database().session() as session:
        families = job_metric_families(session, utcnow())
    # The API process's own CPU, memory and GC figures come from the default registry.
    families += list(REGISTRY.collect())
    return Response(generate_latest(Families(families)), media_type=CONTENT_TYPE_LATEST)
