"""The reliance report of an audit (docs/api.md): what an audit job returns, and what train, sweep and repair
jobs embed. Shared by the API, which serves it, and the worker, which checks a result against it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class MeanStd(BaseModel):
    """Over seeds; null where a value was not finite (a diverged loss)."""

    mean: float | None
    std: float | None


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
