"""Train jobs: the spec (the engine's fields, from its declarations, and the service's), the result, the checks at
submission, the summary and the report of an audited train job."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from sqlalchemy.orm import Session

from api.checks import check_memory_budget, invalid_spec, usable_dataset
from api.errors import coded_error
from api.kinds.base import Submission, reliance_report_body
from api.schemas import JobCreateFields, JobOutFields, JobSummary, TimeoutSeconds
from core.settings import Settings
from models import files as files_repo
from models.kinds import SERVICE_FIELDS, JobKind
from models.tables import Job
from results.train import TrainResult
from starvation.errors import SpecError
from starvation.training import resolve_train_spec, spec_warnings
from starvation.training.spec import field_schemas as train_spec_fields

# The spec's fields the service acts on; the rest is the engine's, resolved at submission.


class MlflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str = Field(min_length=1, max_length=2000, description="http(s) URL of an MLflow server")
    experiment: str = Field(min_length=1, max_length=500)


class TrainServiceFields(BaseModel):
    """The fields of a train spec that the service acts on; the engine's fields are added from its schema."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: TimeoutSeconds | None = Field(None, description="the job fails with `timeout` after this long")
    mlflow: MlflowSpec | None = Field(None, description="mirror params, metric history and report to MLflow")
    init_checkpoint_id: str | None = Field(
        None,
        max_length=64,
        description="start every seed from this uploaded safetensors checkpoint of the same "
        "arch (torchvision's key names are taken for resnet18/50): the backbone strictly, the head where its shape "
        "fits the task (else a fresh head: an ImageNet network fine-tuned to this dataset's classes)",
    )


def _engine_field(schema: dict[str, Any]) -> tuple[Any, Any]:
    """A field the engine checks (once, at submission: a 422 `invalid_spec` naming it), documented by the engine's
    own JSON Schema, whose default is what a job runs with when neither the spec nor its preset sets it (FastAPI
    leaves a null default out of /openapi.json: a field shown without one runs with null). A section's default (an
    object: the variant chosen, e.g. {"arch": "mlp"}) is `x-default`, and said in words: client generators refuse
    an object default on a union of objects (openapi-python-client drops the whole body, and POST /v1/jobs)."""
    default = schema.get("default")
    shown = {k: v for k, v in schema.items() if k != "default"}
    if isinstance(default, dict):
        chosen = ", ".join(f"{key} {value}" for key, value in default.items())
        said = "; ".join(filter(None, [shown.get("description"), f"default: {chosen}, with its parameters' defaults"]))
        shown |= {"x-default": default, "description": said}
        return Annotated[Any, WithJsonSchema(shown)], Field(None)
    return Annotated[Any, WithJsonSchema(shown)], Field(None, json_schema_extra={"default": default})


# Fields given here override the preset's. Built from the engine's declarations (starvation/training/spec.py).
ENGINE_FIELDS: dict[str, Any] = {name: _engine_field(schema) for name, schema in train_spec_fields().items()}
TrainSpec = create_model(
    "TrainSpec",
    __base__=TrainServiceFields,
    __doc__="A train spec: fields given here override the preset's.",
    **ENGINE_FIELDS,
)


class TrainJobCreate(JobCreateFields):
    kind: Literal["train"]
    spec: TrainSpec = Field(default_factory=TrainSpec)


class TrainJobOut(JobOutFields):
    kind: Literal[JobKind.TRAIN]
    result: TrainResult | None


Create, Out = TrainJobCreate, TrainJobOut


def service_fields(given: dict[str, Any]) -> dict[str, Any]:
    """Pops the service's fields out of a given spec (the service's business, kept beside the resolved spec)."""
    return {k: given.pop(k) for k in SERVICE_FIELDS if given.get(k) is not None}


def owned_datasets(submission: Submission) -> list[str]:
    return [d.id for d in files_repo.list_datasets(submission.session, owner_id=submission.owner_id)]


