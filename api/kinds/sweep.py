"""Sweep jobs: a train spec and a grid over it, trained as one job; the spec, the result, the checks at submission
(the model count and each stack's memory), the summary (the chosen setting's) and the report."""

from __future__ import annotations

from math import prod
from typing import Annotated, Any, Literal

from pydantic import Field

from api.checks import check_memory_budget, invalid_spec, usable_dataset
from api.errors import coded_error
from api.kinds import train
from api.kinds.base import Submission, reliance_report_body
from api.kinds.train import TrainSpec
from api.schemas import JobCreateFields, JobOutFields, JobSummary
from core.settings import Settings
from models.kinds import JobKind
from models.tables import Job
from results.sweep import SelectionRule, SweepResult
from starvation.errors import SpecError
from starvation.training import spec_warnings
from starvation.training.sweep import MAX_SETTINGS, SELECTIONS, resolve_sweep_spec, stacks
from starvation.training.sweep import MAX_VALUES as MAX_GRID_VALUES

GridValue = Annotated[
    int | float | list[int | float],
    Field(description="a number, or a list: one per class (sd_gamma), or the network's widths (model.hidden)"),
]


class SweepSpec(TrainSpec):
    """A train spec and a grid over its method's, optimizer's and network's parameters; every setting x every seed trains,
    as one job. The spec's other fields apply to every setting."""

    grid: dict[str, Annotated[list[GridValue], Field(min_length=1, max_length=MAX_GRID_VALUES)]] = Field(
        description="'method.<parameter>', 'optimizer.lr' or 'model.<parameter>' (the arch's: hidden, channels, ...) "
        "-> the values to try; the settings are every combination "
        f"(at most {MAX_SETTINGS})",
        min_length=1,
    )
    selection: SelectionRule = Field(
        SelectionRule("train_domain_validation"),
        description="; ".join(f"{name}: {meaning}" for name, meaning in SELECTIONS.items()),
    )


class SweepJobCreate(JobCreateFields):
    kind: Literal["sweep"]
    spec: SweepSpec


class SweepJobOut(JobOutFields):
    kind: Literal[JobKind.SWEEP]
    result: SweepResult | None


Create, Out = SweepJobCreate, SweepJobOut


def resolve(submission: Submission) -> dict[str, Any]:
    body: SweepJobCreate = submission.body
    given = body.spec.model_dump(exclude_unset=True)  # not JSON mode: that would make a NaN null, i.e. a default
    fields = train.service_fields(given)
    if "mlflow" in fields:
        raise invalid_spec(
            "A sweep does not export to MLflow (yet); train its chosen setting with mlflow.", {"field": "spec.mlflow"}
        )
    if "selection" in given:
        given["selection"] = str(given["selection"])
    spec, resolved = resolve_sweep(given, submission.settings, train.owned_datasets(submission))
    spec |= fields
    # The sweep saves and frees each stack as it ends: it holds the data once and one stack's networks at a time.
    # Stacks may differ in shape (a grid over model.*): each is checked with its own network.
    row = usable_dataset(submission.session, spec["dataset"]["name"], submission.owner_id)
    for group in stacks(resolved["settings"]):
        network = resolved["settings"][group[0]]["spec"]["model"]
        check_memory_budget({**spec, "model": network}, submission.settings, row, sweep_stack=len(group))
    if "init_checkpoint_id" in spec:  # every setting starts from it, as a train job does
        train.check_initial_weights(submission.session, spec, submission.owner_id)
    return spec


def resolve_sweep(spec: dict[str, Any], settings: Settings, user_datasets: list[str]) -> tuple[dict[str, Any], dict]:
    """(the spec to store: the resolved train spec with its grid and rule, the resolved sweep); 422 naming the field.
    A sweep trains settings x seeds models: at most `max_sweep_models` (GS_MAX_SWEEP_MODELS)."""

    try:
        resolved = resolve_sweep_spec(spec, user_datasets=user_datasets)
    except SpecError as exc:
        raise coded_error(exc) from None
    base = resolved["base"]
    if base["steps"] > settings.max_steps:
        raise invalid_spec(f"steps is {base['steps']}; the limit is {settings.max_steps}.", {"field": "spec.steps"})
    models = len(resolved["settings"]) * len(base["seeds"])
    if models > settings.max_sweep_models:
        raise invalid_spec(
            f"the sweep trains {len(resolved['settings'])} settings x {len(base['seeds'])} seeds = "
            f"{models} models; the limit is {settings.max_sweep_models}.",
            {"field": "spec.grid"},
        )
    return {**base, "grid": resolved["grid"], "selection": resolved["selection"]}, resolved


def summary(job: Job) -> JobSummary:
    """The chosen setting's test scores stand for the sweep's."""
    result = job.result or {}
    settings = result.get("settings") or []
    chosen = settings[result["chosen"]] if settings else {}
    size = f"sweep of {setting_count(job.spec or {})} settings"
    return train.training_summary(job, {"splits": {"test": chosen.get("test") or {}}}, size=size)


def setting_count(spec: dict[str, Any]) -> int:
    """How many settings a sweep spec's grid makes (known before the result is)."""
    return prod(len(values) for values in (spec.get("grid") or {}).values())


report, reliance = train.report, train.reliance


def warnings(job: Job) -> list[str]:
    return spec_warnings(job.spec)


report_body = reliance_report_body
