"""Repair jobs: a model's head (or whole network) refitted against a spurious attribute, audited before and after;
the spec, the checks at submission (each reading the checkpoint, train job and dataset once), the summary and the
report."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.checks import check_builtin_audit_data, check_probes_for_format, invalid_spec, usable_dataset
from api.errors import ApiError, coded_error
from api.kinds.audit import model_source
from api.kinds.base import PlotUrls, Submission
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
from models.tables import Checkpoint, Job, UserDataset
from results.repair import RepairMethodName, RepairResult
from starvation.audit import render_repair_body
from starvation.datasets import DATASETS
from starvation.datasets.user import train_and_test_splits
from starvation.errors import SpecError
from starvation.repair import RepairMethod, build_repair_method
from starvation.training.spec import DEVICE_PATTERN


class RepairMethodSpec(BaseModel):
    """A repair method and its parameters (starvation.repair.REPAIR_METHODS declares them)."""

    model_config = ConfigDict(extra="allow")
    name: RepairMethodName = Field(
        RepairMethodName("last_layer"),
        description="last_layer, last_layer_sd (head refits), finetune_sd (the whole "
        "network; TorchScript and safetensors checkpoints, train jobs' seeds; not ONNX)",
    )


class RepairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint_id: str | None = Field(None, max_length=64)
    train_job_id: str | None = Field(None, max_length=64)
    seed: Seed = Field(
        0, description="which seed of the train job; also the seed of the data, the validation part and the probes"
    )
    dataset: DatasetRef = Field(default_factory=lambda: DatasetRef(name="colored_mnist"))
    spurious_attribute: str = Field("color", min_length=1, max_length=200)
    method: RepairMethodSpec = Field(default_factory=RepairMethodSpec)
    layer: str | None = Field(
        None,
        max_length=200,
        pattern=LAYER_PATTERN,
        description="the feature layer (the head's input), by name; default: found automatically",
    )
    probes: Probes = None  # of the audits before and after
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    timeout_s: TimeoutSeconds | None = Field(None, description="the job fails with `timeout` after this long")


class RepairJobCreate(JobCreateFields):
    kind: Literal["repair"]
    spec: RepairSpec


class RepairJobOut(JobOutFields):
    kind: Literal[JobKind.REPAIR]
    result: RepairResult | None


Create, Out = RepairJobCreate, RepairJobOut


def resolve(submission: Submission) -> dict[str, Any]:
    """A repair spec checked against everything knowable now: the checkpoint (or the train job's seed) and its
    format, the dataset and its attribute, the method and its parameters. Each row is read once, here, and every
    check receives it."""
    session, owner_id, spec = submission.session, submission.owner_id, submission.body.spec
    if (spec.checkpoint_id is None) == (spec.train_job_id is None):
        raise invalid_spec("Give exactly one of checkpoint_id and train_job_id.")
    checkpoint = None
    if spec.checkpoint_id is not None:
        checkpoint = files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id)
        if checkpoint is None:
            raise invalid_spec(f"No checkpoint with id {spec.checkpoint_id!r}.", {"field": "spec.checkpoint_id"})
        if checkpoint.format not in ("torchscript", "safetensors", "onnx"):
            raise ApiError(
                422,
                "unsupported_format",
                f"Checkpoint {spec.checkpoint_id} is {checkpoint.format}: a repair rewrites a TorchScript, "
                "ONNX or safetensors model.",
                {"field": "spec.checkpoint_id"},
            )
        check_probes_for_format(spec.probes, checkpoint.format)
    else:
        check_train_job_seed(session, spec, owner_id)
    name = spec.dataset.name
    row = usable_dataset(session, name, owner_id)
    if name in DATASETS and not DATASETS[name].ATTRIBUTES:
        raise ApiError(
            422,
            "no_attribute",
            f"Dataset {name!r} has no spurious attribute, so there is nothing to repair against: a "
            "repair needs the attribute to balance and to measure reliance.",
            {"field": "spec.dataset"},
        )
    check_builtin_audit_data(name, spec.dataset.params, spec.spurious_attribute)
    check_separate_test_split(name, row)
    try:
        method = build_repair_method(spec.method.model_dump())
    except SpecError as exc:
        raise coded_error(exc) from None
    if method.WHOLE_NETWORK:
        check_trainable(spec, method, checkpoint, row)
    elif checkpoint is not None:
        check_head_rewritable(checkpoint)
    return {**spec.model_dump(), "method": method.resolved()}


def check_train_job_seed(session: Session, spec: RepairSpec, owner_id: str) -> None:
    """The train job has succeeded and saved a network of the spec's seed."""
    train_job = jobs_repo.get(session, spec.train_job_id, owner_id=owner_id) if spec.train_job_id else None
    if train_job is None or train_job.kind != JobKind.TRAIN:
        raise invalid_spec(f"No train job with id {spec.train_job_id!r}.", {"field": "spec.train_job_id"})
    if train_job.status != JobStatus.SUCCEEDED:
        raise invalid_spec(
            f"Train job {spec.train_job_id} is {train_job.status}, not succeeded.", {"field": "spec.train_job_id"}
        )
    checkpoints = files_repo.checkpoints_of_job(session, train_job.id)
    seeds = [c.seed for c in checkpoints if c.format == "safetensors" and c.seed is not None]
    if spec.seed not in seeds:
        raise invalid_spec(
            f"Train job {spec.train_job_id} has no checkpoint of seed {spec.seed} (its seeds: {sorted(set(seeds))}).",
            {"field": "spec.seed"},
        )


def check_head_rewritable(checkpoint: Checkpoint) -> None:
    """A head refit writes into the head its upload check found in the graph: none, a tied one or one computed at
    run time is refused now, with the reason that check gave (uploads from before it recorded none are tried)."""
    head = (checkpoint.model_info or {}).get("head")
    if checkpoint.format in ("torchscript", "onnx") and isinstance(head, dict) and not head.get("repairable"):
        instead = " Use finetune_sd, which retrains the whole network." if checkpoint.format == "torchscript" else ""
        raise ApiError(
            422,
            "no_linear_head",
            f"Checkpoint {checkpoint.id} has no head that a refit can rewrite: "
            f"{head.get('not_repairable_because') or 'no linear map makes its output'}.{instead}",
            {"field": "spec.checkpoint_id"},
        )


def check_trainable(
    spec: RepairSpec, method: RepairMethod, checkpoint: Checkpoint | None, row: UserDataset | None
) -> None:
    """A whole-network repair trains our own networks (safetensors checkpoints, train jobs' seeds) and TorchScript
    programs (in their jail, from data in memory), not ONNX graphs; an image folder only in minibatches."""
    if checkpoint is not None and checkpoint.format == "onnx":
        raise ApiError(
            422,
            "unsupported_format",
            f"{method.NAME} trains the whole network; checkpoint {spec.checkpoint_id} is an ONNX graph, "
            "which this service runs but does not train: use last_layer or last_layer_sd.",
            {"field": "spec.checkpoint_id"},
        )
    if row is not None and row.format == "image_folder":
        if checkpoint is not None and checkpoint.format == "torchscript":
            raise ApiError(
                422,
                "unsupported_format",
                f"{method.NAME} trains a TorchScript model in its jail, which cannot read an image folder: "
                "use last_layer or last_layer_sd, or a checkpoint of our own networks.",
                {"field": "spec.checkpoint_id"},
            )
        if not method.params["batch_size"]:
            raise invalid_spec(
                f"Dataset {spec.dataset.name!r} is an image folder, read in minibatches: set method.batch_size.",
                {"field": "spec.method.batch_size"},
            )


def check_separate_test_split(name: str, row: UserDataset | None) -> None:
    """A repair fits and chooses on the training splits only; a registered dataset whose test split
    is also its training data (no `split` column, or no split named train*) cannot be repaired on."""
    splits = list(((row.info or {}).get("splits") or {}) if row is not None else {})
    if splits:
        train, test = train_and_test_splits(splits)
        if test in train:
            raise ApiError(
                422,
                "no_test_split",
                f"Dataset {name!r} has no test split apart from its training data (splits: {splits}); "
                "a repair fits on splits named train* and audits on a separate 'test' split.",
                {"field": "spec.dataset"},
            )


def summary(job: Job) -> JobSummary:
    """The repaired model's numbers (`after`), with the reliance score before for comparison."""
    spec, result = job.spec or {}, job.result or {}
    before, after = result.get("before") or {}, result.get("after") or {}
    method = (result.get("method") or spec.get("method") or {}).get("name")
    return JobSummary(
        what=f"{model_source(spec)}, {method}",
        on=(spec.get("dataset") or {}).get("name"),
        numbers=numbers(
            reliance_score=after.get("reliance_score"),
            reliance_score_before=before.get("reliance_score"),
            worst_group_accuracy=after.get("worst_group_accuracy"),
            average_accuracy=after.get("average_accuracy"),
        ),
        verdict=after.get("verdict"),
    )


def reliance(job: Job) -> dict[str, Any] | None:
    """The repaired model's."""
    return (job.result or {}).get("after")


def report(job: Job) -> dict[str, Any] | None:
    """The audits before and after, and what the repair did."""
    if job.status != JobStatus.SUCCEEDED:
        return None
    result = job.result or {}
    return {**result["reports"], "repair": result["repair"]}


def warnings(job: Job) -> list[str]:
    return []


def report_body(job: Job, report: dict[str, Any], plot_urls: PlotUrls) -> tuple[str, str]:
    plots = [*report["before"].get("plots", []), *report["after"].get("plots", [])]
    body = render_repair_body(report["before"], report["after"], report["repair"], plot_urls(plots))
    return f"Repair report: job {job.id}", body


def of_audit(job: Job) -> dict[str, Any] | None:
    """The spec of a repair of what an audit job audited (its model, data, attribute, seed; the default method):
    the dashboard's "Repair" button. None for a job that is not an audit."""
    if job.kind != JobKind.AUDIT:
        return None
    keys = ("checkpoint_id", "train_job_id", "dataset", "spurious_attribute", "seed", "probes", "layer")
    return {key: job.spec.get(key) for key in keys if job.spec.get(key) is not None}
