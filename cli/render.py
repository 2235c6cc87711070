"""Rich tables for jobs, results, reports and comparisons."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from cli.client import JobStatus

STATUS_STYLE: dict[str, str] = {
    JobStatus.QUEUED: "cyan",
    JobStatus.RUNNING: "yellow",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELLED: "magenta",
}
VERDICT_STYLE = {"low": "green", "partial": "yellow", "high": "red", "uncertain": "magenta"}


def number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def mean_std(stats: Any) -> str:
    if not isinstance(stats, dict) or stats.get("mean") is None:
        return number(stats)
    std = stats.get("std")
    return f"{stats['mean']:.3f} ± {std:.3f}" if isinstance(std, (int, float)) else f"{stats['mean']:.3f}"


def estimate(value: Any, interval: Any) -> str:
    """`0.758 [0.729, 0.782]`: a number and its 95% confidence interval."""
    if not isinstance(interval, list) or len(interval) != 2 or value is None:
        return number(value)
    return f"{number(value)} [{number(interval[0])}, {number(interval[1])}]"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def verdict_text(verdict: str | None, possible: list[str] | None = None) -> Text:
    """The verdict; an `uncertain` one names the verdicts its interval spans."""
    text = Text(verdict or "—", style=VERDICT_STYLE.get(verdict or "", ""))
    if verdict == "uncertain" and possible:
        text.append(f" ({' or '.join(possible)})")
    return text


def duration(job: dict) -> str:
    if not job.get("started_at"):
        return "—"
    end = job.get("finished_at")
    start = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    if not end:
        return "running"
    seconds = (datetime.fromisoformat(end.replace("Z", "+00:00")) - start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def what(job: dict) -> str:
    """A job in a few words: its kind, then what the server's summary says ran (any kind: the CLI knows none)."""
    summary = job.get("summary") or {}
    return " ".join(p for p in (job["kind"], summary.get("what")) if p)


def reliance(job: dict) -> tuple[str, str | None]:
    """(score, verdict) of the reliance the job measured, from the server's summary."""
    summary = job.get("summary") or {}
    score = (summary.get("numbers") or {}).get("reliance_score")
    if score is None and summary.get("verdict") is None:
        return "—", None
    return number(score), summary.get("verdict")


def test_accuracy(job: dict) -> str:
    splits = (job.get("result") or {}).get("splits") or {}
    return mean_std((splits.get("test") or {}).get("accuracy")) if splits.get("test") else "—"


