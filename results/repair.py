"""What a finished repair job returns, and its GET /report."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from results.report import ModelHead, RelianceSummary, Report
from starvation.repair.methods import REPAIR_METHODS

RepairMethodName = StrEnum("RepairMethodName", {name.upper(): name for name in REPAIR_METHODS})  # type: ignore[misc]  # names from a registry


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
    """The repair method as resolved: its name and every parameter (its class's PARAMS, defaults filled in)."""

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
