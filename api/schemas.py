"""Request and response shapes of API.md, as pydantic models (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, TypeAdapter, WithJsonSchema, create_model

from models.status import JobStatus
from starvation.audit.probes import PROBES
from starvation.repair.methods import NOT_YET_AVAILABLE, REPAIR_METHODS
from starvation.training.spec import DEVICE_PATTERN, MAX_SEED
from starvation.training.spec import field_schemas as train_spec_fields
from starvation.training.sweep import MAX_SETTINGS, SELECTIONS
from starvation.training.sweep import MAX_VALUES as MAX_GRID_VALUES

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


class JobKind(StrEnum):
    """The kinds of job, as `kind` spells them (the job-creation bodies below, one per kind)."""

    TRAIN = "train"
    AUDIT = "audit"
    REPAIR = "repair"
    SWEEP = "sweep"


# The audit's probes and the repair methods by name, from the engine's registries (an enum in the document, so a
# typo is a 422 naming the field and client generators offer the names).
ProbeName = StrEnum("ProbeName", {name.upper(): name for name in PROBES})
RepairMethodName = StrEnum("RepairMethodName", {name.upper(): name for name in [*REPAIR_METHODS, *NOT_YET_AVAILABLE]})
Probes = Annotated[
    list[ProbeName] | None, Field(description="probes to run; default: every probe the dataset supports")
]


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="built-in name or a registered dataset id")
    params: dict[str, Any] = Field(default_factory=dict)


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
TrainSpec = create_model(
    "TrainSpec",
    __base__=TrainServiceFields,
    __doc__="A train spec: fields given here override the preset's.",
    **{name: _engine_field(schema) for name, schema in train_spec_fields().items()},
)


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


class JobCreateFields(BaseModel):
    """What every kind of job takes besides its kind and spec."""

    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str] = Field(default_factory=dict)
    callback_url: HttpUrl | None = None


class TrainJobCreate(JobCreateFields):
    kind: Literal["train"]
    spec: TrainSpec = Field(default_factory=TrainSpec)


class AuditJobCreate(JobCreateFields):
    kind: Literal["audit"]
    spec: AuditSpec


# ---- Repair jobs (API.md, "Repair spec"); kept in one block of their own ----


class RepairMethodSpec(BaseModel):
    """A repair method and its parameters (starvation.repair.REPAIR_METHODS declares them)."""

    model_config = ConfigDict(extra="allow")
    name: RepairMethodName = Field(
        RepairMethodName.LAST_LAYER,
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


# ---- end of repair jobs ----


# ---- Sweep jobs (API.md, "Sweep spec") ----

SelectionRule = StrEnum("SelectionRule", {name.upper(): name for name in SELECTIONS})
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
        SelectionRule.TRAIN_DOMAIN_VALIDATION,
        description="; ".join(f"{name}: {meaning}" for name, meaning in SELECTIONS.items()),
    )


class SweepJobCreate(JobCreateFields):
    kind: Literal["sweep"]
    spec: SweepSpec


# ---- end of sweep jobs ----


JobCreate = Annotated[TrainJobCreate | AuditJobCreate | RepairJobCreate | SweepJobCreate, Field(discriminator="kind")]


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


Interval = Annotated[
    list[float],
    Field(
        min_length=2, max_length=2, description="95% confidence interval [low, high] (see the report's `confidence`)"
    ),
]
Verdict = Literal["low", "partial", "high", "uncertain"]


class RelianceSummary(BaseModel):
    """reliance_score and verdict are null, with a reason, when the data cannot measure reliance
    (e.g. two_moons: no attribute can be changed and no test example conflicts with it)."""

    reliance_score: float | None = Field(ge=0, le=1)
    verdict: Verdict | None = Field(
        description="low / partial / high (API.md thresholds 0.1 and 0.5); `uncertain` "
        "when the score's interval spans a threshold"
    )
    basis: Literal["counterfactual", "groups"]
    reason: str | None = None
    interval: Interval | None = None
    possible_verdicts: list[Literal["low", "partial", "high"]] | None = Field(
        None, description="every verdict a score inside the interval would get; more than one means `uncertain`"
    )
    measure: str | None = Field(None, description="what the score measures, in words")
    direction: Literal["towards", "against"] | None = Field(
        None,
        description="counterfactual basis: whether the net flips follow the attribute's training association "
        "or go against it",
    )


class SeedReliance(BaseModel):
    seed: int | None
    reliance_score: float | None
    interval: Interval | None = None
    verdict: Verdict | None
    possible_verdicts: list[Literal["low", "partial", "high"]] | None = None


class PooledReliance(BaseModel):
    """A train job's reliance over its seeds: the mean score with an interval that admits the seeds'
    spread, its verdict, and each seed's own."""

    model_config = ConfigDict(extra="allow")
    reliance_score: dict[str, float] | None = Field(description='{"mean", "std"} over seeds')
    interval: Interval | None = None
    verdict: Verdict | None
    possible_verdicts: list[Literal["low", "partial", "high"]] | None = None
    basis: Literal["counterfactual", "groups"]
    per_seed: list[SeedReliance] = Field(default_factory=list)