def jobs_table(jobs: list[dict]) -> Table:
    """Fits 80 columns: ids cut to 12 digits (every command takes them), the kind in `what`, no vertical rules."""
    table = Table(
        title="Jobs (newest first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for column in ("id", "status", "created", "what", "test", "reliance"):
        table.add_column(column, no_wrap=column != "what", min_width=18 if column == "what" else None)
    for job in jobs:
        score, verdict = reliance(job)
        numbers = (job.get("summary") or {}).get("numbers") or {}
        status = status_text(job["status"])
        if job["status"] == JobStatus.RUNNING:
            status.append(f" {100 * (job.get('progress') or 0):.0f}%")
        table.add_row(
            job["id"][:12],
            status,
            job["created_at"][5:16].replace("T", " "),
            what(job),
            number(numbers.get("test_accuracy")),
            Text.assemble(verdict_text(verdict), f" {score.split(' ')[0]}") if verdict else Text("—"),
        )
    return table


def job_table(job: dict) -> Table:
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row(f"{job['kind']} job", job["id"])
    table.add_row("status", status_text(job["status"]))
    table.add_row("what", what(job))
    table.add_row("run time", duration(job))
    table.add_row("attempts", str(job.get("attempts", 0)))
    if job.get("tags"):
        table.add_row("tags", ", ".join(f"{k}={v}" for k, v in job["tags"].items()))
    starved = (job.get("result") or {}).get("starved_fraction")
    if starved:
        table.add_row(
            "starved fraction (train)",
            f"{number(starved.get('first'))} at step 0 → {number(starved.get('last'))} at the end",
        )
    mlflow = (job.get("result") or {}).get("mlflow") or {}
    if mlflow.get("run_id"):
        table.add_row("MLflow run", f"{mlflow['run_id']} ({mlflow['tracking_uri']}, experiment {mlflow['experiment']})")
    for warning in job.get("warnings") or []:
        table.add_row("warning", Text(warning, style="yellow"))
    if job.get("error"):
        table.add_row("error", Text(f"{job['error']['code']}: {job['error']['message']}", style="red"))
    return table


def train_result_table(job: dict) -> Table | None:
    result = job.get("result") or {}
    splits = result.get("splits")
    if not splits:  # a result with final metrics per split (a train job's)
        return None
    seeds = result.get("seeds") or []
    table = Table(title=f"Final metrics over {len(seeds)} seed(s) (mean ± std)", title_justify="left")
    for column in ("split", "accuracy", "loss"):
        table.add_column(column)
    for split, values in splits.items():
        table.add_row(split, mean_std(values.get("accuracy")), mean_std(values.get("loss")))
    return table


def sweep_table(job: dict) -> Table | None:
    """A sweep: every setting's validation and test scores (mean ± std over seeds), the chosen one marked."""
    result = job.get("result") or {}
    if not result.get("settings"):  # a result with settings to choose from (a sweep's)
        return None
    metric = result["metric"]
    short = "wg acc" if metric == "worst_group_accuracy" else "acc"
    leak = " — oracle: chosen on the TEST split (leaks it)" if result.get("leaks_test") else ""
    table = Table(
        title=f"Sweep: chosen by {result['selection']} ({metric} on {result['scored_on']}){leak}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("#", "setting", f"valid {short}", "test acc", "test wg acc", ""):
        table.add_column(column, no_wrap=column != "setting")
    for index, setting in enumerate(result["settings"]):
        params = " ".join(f"{key.split('.')[-1]}={json.dumps(value)}" for key, value in setting["params"].items())
        validation, test = setting.get("validation") or {}, setting.get("test") or {}
        chosen = index == result["chosen"]
        table.add_row(
            str(index),
            params,
            mean_std(validation.get(metric)) if validation else "—",
            mean_std(test.get("accuracy")),
            mean_std(test.get("worst_group_accuracy")),
            Text("◀ chosen", style="bold green") if chosen else "",
            style="bold" if chosen else None,
        )
    return table


def report_table(report: dict) -> Table:
    summary = report.get("summary") or {}
    table = Table(
        title=f"Reliance on '{report.get('spurious_attribute')}' ([95% interval])",
        title_justify="left",
        show_header=False,
    )
    table.add_column("measure", style="bold")
    table.add_column("value")
    table.add_row("reliance score", estimate(summary.get("reliance_score"), summary.get("interval")))
    table.add_row("verdict", verdict_text(summary.get("verdict"), summary.get("possible_verdicts")))
    table.add_row("basis", str(summary.get("basis", "—")))
    if summary.get("direction"):
        table.add_row("direction", f"{summary['direction']} the attribute's training association")
    table.add_row("average accuracy", estimate(report.get("average_accuracy"), report.get("average_accuracy_interval")))
    table.add_row(
        "worst-group accuracy",
        estimate(report.get("worst_group_accuracy"), report.get("worst_group_accuracy_interval")),
    )
    counterfactual = report.get("counterfactual") or {}
    if counterfactual:
        for label, key in (
            ("flip rate", "flip_rate"),
            ("flips towards the training association", "flip_rate_towards"),
            ("flips against it", "flip_rate_against"),
            ("net flips", "flip_rate_net"),
            ("mean |Δ logit|", "mean_abs_logit_change"),
            ("mean |Δ probability|", "mean_abs_probability_change"),
        ):
            if key in counterfactual:
                table.add_row(label, estimate(counterfactual[key], counterfactual.get(f"{key}_interval")))
        table.add_row(
            "accuracy / with attribute swapped",
            f"{number(counterfactual.get('accuracy'))} / {number(counterfactual.get('accuracy_intervened'))}",
        )
    probe = report.get("linear_probe") or {}
    if probe:
        baseline = probe.get("random_network") or {}
        for label, key in (
            ("linear probe: core", "core_accuracy"),
            ("linear probe: label (noisy)", "label_accuracy"),
            ("linear probe: spurious", "spurious_accuracy"),
        ):
            if probe.get(key) is None and key != "core_accuracy":
                continue
            random_copy = f" (random copy {number(baseline[key])})" if baseline.get(key) is not None else ""
            table.add_row(label, estimate(probe.get(key), probe.get(f"{key}_interval")) + random_copy)
    head = report.get("head") or {}
    if head.get("node"):  # a TorchScript or ONNX model: what its graph reading found
        table.add_row(
            "head (from the graph)", f"{head['node']} reads {head.get('features')}; outputs {head.get('output_form')}"
        )
        if not head.get("repairable"):
            table.add_row("head refit", f"not possible: {head.get('not_repairable_because')}")
    return table


def seeds_table(report: dict) -> Table | None:
    """A train job's reliance per seed beside the pooled one."""
    pooled = report.get("pooled_summary") or {}
    if not pooled.get("per_seed"):
        return None
    table = Table(title="Reliance per seed and pooled ([95% interval])", title_justify="left")
    for column in ("seed", "reliance score", "verdict"):
        table.add_column(column)
    for seed in pooled["per_seed"]:
        table.add_row(
            str(seed.get("seed")),
            estimate(seed.get("reliance_score"), seed.get("interval")),
            verdict_text(seed.get("verdict"), seed.get("possible_verdicts")),
        )
    table.add_row(
        "pooled",
        estimate((pooled.get("reliance_score") or {}).get("mean"), pooled.get("interval")),
        verdict_text(pooled.get("verdict"), pooled.get("possible_verdicts")),
    )
    return table


def groups_table(report: dict) -> Table | None:
    groups = report.get("groups")
    if not groups:
        return None
    table = Table(title="Accuracy per (label, attribute) group", title_justify="left")
    for column in ("label", "attribute", "n", "accuracy [95% interval]"):
        table.add_column(column, justify="right")
    for group in groups:
        table.add_row(
            str(group.get("label")),
            str(group.get("attribute")),
            str(group.get("n")),
            estimate(group.get("accuracy"), group.get("accuracy_interval")),
        )
    return table


def outcome(job: dict, report: dict | None) -> list[Table]:
    """Everything worth showing about a job, in reading order."""
    tables = [job_table(job), train_result_table(job), sweep_table(job)]
    if report and "repair" in report:  # a report before and after a repair
        tables += [repair_table(report)]
    elif report:
        tables += [report_table(report), seeds_table(report), groups_table(report)]
    return [t for t in tables if t is not None]


def repair_table(report: dict) -> Table:
    """A repair job: the audits before and after side by side, and what the repair chose."""
    before, after, repair = report.get("before") or {}, report.get("after") or {}, report.get("repair") or {}
    table = Table(title="Repair: before and after (test split)", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("before")
    table.add_column("after")
    for label, read in (
        ("reliance score", lambda r: number((r.get("summary") or {}).get("reliance_score"))),
        ("verdict", lambda r: verdict_text((r.get("summary") or {}).get("verdict"))),
        ("average accuracy", lambda r: number(r.get("average_accuracy"))),
        ("worst-group accuracy", lambda r: number(r.get("worst_group_accuracy"))),
        ("flip rate", lambda r: number((r.get("counterfactual") or {}).get("flip_rate"))),
    ):
        table.add_row(label, read(before), read(after))
    selection = repair.get("selection") or {}
    chosen = ", ".join(f"{k}={v}" for k, v in (selection.get("chosen") or {}).items()) or "—"
    table.add_row("method", (repair.get("method") or {}).get("name", "—"), chosen)
    table.add_row("checkpoint", repair.get("parent_checkpoint_id") or "—", repair.get("checkpoint_id") or "—")
    return table


def comparison_rows(job: dict, report: dict | None) -> dict[str, Any]:
    spec, result = job.get("spec") or {}, job.get("result") or {}
    splits = result.get("splits") or {}
    score, verdict = reliance(job)
    counterfactual = (report or {}).get("counterfactual") or {}
    starved = result.get("starved_fraction") or {}
    return {
        "kind": job["kind"],
        "status": status_text(job["status"]),
        "what": what(job),
        "method": (spec.get("method") or {}).get("name", "—"),
        "seeds": ", ".join(map(str, spec.get("seeds") or [])) or "—",
        "train accuracy": mean_std((splits.get("train") or {}).get("accuracy")) if splits else "—",
        "test accuracy": test_accuracy(job),
        "starved fraction (end)": number(starved.get("last")),
        "reliance score": score,
        "verdict": verdict_text(verdict),
        "flip rate": number(counterfactual.get("flip_rate")),
        "average accuracy": number((report or {}).get("average_accuracy")),
        "worst-group accuracy": number((report or {}).get("worst_group_accuracy")),
        "run time": duration(job),
    }


def compare_table(left: tuple[dict, dict | None], right: tuple[dict, dict | None]) -> Table:
    rows_a, rows_b = comparison_rows(*left), comparison_rows(*right)
    table = Table(title="Comparison", title_justify="left")
    table.add_column("", style="bold")
    table.add_column(f"A {left[0]['id'][:12]}")
    table.add_column(f"B {right[0]['id'][:12]}")
    for label in rows_a:
        table.add_row(label, rows_a[label], rows_b[label])
    return table


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def checkpoints_table(items: list[dict]) -> Table:
    table = Table(title="Checkpoints", title_justify="left")
    for column in ("id", "format", "size", "created UTC", "from"):
        table.add_column(column, no_wrap=True)
    for c in items:
        origin = (
            f"repair of {c['parent_checkpoint_id'][:12]}"
            if c.get("parent_checkpoint_id")
            else f"job {c['job_id'][:12]} seed {c.get('seed')}"
            if c.get("job_id")
            else "upload"
        )
        table.add_row(c["id"], c["format"], size(c["size_bytes"]), c["created_at"][5:16].replace("T", " "), origin)
    return table


def datasets_table(items: list[dict]) -> Table:
    table = Table(title="Datasets", title_justify="left")
    for column in ("id / name", "status", "splits", "note"):
        table.add_column(column, no_wrap=column != "note")
    for d in items:
        splits = (d.get("description") or {}).get("splits") or {}
        status = Text(
            d.get("status", "ready"), style={"ready": "green", "pending": "yellow"}.get(d.get("status", "ready"), "red")
        )
        table.add_row(
            d["name"] if d["builtin"] else f"{d['id']} {d['name']}",
            status,
            (
                " ".join(f"{name} {count}" for name, count in splits.items())
                if isinstance(splits, dict)
                else " ".join(map(str, splits))
            )
            or "—",
            d.get("error") or "",
        )
    return table


def artifacts_table(job_id: str, items: list[dict]) -> Table:
    table = Table(title=f"Artifacts of job {job_id}", title_justify="left")
    for column in ("name", "type", "size"):
        table.add_column(column, no_wrap=True)
    for a in items:
        table.add_row(a["name"], a["media_type"], size(a["size_bytes"]))
    return table


def keys_table(items: list[dict]) -> Table:
    table = Table(title="API keys", title_justify="left")
    for column in ("id", "name", "created UTC", "revoked UTC"):
        table.add_column(column, no_wrap=column != "name")
    for k in items:
        revoked = k.get("revoked_at")
        table.add_row(
            k["id"],
            k["name"],
            k["created_at"][:16].replace("T", " "),
            Text(revoked[:16].replace("T", " "), style="red") if revoked else "—",
        )
    return table


LEVEL_STYLE = {"warning": "yellow", "error": "red"}


def log_line(line: dict) -> Text:
    return Text.assemble(
        line["at"][11:19] + " ", (f"{line['level']:<7}", LEVEL_STYLE.get(line["level"], "dim")), " " + line["message"]
    )
