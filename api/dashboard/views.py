"""What the pages show, computed from jobs: a few words per job, summary numbers, report plots."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session

from api import jobs_service
from api.errors import ApiError
from api.files_service import stored_bytes
from api.kinds import KINDS
from models import files as files_repo
from models.kinds import JobKind
from models.status import TERMINAL, JobStatus
from models.tables import Job


def describe(job: Job) -> str:
    return KINDS[job.kind].summary(job).what


def mean_of(stats: Any) -> float | None:
    if isinstance(stats, dict):
        stats = stats.get("mean")
    return float(stats) if isinstance(stats, (int, float)) and not isinstance(stats, bool) else None


def std_of(stats: Any) -> float | None:
    return mean_of(stats.get("std")) if isinstance(stats, dict) else None


def reliance(job: Job) -> dict[str, Any]:
    """{"score", "std", "verdict", "interval", "per_seed"} of the reliance the job measured (its kind's `reliance`:
    a train job's pooled over seeds, an audit's, a repaired model's)."""
    summary = KINDS[job.kind].reliance(job)
    if not summary:
        return {"score": None, "std": None, "verdict": None, "interval": None, "per_seed": []}
    score = summary.get("reliance_score")
    return {
        "score": mean_of(score),
        "std": std_of(score),
        "verdict": summary.get("verdict"),
        "interval": summary.get("interval"),
        "per_seed": summary.get("per_seed") or [],
    }


def report_or_none(job: Job) -> dict[str, Any] | None:
    if job.status != JobStatus.SUCCEEDED:
        return None
    try:
        return jobs_service.report_of(job)
    except ApiError:
        return None


def job_row(job: Job) -> dict[str, Any]:
    summary = KINDS[job.kind].summary(job)
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": job.progress or 0.0,
        "created_at": job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else "",
        "describe": summary.what,
        "test_accuracy": summary.numbers.get("test_accuracy"),
        "reliance": reliance(job),
        "active": job.status not in TERMINAL,
    }


def duration_s(job: Job) -> float | None:
    if job.started_at and job.finished_at:
        return (job.finished_at - job.started_at).total_seconds()
    return None


def summary_rows(job: Job, report: dict | None) -> list[tuple[str, Any]]:
    """(label, value) pairs for the job page and for one column of the comparison."""
    rows: list[tuple[str, Any]] = [("kind", job.kind), ("status", job.status), ("what", describe(job))]
    kind_rows = KIND_ROWS.get(job.kind)  # optional: a kind without rows of its own shows the reliance rows only
    return rows + (kind_rows(job, report) if kind_rows else reliance_rows(job, report))


def reliance_rows(job: Job, report: dict | None) -> list[tuple[str, Any]]:
    """The reliance the job measured, its report's counterfactual and group accuracies, and its run time."""
    counterfactual = (report or {}).get("counterfactual") or {}
    rel = reliance(job)
    return [
        ("reliance score", {"mean": rel["score"], "std": rel["std"]} if rel["std"] is not None else rel["score"]),
        ("reliance score, 95% interval", rel["interval"]),
        ("verdict", rel["verdict"]),
        ("verdict per seed", ", ".join(f"{s.get('seed')}: {s.get('verdict')}" for s in rel["per_seed"]) or None),
        ("flip rate", counterfactual.get("flip_rate")),
        (
            "flips towards / against the attribute's training label",
            f"{fmt(counterfactual['flip_rate_towards'])} / {fmt(counterfactual['flip_rate_against'])}"
            if counterfactual.get("flip_rate_towards") is not None
            else None,
        ),
        (
            "mean |Δ logit| / |Δ probability| under the swap",
            f"{fmt(counterfactual['mean_abs_logit_change'])} / {fmt(counterfactual['mean_abs_probability_change'])}"
            if counterfactual.get("mean_abs_logit_change") is not None
            else None,
        ),
        ("average accuracy", (report or {}).get("average_accuracy")),
        ("worst-group accuracy", (report or {}).get("worst_group_accuracy")),
        ("run time", f"{duration_s(job):.1f} s" if duration_s(job) is not None else None),
    ]