class GroupAccuracy(BaseModel):
    label: int
    attribute: int
    n: int
    accuracy: float | None
    accuracy_interval: Interval | None = None
    aligned: bool | None = Field(None, description="the attribute value most common with this label in training")


class Counterfactual(BaseModel):
    model_config = ConfigDict(extra="allow")
    flip_rate: float
    accuracy: float
    accuracy_intervened: float
    flip_rate_interval: Interval | None = None
    flip_rate_towards: float | None = Field(
        None,
        description="share of examples whose prediction flips to the label the new attribute value went with "
        "in training",
    )
    flip_rate_towards_interval: Interval | None = None
    flip_rate_against: float | None = Field(None, description="share of examples whose prediction flips otherwise")
    flip_rate_against_interval: Interval | None = None
    flip_rate_net: float | None = Field(None, description="flip_rate_towards - flip_rate_against")
    flip_rate_net_interval: Interval | None = None
    mean_abs_logit_change: float | None = Field(
        None, description="mean |change| of the originally predicted class's log-odds (the logit, for one logit)"
    )
    mean_abs_logit_change_interval: Interval | None = None
    mean_abs_probability_change: float | None = Field(
        None, description="mean |change| of the originally predicted class's probability"
    )
    mean_abs_probability_change_interval: Interval | None = None
    accuracy_interval: Interval | None = None
    accuracy_intervened_interval: Interval | None = None


class Corner(BaseModel):
    model_config = ConfigDict(extra="allow")
    accuracy: float
    entropy: float
    accuracy_interval: Interval | None = None


class FourCorners(BaseModel):
    model_config = ConfigDict(extra="allow")
    core_and_spurious: Corner
    core_only: Corner
    spurious_only: Corner
    neither: Corner


class LinearProbe(BaseModel):
    model_config = ConfigDict(extra="allow")
    layer: str | None
    core_accuracy: float | None = Field(description="decoding the core label: the clean one where the dataset has it")
    spurious_accuracy: float | None
    core_accuracy_interval: Interval | None = None
    spurious_accuracy_interval: Interval | None = None
    label_accuracy: float | None = Field(None, description="decoding the dataset's label, noise included")
    label_accuracy_interval: Interval | None = None
    core_label: str | None = Field(None, description="which label core_accuracy decodes")
    data: str | None = Field(None, description="which examples fitted and scored the probe")
    random_network: dict[str, Any] | None = Field(
        None, description="the same probe on a randomly initialised copy of the network (or a reason it cannot run)"
    )


