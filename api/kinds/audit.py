"""Audit jobs: a model (an uploaded checkpoint or a train job's seed) measured on a dataset; the spec, the checks
at submission, the summary and the report (the result itself)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.checks import check_builtin_audit_data, check_probes_for_format, invalid_spec, usable_dataset
from api.kinds.base import Submission, reliance_report_body
from api.kinds.train import numbers
from api.schemas import (
    LAYER_PATTERN,
    DatasetRef,
    JobCreateFields,
    JobOutFields,
    JobSummary,
    Probes,
    Seed,
    TimeoutSeconds,
)
from models import files as files_repo
from models import jobs as jobs_repo
from models.kinds import JobKind
from models.status import JobStatus
from models.tables import Job
from results.audit import AuditResult
from starvation.training.spec import DEVICE_PATTERN


class AuditSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint_id: str | None = None
    train_job_id: str | None = None
    dataset: DatasetRef = Field(default_factory=lambda: DatasetRef(name="colored_mnist"))
    spurious_attribute: str = "color"
    probes: Probes = None
    layer: str | None = Field(
        None, max_length=200, pattern=LAYER_PATTERN, description="penultimate layer for the linear probe, by name"
    )
    seed: Seed = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    timeout_s: TimeoutSeconds | None = Field(None, description="the job fails with `timeout` after this long")


class AuditJobCreate(JobCreateFields):
    kind: Literal["audit"]
    spec: AuditSpec


class AuditJobOut(JobOutFields):
    kind: Literal[JobKind.AUDIT]
    result: AuditResult | None


Create, Out = AuditJobCreate, AuditJobOut


def resolve(submission: Submission) -> dict[str, Any]:
    return resolve_audit(submission.session, submission.body, submission.owner_id)


def resolve_audit(session: Session, body: AuditJobCreate, owner_id: str) -> dict[str, Any]:
    spec = body.spec
    if (spec.checkpoint_id is None) == (spec.train_job_id is None):
        raise invalid_spec("Give exactly one of checkpoint_id and train_job_id.")
    if spec.checkpoint_id is not None:
        checkpoint = files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id)
        if checkpoint is None:
            raise invalid_spec(f"No checkpoint with id {spec.checkpoint_id!r}.")
        check_probes_for_format(spec.probes, checkpoint.format)
    elif spec.train_job_id is not None:
        train_job = jobs_repo.get(session, spec.train_job_id, owner_id=owner_id)
        if train_job is None or train_job.kind != JobKind.TRAIN:
            raise invalid_spec(f"No train job with id {spec.train_job_id!r}.")
        if train_job.status != JobStatus.SUCCEEDED:
            raise invalid_spec(f"Train job {spec.train_job_id} is {train_job.status}, not succeeded.")
    usable_dataset(session, spec.dataset.name, owner_id)
    check_builtin_audit_data(spec.dataset.name, spec.dataset.params, spec.spurious_attribute)
    return spec.model_dump()


def model_source(spec: dict[str, Any]) -> str:
    """The model an audit or a repair reads, and the data: `checkpoint <id> on <dataset>`."""
    if spec.get("checkpoint_id"):
        source = f"checkpoint {spec['checkpoint_id']}"
    else:
        source = f"train job {spec.get('train_job_id')} seed {spec.get('seed', 0)}"
    return f"{source} on {(spec.get('dataset') or {}).get('name', '?')}"


def summary(job: Job) -> JobSummary:
    spec, result = job.spec or {}, job.result or {}
    return JobSummary(
        what=model_source(spec),
        on=(spec.get("dataset") or {}).get("name"),
        numbers=reliance_numbers(result),
        verdict=(reliance(job) or {}).get("verdict"),
    )


def reliance(job: Job) -> dict[str, Any] | None:
    return (job.result or {}).get("summary")


def reliance_numbers(report: dict[str, Any]) -> dict[str, float]:
    return numbers(
        reliance_score=(report.get("summary") or {}).get("reliance_score"),
        average_accuracy=report.get("average_accuracy"),
        worst_group_accuracy=report.get("worst_group_accuracy"),
        flip_rate=(report.get("counterfactual") or {}).get("flip_rate"),
    )


def report(job: Job) -> dict[str, Any] | None:
    return job.result if job.status == JobStatus.SUCCEEDED else None


def warnings(job: Job) -> list[str]:
    return []


report_body = reliance_report_body