def resolve(submission: Submission) -> dict[str, Any]:
    body: TrainJobCreate = submission.body
    given = body.spec.model_dump(exclude_unset=True)  # not JSON mode: that would make a NaN null, i.e. a default
    fields = service_fields(given)
    spec = resolve_train(given, submission.settings, owned_datasets(submission)) | fields
    row = usable_dataset(submission.session, spec["dataset"]["name"], submission.owner_id)
    check_memory_budget(spec, submission.settings, row)
    if "init_checkpoint_id" in spec:
        check_initial_weights(submission.session, spec, submission.owner_id)
    return spec


def resolve_train(spec: dict[str, Any], settings: Settings, user_datasets: list[str]) -> dict[str, Any]:
    try:
        resolved = resolve_train_spec(spec, user_datasets=user_datasets)
    except SpecError as exc:
        raise coded_error(exc) from None
    if resolved["steps"] > settings.max_steps:
        raise invalid_spec(f"steps is {resolved['steps']}; the limit is {settings.max_steps}.")
    if len(resolved["seeds"]) > settings.max_seeds:
        raise invalid_spec(f"{len(resolved['seeds'])} seeds; the limit is {settings.max_seeds}.")
    return resolved


def check_initial_weights(session: Session, spec: dict[str, Any], owner_id: str) -> None:
    """`init_checkpoint_id` names the owner's safetensors checkpoint of the spec's arch (their shapes are checked
    against the network when the job builds it)."""
    field = {"field": "spec.init_checkpoint_id"}
    row = files_repo.get_checkpoint(session, spec["init_checkpoint_id"], owner_id=owner_id)
    if row is None:
        raise invalid_spec(f"No checkpoint {spec['init_checkpoint_id']!r} to start from.", field)
    if row.format != "safetensors":
        raise invalid_spec(
            f"Initial weights come from a safetensors checkpoint (a state dict); this one is {row.format}.", field
        )
    arch = (row.model_info or {}).get("arch")
    if arch != spec["model"]["arch"]:
        raise invalid_spec(
            f"The checkpoint holds weights of arch {arch!r}; the spec trains {spec['model']['arch']!r}.", field
        )


def summary(job: Job) -> JobSummary:
    return training_summary(job, job.result or {})


def training_summary(job: Job, result: dict[str, Any], size: str | None = None) -> JobSummary:
    """A train job's (or, with `size` and the chosen setting's `result`, a sweep's) summary: the preset or method,
    the length and seeds, the test accuracy and the reliance its audit measured."""
    spec = job.spec or {}
    name = spec.get("preset") or (spec.get("method") or {}).get("name") or job.kind
    seeds = ", ".join(map(str, spec.get("seeds") or []))
    test = ((result.get("splits") or {}).get("test") or {}).get("accuracy")
    measured = reliance(job) or {}
    return JobSummary(
        what=f"{name}{f' {size}' if size else ''}, {spec.get('steps')} steps, seeds {seeds}",
        on=(spec.get("dataset") or {}).get("name"),
        numbers=numbers(test_accuracy=test, reliance_score=measured.get("reliance_score")),
        verdict=measured.get("verdict"),
    )


def reliance(job: Job) -> dict[str, Any] | None:
    """The reliance pooled over seeds, when the job was audited (`audit: true`)."""
    return ((job.result or {}).get("audit") or {}).get("summary")


def numbers(**values: Any) -> dict[str, float]:
    """Headline numbers: a {"mean", "std"} over seeds counts by its mean; absent ones are left out."""
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            value = value.get("mean")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def report(job: Job) -> dict[str, Any] | None:
    """The first seed's report of an audited job, with every seed's and the reliance pooled over seeds."""
    result = job.result or {}
    reports = (result.get("audit") or {}).get("reports")
    if not reports:
        return None
    return {**reports[0], "per_seed": reports, "pooled_summary": result["audit"].get("summary")}


def warnings(job: Job) -> list[str]:
    return spec_warnings(job.spec)


report_body = reliance_report_body