class NtkAlignment(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: float | None
    attribute: float | None
    core: float | None = Field(
        None, description="the core feature where the dataset has one (colored_mnist: the clean digit label)"
    )


class Ntk(BaseModel):
    """The empirical neural tangent kernel of the logit (probe `ntk`), or the reason it could not be computed."""

    model_config = ConfigDict(extra="allow")
    sample: dict[str, Any] | None = Field(None, description="n, seed, split and indices of the group-balanced sample")
    eigenvalues: list[float] | None = Field(None, description="largest first (at most 32)")
    eigenvalue_trace_shares: list[float] | None = None
    trace_share_top10: float | None = None
    alignment: NtkAlignment | None = Field(None, description="centred kernel alignment (Cortes et al. 2012)")
    top_eigenvector_mass: dict[str, Any] | None = Field(
        None,
        description="each (label, attribute) group's share of the top-k eigenvectors' mass, beside its share "
        "of the sample",
    )
    reason: str | None = None


class ModelHead(BaseModel):
    """The head found in a TorchScript or ONNX model's graph: the linear map that makes its logits."""

    node: str | None = Field(None, description="the op that makes the logits, e.g. `aten::linear (fc)` or `Gemm`")
    features: str | None = Field(None, description="the tensor the head reads: what the feature layer is")
    output_form: str | None = Field(
        None, description="e.g. `one logit`, `two-class logits`, `sigmoid probability of one logit`"
    )
    weight: str | None = Field(None, description="the attribute path or initializer holding its weight")
    bias: str | None = None
    repairable: bool = Field(description="whether a head refit can write a new weight and bias there")
    not_repairable_because: str | None = None


class Report(BaseModel):
    """The reliance report of API.md; probes that did not run are null. Every `*_interval` is a 95%
    confidence interval, computed as `confidence` says."""

    model_config = ConfigDict(extra="allow")
    spurious_attribute: str
    summary: RelianceSummary
    head: ModelHead | None = Field(None, description="TorchScript and ONNX models: the head found in the graph")
    groups: list[GroupAccuracy] | None = None
    average_accuracy: float | None = None
    worst_group_accuracy: float | None = None
    counterfactual: Counterfactual | None = None
    four_corners: FourCorners | None = None
    linear_probe: LinearProbe | None = None
    ntk: Ntk | None = None
    plots: list[str] = Field(default_factory=list)
    per_seed: list[dict[str, Any]] | None = Field(None, description="train jobs: the report of every seed")
    pooled_summary: PooledReliance | None = Field(
        None, description="train jobs: reliance over all seeds, with each seed's verdict"
    )
    confidence: dict[str, Any] | None = Field(None, description="how the intervals were computed")
    average_accuracy_interval: Interval | None = None
    worst_group_accuracy_interval: Interval | None = None
    bias_aligned_accuracy: float | None = None
    bias_aligned_accuracy_interval: Interval | None = None
    bias_conflicting_accuracy: float | None = None
    bias_conflicting_accuracy_interval: Interval | None = None


class JobError(BaseModel):
    code: str
    message: str


class MeanStd(BaseModel):
    """Over seeds; null where a value was not finite (a diverged loss)."""

    mean: float | None
    std: float | None


class SplitSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    accuracy: MeanStd
    loss: MeanStd


class SeedCheckpoints(BaseModel):
    """The checkpoints one seed produced: the same network in both formats."""

    seed: int
    torchscript: str = Field(description="checkpoint id")
    safetensors: str = Field(description="checkpoint id")


class SeedReport(Report):
    seed: int


class TrainAudit(BaseModel):
    reports: list[SeedReport] = Field(description="the report of every seed")
    summary: PooledReliance


class MlflowOutcome(BaseModel):
    model_config = ConfigDict(extra="allow")
    tracking_uri: str
    experiment: str
    run_id: str | None = None
    error: str | None = Field(None, description="why the export failed; the job itself succeeded")
    live_error: str | None = Field(
        None,
        description="why sending the metrics while the job ran failed (they "
        "were sent again; `error` says if the end failed too)",
    )


class TrainExecution(BaseModel):
    """How a train job's seeds ran (docs/performance.md). Fields added later have defaults, so older jobs load."""

    model_config = ConfigDict(extra="allow")
    requested: str = Field("auto", description="the spec's execution")
    used: Literal["batched", "sequential"]
    why: str = Field("", description="why `used` (e.g. 'auto: several seeds', 'cannot batch: ...')")
    precision: str = "fp32"
    per_seed_matmuls: bool = Field(False, description="batched on the CPU: each seed's matmuls run on their own")
    cuda_graphs: bool = Field(False, description="updates replayed from CUDA graphs (a CUDA device only)")
    compile: bool = Field(False, description="the stacked update under torch.compile (batched only)")


class TrainTiming(BaseModel):
    """Seconds of a train job's parts; step_ms: one update of every seed (batched: one stacked update)."""

    model_config = ConfigDict(extra="allow")
    step_ms: float
    train_s: float = Field(description="the updates, between evaluations")
    eval_s: float = Field(description="the evaluations and their metric reports")
    compile_s: float = Field(0.0, description="torch.compile before training (`compile: true`)")
    total_s: float = Field(description="the whole training call: data, training, evaluation, checkpoints")


class TrainResult(BaseModel):
    """A finished train job: per split, mean and std over seeds of the final accuracy and loss."""

    model_config = ConfigDict(extra="allow")
    splits: dict[str, SplitSummary]
    seeds: list[int]
    checkpoints: list[SeedCheckpoints]
    device: str
    dataset: dict[str, Any] = Field(default_factory=dict, description="what the dataset was built with")
    starved_fraction: dict[str, float] | None = None
    execution: TrainExecution | None = Field(None, description="how the seeds ran (batched or sequential) and why")
    timing: TrainTiming | None = None
    audit: TrainAudit | None = Field(None, description="with `audit: true`")
    mlflow: MlflowOutcome | None = None


class AuditResult(Report):
    """A finished audit job: its report (also at /report) and where the model ran."""

    device: str


class RepairSummary(RelianceSummary):
    """An audit's reliance summary with the numbers a before/after table shows."""

    average_accuracy: float | None = None
    worst_group_accuracy: float | None = None
    flip_rate: float | None = None
    core_accuracy: float | None = None
    spurious_accuracy: float | None = None


class RepairReports(BaseModel):
    before: Report
    after: Report


class RepairMethodOut(BaseModel):
    """The repair method as resolved: its name and every parameter (starvation.repair.describe_all)."""

    model_config = ConfigDict(extra="allow")
    name: RepairMethodName


class RepairScores(BaseModel):
    accuracy: float | None = None
    worst_group_accuracy: float | None = None


class RepairSelection(BaseModel):
    """Which data fitted the head and which chose it; the test split is never one of them."""

    model_config = ConfigDict(extra="allow")
    fitted_on: dict[str, Any] = Field(description="data, splits, n")
    chosen_on: dict[str, Any] = Field(description="data, splits, n, fraction, seed, stratified_by, criterion")
    test_split_used: Literal[False]
    candidates: list[dict[str, Any]] = Field(description="each candidate's strength and its fit and validation scores")
    chosen: dict[str, Any] = Field(description="the chosen candidate's strength")
    chosen_validation: RepairScores
    original_head: dict[str, Any] = Field(description="the old head's validation scores, for reference only")
    changed: bool


class RepairDetails(BaseModel):
    """What was written: the new checkpoint in each format, its parent, the feature layer and the head's shape."""

    model_config = ConfigDict(extra="allow")
    checkpoint_id: str
    checkpoint_ids: dict[str, str] = Field(description="format: checkpoint id (ours come in both formats)")
    parent_checkpoint_id: str
    format: str
    changed: bool
    feature_layer: str | None = None
    head: ModelHead | None = None
    head_shape: list[int] | None = Field(
        description="[outputs, features] of the last linear layer; null when a fine-tuned model has none"
    )
    note: str | None = Field(None, description="e.g. that the audit before found nothing to repair")


class RepairReport(RepairReports):
    """`GET /report` of a repair job: the audits before and after, on the same data, probes and seed, and the
    repair's details as in the job's `result.repair`."""

    repair: RepairDetails


class RepairResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    checkpoint_id: str = Field(description="the new checkpoint")
    parent_checkpoint_id: str
    method: RepairMethodOut = Field(description="the method as resolved, with every parameter")
    selection: RepairSelection = Field(description="which data fitted the head and which chose it")
    before: RepairSummary
    after: RepairSummary
    repair: RepairDetails
    reports: RepairReports
    device: str


class SweepScores(BaseModel):
    accuracy: MeanStd | None
    worst_group_accuracy: MeanStd | None = Field(description="null where the dataset has no attribute")


class SweepSetting(BaseModel):
    params: dict[str, Any] = Field(description="the grid's values of this setting")
    validation: SweepScores | None = Field(
        description="on the held-out part of the training data; null when nothing was held out (oracle)"
    )
    test: SweepScores
    checkpoints: list[SeedCheckpoints] = Field(default_factory=list, description="one network per seed")


class SweepRun(BaseModel):
    seed: int
    settings: list[int] = Field(description="indexes of the settings trained together")
    used: Literal["batched", "sequential"]
    why: str


class SweepResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    selection: SelectionRule
    scored_on: Literal["validation", "test"]
    metric: Literal["worst_group_accuracy", "accuracy"]
    leaks_test: bool = Field(description="true when the choice read the test split (oracle)")
    chosen: int = Field(description="index into settings")
    chosen_params: dict[str, Any]
    seeds: list[int]
    holdout: float = Field(description="fraction of each training split held out to choose on")
    settings: list[SweepSetting]
    execution: list[SweepRun] = Field(description="how the settings ran, per seed: stacked together or one by one")
    timing: dict[str, float]
    device: str
    audit: TrainAudit | None = Field(None, description="with `audit: true`: the chosen setting's models")


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
    links: dict[str, str]


class TrainJobOut(JobOutFields):
    kind: Literal[JobKind.TRAIN]
    result: TrainResult | None


class AuditJobOut(JobOutFields):
    kind: Literal[JobKind.AUDIT]
    result: AuditResult | None


class RepairJobOut(JobOutFields):
    kind: Literal[JobKind.REPAIR]
    result: RepairResult | None


class SweepJobOut(JobOutFields):
    kind: Literal[JobKind.SWEEP]
    result: SweepResult | None


JobOut = Annotated[TrainJobOut | AuditJobOut | RepairJobOut | SweepJobOut, Field(discriminator="kind")]
job_out_adapter: TypeAdapter[TrainJobOut | AuditJobOut | RepairJobOut | SweepJobOut] = TypeAdapter(JobOut)


# ?status= and ?kind= of GET /v1/jobs: one of the enum's values (anything else is a 422), or empty for any.
StatusFilter = Annotated[JobStatus | None, BeforeValidator(lambda value: value or None)]
KindFilter = Annotated[JobKind | None, BeforeValidator(lambda value: value or None)]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# When each error status is answered; every error has the body of ErrorResponse, also on HTML and file routes.
ERROR_MEANINGS = {
    400: "A body that cannot be parsed (JSON that is not UTF-8, broken multipart), or a cursor or filter this API "
    "did not issue.",
    401: "No token, or one that is unknown or revoked.",
    403: "Only the admin token may do this.",
    404: "No such object, or one that belongs to another key.",
    409: "The object's state does not allow it, or a concurrent request with this Idempotency-Key failed.",
    413: "The body or the upload is over the size limit, or would take the key past its stored bytes "
    "(`storage_quota_exceeded`).",
    422: "Invalid input (the error names the field), or an Idempotency-Key reused with another body.",
    429: "Over a limit of this key or of the service; retry after Retry-After seconds (a count of stored datasets "
    "or checkpoints: after deleting some).",
    503: "The database (or the model checker) is unavailable; nothing was changed. Retry after Retry-After seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for our error shape, always JSON (also on HTML and file routes)."""
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {
            "model": ErrorResponse,
            "description": ERROR_MEANINGS[code],
            "content": {"application/json": {"schema": schema}},
        }
        for code in codes
    }


# Every route behind a key may answer: 401 (the token), 422 (a parameter, or NUL/invalid Unicode anywhere in the
# request: api/hygiene.py) and 503 (the database is unavailable). Routes add what else they can answer.
KEYED_ERRORS = (401, 422, 503)
# A POST that creates something: its body may not parse (400) or be too large (413), and its Idempotency-Key may
# race (409).
CREATE_ERRORS = (400, 409, 413)


def links_to(parameter: str, *operation_ids: str) -> dict[str, Any]:
    """The `links` of a create's answer: the operations that take the new object's `id` as `parameter`. A client (and
    schemathesis's stateful phase, tests/api/test_fuzz_openapi.py) follows them from POST to GET/DELETE."""
    return {
        "links": {
            operation_id: {"operationId": operation_id, "parameters": {parameter: "$response.body#/id"}}
            for operation_id in operation_ids
        }
    }


def media_response(description: str, *media_types: str, binary: bool = False) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers something else than JSON (a file, a page, an event stream), so a client reads
    bytes or text. Such a route keeps the plain `Response` class: FastAPI then documents its errors as JSON only."""
    schema = {"type": "string", "format": "binary"} if binary else {"type": "string"}
    return {200: {"description": description, "content": {media: {"schema": schema} for media in media_types}}}


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description='"ok", or why the part is unreachable, by part (database, broker)')
