"""A toy job kind, whole: what a new kind writes (its spec, resolution, summary, worker body and result model), and
nothing else. `register()` adds it to both registries; tests/e2e/test_a_new_kind.py runs it in a real stack by
importing this module first in every process (a sitecustomize on PYTHONPATH), as an installed kind would be."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.checks import invalid_spec
from api.kinds.base import Submission, reliance_report_body
from api.schemas import JobCreateFields, JobOutFields, JobSummary
from models.tables import Job
from worker.context import JobContext

KIND = "toy"
MAX_NUMBERS = 100


# ---- the API's side (what api/kinds/toy.py would hold) ----


class ToySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    numbers: list[float] = Field(min_length=1, description="what to add up")
    malformed: bool = Field(False, description="return a result that does not match ToyResult")


class ToyResult(BaseModel):  # (results/toy.py)
    total: float
    count: int


class ToyJobCreate(JobCreateFields):
    kind: Literal["toy"]
    spec: ToySpec


class ToyJobOut(JobOutFields):
    kind: Literal["toy"]
    result: ToyResult | None


Create, Out = ToyJobCreate, ToyJobOut


def resolve(submission: Submission) -> dict[str, Any]:
    spec: ToySpec = submission.body.spec
    if len(spec.numbers) > MAX_NUMBERS:
        raise invalid_spec(f"{len(spec.numbers)} numbers; the limit is {MAX_NUMBERS}.", {"field": "spec.numbers"})
    return {**spec.model_dump(), "device": "cpu"}


def summary(job: Job) -> JobSummary:
    result = job.result or {}
    numbers = {"total": float(result["total"])} if "total" in result else {}
    return JobSummary(what=f"sum of {len(job.spec['numbers'])} numbers", on=None, numbers=numbers, verdict=None)


def reliance(job: Job) -> dict[str, Any] | None:
    return None


def report(job: Job) -> dict[str, Any] | None:
    return None


def warnings(job: Job) -> list[str]:
    return []


report_body = reliance_report_body


# ---- the worker's side (what worker/toy_job.py would hold) ----


class WorkerSide:
    Result = ToyResult

    @staticmethod
    def run(spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        ctx.say("info", f"adding {len(spec['numbers'])} numbers")
        ctx.on_progress(0.5)
        if spec["malformed"]:
            return {"total": "not a number"}
        return {"total": sum(spec["numbers"]), "count": len(spec["numbers"])}


def register() -> None:
    """The temporary registry entries: before api/job_bodies.py builds its unions from the API's registry."""
    import sys

    import api.kinds
    import worker.kinds

    api.kinds.KINDS[KIND] = sys.modules[__name__]  # type: ignore[assignment]
    worker.kinds.KINDS[KIND] = WorkerSide  # type: ignore[assignment]
