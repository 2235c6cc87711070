"""What a finished train job returns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from results.report import MeanStd, SeedCheckpoints, TrainAudit


class SplitSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    accuracy: MeanStd
    loss: MeanStd


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
