"""`run_audit`: the probes a spec asks for, the reliance summary, the plots; one JSON-able report."""
from __future__ import annotations

import pathlib

import torch

from starvation.audit.plots import draw_plots
from starvation.audit.probes import PROBES, AuditContext
from starvation.checkpoints import AuditableModel
from starvation.datasets.base import Dataset
from starvation.errors import SpecError

HIGH_RELIANCE = 0.5  # API.md: verdict "high" at >= 0.5
LOW_RELIANCE = 0.1  # API.md: verdict "low" below 0.1

# Keys each probe fills; present as null when the probe did not run, so the shape never changes.
REPORT_KEYS = {
    "groups": ["groups", "average_accuracy", "worst_group_accuracy", "bias_aligned_accuracy",
               "bias_conflicting_accuracy"],
    "counterfactual": ["counterfactual"],
    "four_corners": ["four_corners", "four_corners_entropy"],
    "linear_probe": ["linear_probe"],
}


def supported_probes(dataset: Dataset) -> list[str]:
    """The probes that can run on `dataset`, in report order (the default for an audit spec)."""
    return [name for name, probe in PROBES.items() if probe().supports(dataset)]


def resolve_probes(probes: list[str] | None, dataset: Dataset) -> list[str]:
    """The probes to run, in report order; SpecError for unknown or unsupported names."""
    if probes is None:
        return supported_probes(dataset)
    unknown = [name for name in probes if name not in PROBES]
    if unknown:
        raise SpecError(f"unknown probe(s) {', '.join(map(repr, unknown))}; known probes: {', '.join(PROBES)}")
    unsupported = [name for name in probes if not PROBES[name]().supports(dataset)]
    if unsupported:
        raise SpecError(
            f"dataset {dataset.name!r} does not support probe(s) {', '.join(map(repr, unsupported))}; "
            f"it supports: {', '.join(supported_probes(dataset))}"
        )
    return [name for name in PROBES if name in probes]


def check_spurious_attribute(dataset: Dataset, spurious_attribute: str) -> None:
    """A built-in dataset audits only the attributes it declares; a registered dataset has one
    unnamed attribute column, so the spec's name for it is taken as given."""
    declared = getattr(dataset, "ATTRIBUTES", None)
    if declared and spurious_attribute not in declared:
        raise SpecError(
            f"dataset {dataset.name!r} has spurious attribute(s) {', '.join(map(repr, declared))}, "
            f"not {spurious_attribute!r}"
        )


def summary_basis(dataset: Dataset) -> str:
    """The probe the reliance score rests on: the counterfactual where the attribute can be changed."""
    return "counterfactual" if dataset.can_intervene else "groups"


def run_audit(
    model: AuditableModel,
    dataset: Dataset,
    *,
    probes: list[str] | None,
    spurious_attribute: str,
    seed: int,
    out_dir: pathlib.Path,
) -> dict:
    """Audit `model` on `dataset` for reliance on its spurious attribute (API.md, "Report (JSON)").

    `probes=None` runs every probe the dataset supports. The probe the summary rests on
    (`summary_basis`) always runs, so every report has a summary. Plots go to `out_dir` as PNG
    and are listed in `report["plots"]`. Inputs are moved to `model.device` batch by batch.
    """
    names = resolve_probes(probes, dataset)
    check_spurious_attribute(dataset, spurious_attribute)
    basis = summary_basis(dataset)
    if basis not in names:
        names = [name for name in PROBES if name in {*names, basis}]

    ctx = AuditContext(seed=seed)
    report: dict = {
        "spurious_attribute": spurious_attribute,
        "dataset": dataset.name,
        "split": dataset.test_split,
        "n": len(dataset.splits[dataset.test_split]),
        "seed": seed,
        "probes": names,
        "summary": None,
        **{key: None for keys in REPORT_KEYS.values() for key in keys},
        "plots": [],
    }
    with torch.no_grad():
        for name in names:
            report.update(PROBES[name]().run(model, dataset, ctx))
    report["summary"] = reliance_summary(report, basis)
    report["plots"] = draw_plots(report, model, dataset, pathlib.Path(out_dir))
    return report


def reliance_summary(report: dict, basis: str) -> dict:
    """API.md: the flip rate where the attribute can be changed, else aligned minus conflicting
    accuracy clipped to [0, 1]; verdict high at >= 0.5, low below 0.1, partial between."""
    if basis == "counterfactual":
        score = report["counterfactual"]["flip_rate"]
    else:
        aligned, conflicting = report["bias_aligned_accuracy"], report["bias_conflicting_accuracy"]
        if aligned is None or conflicting is None:
            which = "bias-aligned" if aligned is None else "bias-conflicting"
            return {"reliance_score": None, "verdict": None, "basis": basis,
                    "reason": f"the test split has no {which} examples, so reliance cannot be measured"}
        score = min(max(aligned - conflicting, 0.0), 1.0)
    return {"reliance_score": score, "verdict": verdict(score), "basis": basis}


def verdict(reliance_score: float) -> str:
    if reliance_score >= HIGH_RELIANCE:
        return "high"
    if reliance_score < LOW_RELIANCE:
        return "low"
    return "partial"
