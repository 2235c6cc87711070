"""Request and response shapes of API.md, as pydantic models (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, WithJsonSchema

from models.kinds import JobKind
from models.status import JobStatus
from results.report import Verdict
from starvation.audit.probes import PROBES
from starvation.training.spec import MAX_SEED

# A submodule (dotted, e.g. "features.3") or an ONNX tensor name ("/fc1/Gemm_output_0", "onnx::Relu_5").
LAYER_PATTERN = r"^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*$"
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
# Celery's time limit becomes an OS alarm: a bound it can arm (30 days).
TimeoutSeconds = Annotated[int, Field(gt=0, le=30 * 24 * 3600)]
# A multipart file field. `format: binary` is what client generators read as "send a file" (FastAPI writes only
# contentMediaType, and openapi-python-client then sends the field as text).
BinaryUpload = Annotated[
    UploadFile, WithJsonSchema({"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"})
]


# The audit's probes and the repair methods by name, from the engine's registries (an enum in the document, so a
# typo is a 422 naming the field and client generators offer the names).
ProbeName = StrEnum("ProbeName", {name.upper(): name for name in PROBES})  # type: ignore[misc]  # names from a registry
Probes = Annotated[
    list[ProbeName] | None, Field(description="probes to run; default: every probe the dataset supports")
]


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="built-in name or a registered dataset id")
    params: dict[str, Any] = Field(default_factory=dict)


class JobCreateFields(BaseModel):
    """What every kind of job takes besides its kind and spec."""

    model_config = ConfigDict(extra="forbid")
    if TYPE_CHECKING:  # each kind's body declares its own `kind: Literal[...]`
        kind: str
    tags: dict[str, str] = Field(default_factory=dict)
    callback_url: HttpUrl | None = None


# ---- Repair jobs (API.md, "Repair spec"); kept in one block of their own ----


# ---- end of repair jobs ----


# ---- Sweep jobs (API.md, "Sweep spec") ----


# ---- end of sweep jobs ----


class MetricOut(BaseModel):
    step: int
    name: str
    value: float
    seed: int | None
    split: str | None


class MetricPage(BaseModel):
    items: list[MetricOut]
    next_cursor: str | None


class LogLine(BaseModel):
    at: datetime
    level: Literal["info", "warning", "error"]
    message: str


class LogPage(BaseModel):
    items: list[LogLine]
    next_cursor: str | None


class CheckpointOut(BaseModel):
    id: str
    format: str
    sha256: str
    size_bytes: int
    created_at: datetime
    job_id: str | None = None
    seed: int | None = None
    model_info: dict[str, Any] = Field(default_factory=dict)
    parent_checkpoint_id: str | None = Field(None, description="the checkpoint a repair job made this one from")


class CheckpointPage(BaseModel):
    items: list[CheckpointOut]
    next_cursor: str | None


class ArtifactOut(BaseModel):
    name: str
    media_type: str
    size_bytes: int
    url: str


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    key: str | None = Field(description="the secret; shown once (null when an Idempotency-Key replays the creation)")
    webhook_secret: str | None = Field(
        None, description="HMAC key of this key's job webhooks (X-GS-Signature); shown once"
    )
    created_at: datetime


class ApiKeySummary(BaseModel):
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = Field(None, description="set once the key is revoked; it then authenticates nothing")


class ApiKeyPage(BaseModel):
    items: list[ApiKeySummary]
    next_cursor: str | None


class DatasetOut(BaseModel):
    id: str | None = None
    name: str
    builtin: bool
    description: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    status: Literal["pending", "ready", "failed"] = Field(
        "ready",
        description="an image folder is `pending` while its rows and images are checked in the background, "
        "then `ready` (usable by jobs) or `failed` (`error` names the CSV line at fault)",
    )
    error: str | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]


class JobError(BaseModel):
    code: str
    message: str


class JobSummary(BaseModel):
    """The job in a few words and numbers, computed by the server from its spec and result (its kind's `summary`,
    api/kinds/), so that a client shows any kind without knowing it."""

    what: str = Field(description="what ran, e.g. `train sd, 1000 steps, seeds 0, 1`")
    on: str | None = Field(description="the dataset it ran on")
    numbers: dict[str, float] = Field(
        description="the headline numbers by name (test_accuracy, reliance_score, worst_group_accuracy, ...; a mean "
        "over seeds where there are several); empty until the job has them"
    )
    verdict: Verdict | None = Field(description="the reliance verdict, when the job measured one")


class JobOutFields(BaseModel):
    """What every job shows; `kind` tells the shape of `result`."""

    id: str
    status: JobStatus
    progress: float
    spec: dict[str, Any]
    tags: dict[str, str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    cancel_requested: bool
    worker_id: str | None = Field(None, description="host:pid of the worker process running it")
    error: JobError | None
    warnings: list[str] = Field(
        default_factory=list,
        description="what will likely not do what was meant (e.g. SD that never leaves its "
        "warm-up) or went wrong without failing the job (an MLflow export); the job's log has them too",
    )
    summary: JobSummary
    links: dict[str, str]


# ?status= and ?kind= of GET /v1/jobs: one of the enum's values (anything else is a 422), or empty for any.
StatusFilter = Annotated[JobStatus | None, BeforeValidator(lambda value: value or None)]
KindFilter = Annotated[JobKind | None, BeforeValidator(lambda value: value or None)]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description='"ok", or why the part is unreachable, by part (database, broker)')
