"""What a job kind is to the API: a module with its request and response bodies, its submit-time resolution and
its summary (api/kinds/train.py is one). The registry (api/kinds/__init__.py) maps each JobKind to its module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from api.deps import Principal
from api.schemas import JobCreateFields, JobOutFields, JobSummary
from core.settings import Settings
from models.tables import Job
from starvation.audit import render_report_body

# Data URIs of the job's plots, by artifact name (the report page inlines them).
PlotUrls = Callable[[list[str]], dict[str, str]]


@dataclass(frozen=True)
class Submission:
    """One POST /v1/jobs as a kind's `resolve` receives it: the body and what it is checked against."""

    session: Session
    principal: Principal
    settings: Settings
    body: Any  # the kind's own `Create`

    @property
    def owner_id(self) -> str:
        return self.principal.owner_id


class KindModule(Protocol):
    """The module of one kind (a module satisfies this protocol with module-level names)."""

    @property
    def Create(self) -> type[JobCreateFields]:
        """POST /v1/jobs's body for this kind (`kind: Literal[...]`, `spec`)."""
        ...

    @property
    def Out(self) -> type[JobOutFields]:
        """The job as GET shows it (`kind`, `result: <the kind's result> | None`)."""
        ...

    def resolve(self, submission: Submission) -> dict[str, Any]:
        """The spec to store, checked against everything knowable at submission (a 4xx ApiError otherwise)."""
        ...

    def summary(self, job: Job) -> JobSummary:
        """What ran, on what, its headline numbers and verdict."""
        ...

    def reliance(self, job: Job) -> dict[str, Any] | None:
        """The reliance summary the job measured (reliance_score, verdict, interval, ...), or None."""
        ...

    def report(self, job: Job) -> dict[str, Any] | None:
        """GET /report's body, or None when the job has none."""
        ...

    def warnings(self, job: Job) -> list[str]:
        """What will likely not do what was meant, from the stored spec."""
        ...

    def report_body(self, job: Job, report: dict[str, Any], plot_urls: PlotUrls) -> tuple[str, str]:
        """The report page's title and its sections as HTML (api/jobs_service.py `report_body`)."""
        ...


def reliance_report_body(job: Job, report: dict[str, Any], plot_urls: PlotUrls) -> tuple[str, str]:
    """The `report_body` of a kind whose report is a reliance report (starvation.audit)."""
    title = f"Reliance report: {job.kind} job {job.id}"
    return title, render_report_body(report, plot_urls(report.get("plots", [])))
