"""`run_audit`: the probes a spec asks for, the reliance summary, the plots; one JSON-able report."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from starvation.audit.intervals import (
    BOOTSTRAP_DRAWS,
    CONFIDENCE,
    absolute_interval,
    clip_interval,
    pooled_mean_interval,
)
from starvation.audit.plots import draw_plots
from starvation.audit.probes import PROBES, AuditContext
from starvation.checkpoints import AuditableModel
from starvation.datasets.base import Dataset
from starvation.errors import SpecError

HIGH_RELIANCE = 0.5  # API.md: verdict "high" at >= 0.5
LOW_RELIANCE = 0.1  # API.md: verdict "low" below 0.1
VERDICTS = ("low", "partial", "high")  # in order of the score; "uncertain" when the interval spans two
UNCERTAIN = "uncertain"
SCORE_MEASURES = {
    "counterfactual": "|flips towards - flips against the attribute's training label| / n, under the intervention",
    "groups": "bias-aligned minus bias-conflicting accuracy, clipped to [0, 1]",
}

# Keys each probe fills; present as null when the probe did not run, so the shape never changes.
REPORT_KEYS = {
    "groups": [
        "groups",
        "average_accuracy",
        "average_accuracy_interval",
        "worst_group_accuracy",
        "worst_group_accuracy_interval",
        "bias_aligned_accuracy",
        "bias_aligned_accuracy_interval",
        "bias_conflicting_accuracy",
        "bias_conflicting_accuracy_interval",
        "accuracy_gap_interval",
    ],
    "counterfactual": ["counterfactual"],
    "four_corners": ["four_corners", "four_corners_entropy"],
    "linear_probe": ["linear_probe"],
    "ntk": ["ntk"],
}


def supported_probes(dataset: Dataset) -> list[str]:
    """The probes that run on `dataset` when a spec names none, in report order (the default for an audit spec;
    the costly ones, such as `ntk`, run only when named)."""
    return [name for name, probe in PROBES.items() if probe.by_default and probe().supports(dataset)]


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
            f"it supports: {', '.join(n for n, p in PROBES.items() if p().supports(dataset))}"
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
        "confidence": confidence_note(seed),
        **{key: None for keys in REPORT_KEYS.values() for key in keys},
        "plots": [],
    }
    with torch.no_grad():
        for name in names:
            report.update(PROBES[name]().run(model, dataset, ctx))
    report["summary"] = reliance_summary(report, basis)
    report["plots"] = draw_plots(report, model, dataset, pathlib.Path(out_dir))
    return report


def confidence_note(seed: int) -> dict:
    """How the report's `*_interval` fields were computed."""
    return {
        "level": CONFIDENCE,
        "shares": "Wilson score interval",
        "scores": f"bootstrap of the outcome shares (Dirichlet, half a pseudo-count each), {BOOTSTRAP_DRAWS} "
        f"draws, seed {seed}",
        "means": f"percentile bootstrap over test examples, {BOOTSTRAP_DRAWS} draws, seed {seed}",
    }


def reliance_summary(report: dict, basis: str) -> dict:
    """The reliance score, its interval and verdict (docs/audit.md).

    Where the attribute can be changed: |flips towards - flips against| the attribute's training
    association, so a model that is sensitive to the attribute but does not follow it reads low
    (the flip rate itself stays in `counterfactual`). Else, as API.md: aligned minus conflicting
    accuracy clipped to [0, 1]. The verdict is `uncertain` when the interval spans a threshold.
    """
    if basis == "counterfactual":
        counterfactual = report["counterfactual"]
        net, net_interval = counterfactual["flip_rate_net"], counterfactual["flip_rate_net_interval"]
        score, interval = abs(net), absolute_interval(net_interval)
        # a direction only where the interval of the net rate leaves out zero
        direction = "towards" if net_interval[0] > 0 else "against" if net_interval[1] < 0 else None
    else:
        aligned, conflicting = report["bias_aligned_accuracy"], report["bias_conflicting_accuracy"]
        if aligned is None or conflicting is None:
            which = "bias-aligned" if aligned is None else "bias-conflicting"
            return {
                "reliance_score": None,
                "verdict": None,
                "basis": basis,
                "reason": f"the test split has no {which} examples, so reliance cannot be measured",
            }
        score = min(max(aligned - conflicting, 0.0), 1.0)
        interval, direction = clip_interval(report["accuracy_gap_interval"]), None
    return {
        "reliance_score": score,
        "interval": interval,
        **verdicts(score, interval),
        "basis": basis,
        "measure": SCORE_MEASURES[basis],
        "direction": direction,
    }


def verdict(reliance_score: float) -> str:
    """API.md's verdict of a score alone: high at >= 0.5, low below 0.1, else partial."""
    if reliance_score >= HIGH_RELIANCE:
        return "high"
    if reliance_score < LOW_RELIANCE:
        return "low"
    return "partial"


def verdicts(reliance_score: float, interval: list[float] | None) -> dict:
    """{"verdict", "possible_verdicts"}: every verdict a score inside the interval could get;
    the verdict is `uncertain` when that is more than one."""
    if interval is None:
        return {"verdict": verdict(reliance_score), "possible_verdicts": [verdict(reliance_score)]}
    ends = {VERDICTS.index(verdict(interval[0])), VERDICTS.index(verdict(interval[1]))}
    possible = list(VERDICTS[min(ends) : max(ends) + 1])
    return {"verdict": possible[0] if len(possible) == 1 else UNCERTAIN, "possible_verdicts": possible}


def pool_reliance(reports: list[dict]) -> dict:
    """Reliance over seeds: each seed's score, interval and verdict, and the pooled mean with its
    interval (`pooled_mean_interval`) and verdict."""
    summaries = [r["summary"] for r in reports]
    per_seed = [
        {
            "seed": r.get("seed"),
            **{k: r["summary"].get(k) for k in ("reliance_score", "interval", "verdict", "possible_verdicts")},
        }
        for r in reports
    ]
    scored = [s for s in summaries if s["reliance_score"] is not None]
    if not scored:
        return {
            "reliance_score": None,
            "verdict": None,
            "basis": summaries[0]["basis"],
            "reason": summaries[0].get("reason"),
            "per_seed": per_seed,
        }
    scores = [s["reliance_score"] for s in scored]
    mean = sum(scores) / len(scores)
    interval = pooled_mean_interval(scores, [s.get("interval") for s in scored])
    return {
        "reliance_score": {"mean": mean, "std": float(np.std(scores))},
        "interval": interval,
        **verdicts(mean, interval),
        "basis": summaries[0]["basis"],
        "measure": summaries[0].get("measure"),
        "per_seed": per_seed,
    }