def train_rows(job: Job, report: dict | None) -> list[tuple[str, Any]]:
    """A train job's method, optimizer, final accuracy per split and starved fraction, then its reliance."""
    spec, result = job.spec or {}, job.result or {}
    splits = result.get("splits") or {}
    starved = result.get("starved_fraction") or {}
    method, optimizer = spec.get("method") or {}, spec.get("optimizer") or {}
    rows: list[tuple[str, Any]] = [
        ("method", method.get("name")),
        ("sd_lambda", method.get("sd_lambda")),
        ("optimizer", f"{optimizer.get('name')} lr {optimizer.get('lr')}"),
    ]
    for split in splits:
        rows.append((f"{split} accuracy", splits[split].get("accuracy")))
    rows.append(
        (
            "starved fraction at step 0 → end",
            f"{fmt(starved.get('first'))} → {fmt(starved.get('last'))}" if starved else None,
        )
    )
    return rows + reliance_rows(job, report)


def sweep_rows(job: Job, report: dict | None) -> list[tuple[str, Any]]:
    """A sweep's rule and choice, then the chosen setting's reliance."""
    result = job.result or {}
    rows: list[tuple[str, Any]] = [
        ("selection", result.get("selection")),
        ("chosen setting", params_text(result.get("chosen_params"))),
        ("scored by", f"{result['metric']} on {result['scored_on']}" if result.get("metric") else None),
        ("held out to choose on", result.get("holdout")),
    ]
    return rows + reliance_rows(job, report)


def params_text(params: dict[str, Any] | None) -> str | None:
    """{"method.sd_lambda": 0.5, ...} as "sd_lambda 0.5, sd_gamma [1.0, 0.5]"."""
    return ", ".join(f"{key.split('.')[-1]} {value}" for key, value in params.items()) if params else None


HEAT_AXES = {"method.sd_lambda": "λ", "method.sd_gamma": "γ"}  # the grids drawn as heat maps, by symbol


def sweep_view(job: Job) -> dict[str, Any] | None:
    """A finished sweep for its page: one row per setting (chosen marked, checkpoints to download) and, when the
    grid is exactly λ and γ (either order), heat maps of the chosen metric on validation and test: rows are the
    grid's first key and columns its last, as the engine's settings run (the last key varying fastest)."""
    result, grid = job.result or {}, (job.spec or {}).get("grid") or {}
    if not result.get("settings"):
        return None
    metric, chosen = result["metric"], result["chosen"]
    rows = [
        {
            "index": index,
            "params": params_text(setting["params"]),
            "chosen": index == chosen,
            "scores": [
                (setting.get(part) or {}).get(name)  # the table's columns; no validation under oracle
                for part in ("validation", "test")
                for name in ("accuracy", "worst_group_accuracy")
            ],
            "checkpoints": setting.get("checkpoints") or [],
        }
        for index, setting in enumerate(result["settings"])
    ]
    heat = None
    if sorted(grid) == sorted(HEAT_AXES):
        (row_key, row_values), (column_key, column_values) = grid.items()
        row_symbol, column_symbol = HEAT_AXES[row_key], HEAT_AXES[column_key]
        heat = {
            "row_labels": [f"{row_symbol} {value}" for value in row_values],
            "column_labels": [f"{column_symbol} {value}" for value in column_values],
            "axes": f"rows {row_symbol}, columns {column_symbol}",
            "maps": [
                {
                    "title": f"{part} {metric}",
                    "id": f"heat-{part}",
                    "cells": _heat_cells(result["settings"], part, metric, len(column_values), chosen),
                }
                for part in ("validation", "test")
                if result["settings"][0].get(part)
            ],
        }
    return {"rows": rows, "metric": metric, "leaks_test": result.get("leaks_test"), "heat": heat}


def _heat_cells(settings: list[dict], part: str, metric: str, columns: int, chosen: int) -> list[list[dict]]:
    """Rows of `columns` cells: the mean, and a background from red (the map's lowest) to green (its highest);
    no colour where a score is missing (a group absent from the split)."""
    means = [mean_of((setting[part] or {}).get(metric)) for setting in settings]
    known = [m for m in means if m is not None]
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    cells = []
    for index, mean in enumerate(means):
        style = ""
        if mean is not None:
            hue = 120 * (mean - low) / (high - low) if high > low else 60  # all alike: a neutral yellow
            style = f"background: hsl({hue:.0f}, 65%, 80%)"
        cells.append({"value": mean, "chosen": index == chosen, "style": style})
    return [cells[start : start + columns] for start in range(0, len(cells), columns)]


