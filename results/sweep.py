"""What a finished sweep job returns."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from results.report import MeanStd, SeedCheckpoints, TrainAudit
from starvation.training.sweep import SELECTIONS

SelectionRule = StrEnum("SelectionRule", {name.upper(): name for name in SELECTIONS})  # type: ignore[misc]  # names from a registry


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