def repair_rows(job: Job, report: dict | None) -> list[tuple[str, Any]]:
    """A repair job's outcome: each number before → after, and what the repair chose."""
    result = job.result or {}
    before, after = result.get("before") or {}, result.get("after") or {}
    rows: list[tuple[str, Any]] = []
    for label, key in (
        ("reliance score", "reliance_score"),
        ("verdict", "verdict"),
        ("flip rate", "flip_rate"),
        ("average accuracy", "average_accuracy"),
        ("worst-group accuracy", "worst_group_accuracy"),
    ):
        if key in before or key in after:
            rows.append((f"{label} (before → after)", f"{fmt(before.get(key))} → {fmt(after.get(key))}"))
    selection = result.get("selection") or {}
    rows += [
        ("method", (result.get("method") or {}).get("name")),
        ("chosen", ", ".join(f"{k}={v}" for k, v in (selection.get("chosen") or {}).items()) or None),
        ("new checkpoint", result.get("checkpoint_id")),
        ("parent checkpoint", result.get("parent_checkpoint_id")),
        ("run time", f"{duration_s(job):.1f} s" if duration_s(job) is not None else None),
    ]
    return rows


def fmt(value: Any) -> str:
    """Numbers to 3 decimals, {"mean", "std"} as mean ± std, an interval as [low, high], None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if isinstance(value, dict) and "mean" in value:
        if value.get("mean") is None:
            return "—"
        return f"{value['mean']:.3f} ± {value['std']:.3f}" if value.get("std") is not None else f"{value['mean']:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def plot_images(session: Session, job: Job, report: dict | None) -> list[dict[str, str]]:
    """The report's plots as data URIs (one authenticated page load, no second request per image), captioned."""
    from starvation.audit import plot_caption

    images = []
    for name in (report or {}).get("plots", []):
        artifact = files_repo.get_artifact(session, job.id, name)
        if artifact is None:
            continue
        try:
            data = base64.b64encode(stored_bytes(artifact.path)).decode()
        except FileNotFoundError:
            continue
        images.append({"name": name, "src": f"data:{artifact.media_type};base64,{data}", "caption": plot_caption(name)})
    return images


def downloads(session: Session, job: Job, owner_id: str) -> dict[str, list[dict[str, Any]]]:
    """The job's files, as links for the signed-in browser: the checkpoints it made (each format) and the one it
    read (an audit's or a repair's input), and its other artifacts (plots, reports)."""
    made = list(files_repo.checkpoints_of_job(session, job.id))
    read = (
        files_repo.get_checkpoint(session, job.spec["checkpoint_id"], owner_id=owner_id)
        if isinstance((job.spec or {}).get("checkpoint_id"), str)
        else None
    )
    checkpoints = [
        {
            "id": c.id,
            "format": c.format,
            "size": size_text(c.size_bytes),
            "what": "input" if c is read else f"seed {c.seed}" if c.seed is not None else "made",
            "url": f"/dashboard/checkpoints/{c.id}/file",
        }
        for c in made + ([read] if read is not None and read not in made else [])
    ]
    paths = {c.path for c in made}  # a checkpoint's file is an artifact too: listed once, as a checkpoint
    artifacts = [
        {
            "name": a.name,
            "media_type": a.media_type,
            "size": size_text(a.size_bytes),
            "url": f"/dashboard/jobs/{job.id}/artifacts/{quote(a.name, safe='')}",
        }
        for a in files_repo.artifacts_of_job(session, job.id)
        if a.path not in paths
    ]
    return {"checkpoints": checkpoints, "artifacts": artifacts}


def size_text(size_bytes: int) -> str:
    """1234567 as "1.2 MiB"."""
    if size_bytes < 1024:
        return f"{size_bytes} bytes"
    if size_bytes < 1024**2:
        return f"{size_bytes / 1024:.1f} KiB"
    return f"{size_bytes / 1024**2:.1f} MiB"


# A page's rows of a kind's own, beyond the reliance rows every kind shows (optional, as its template is:
# templates/kinds/<kind>.html).
KIND_ROWS: dict[str, Callable[[Job, dict | None], list[tuple[str, Any]]]] = {
    JobKind.TRAIN: train_rows,
    JobKind.SWEEP: sweep_rows,
    JobKind.REPAIR: repair_rows,
}
