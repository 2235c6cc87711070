"""Export a finished train job to an MLflow tracking server: params, metric history, result, report.

A spec asks for it with `"mlflow": {"tracking_uri": ..., "experiment": ...}`. One job is one MLflow
run, tagged `gs.job_id`; exporting the same job again returns the run already there, so a retried
job never makes a second run.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

JOB_ID_TAG = "gs.job_id"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
BATCH = 1000  # MLflow's limit on entries in one log_batch call
PARAMS_PER_BATCH = 100


def export_run(
    *,
    tracking_uri: str,
    experiment: str,
    job_id: str,
    spec: dict,
    metrics: list[dict],
    result: dict,
    report_path: str | None,
) -> str:
    """Log the job to `experiment` at `tracking_uri` and return the MLflow run id.

    `metrics`: rows as GET /v1/jobs/{id}/metrics serves them ({step, name, value, seed, split}).
    Each (name, split, seed) becomes one MLflow metric key (`metric_key`) with its history by step.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = experiment_id_of(client, experiment)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'", max_results=10
    )
    for run in existing:
        if run.info.status == "FINISHED":
            return run.info.run_id
        client.delete_run(run.info.run_id)  # a half-written export of an earlier attempt

    tags = {JOB_ID_TAG: job_id, "gs.kind": "train", "mlflow.source.name": "gradient-starvation-service"}
    method = (spec.get("method") or {}).get("name")
    if method:
        tags["gs.method"] = str(method)
    if spec.get("preset"):
        tags["gs.preset"] = str(spec["preset"])
    run = client.create_run(experiment_id, run_name=f"gs-{job_id}", tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(key, value) for key, value in flatten_params(spec).items()]
        for chunk in chunks(params, PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        timestamp = int(time.time() * 1000)
        history = [Metric(metric_key(m), float(m["value"]), timestamp, int(m["step"])) for m in metrics]
        last = final_step(metrics)
        history += [Metric(key, value, timestamp, last) for key, value in summary_metrics(result).items()]
        for chunk in chunks(history, BATCH):
            client.log_batch(run_id, metrics=chunk)
        if verdict_of(result):
            client.log_batch(run_id, tags=[RunTag("gs.verdict", str(verdict_of(result)))])
        client.log_dict(run_id, result, "result.json")
        client.log_dict(run_id, spec, "spec.json")
        if report_path:
            client.log_artifact(run_id, report_path, artifact_path="report")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def experiment_id_of(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)  # another worker created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def metric_key(row: dict) -> str:
    """`accuracy/test/seed0`: name first, so MLflow's UI groups one quantity's curves together."""
    parts = [str(row["name"])]
    if row.get("split"):
        parts.append(str(row["split"]))
    if row.get("seed") is not None:
        parts.append(f"seed{row['seed']}")
    return "/".join(parts)


def flatten_params(spec: dict, prefix: str = "") -> dict[str, str]:
    """{"method.sd_lambda": "2.0", "seeds": "[0, 1]", ...}: nested objects dotted, lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in spec.items():
        if key == "mlflow":
            continue  # where to log is not a hyper-parameter
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def summary_metrics(result: dict) -> dict[str, float]:
    """The job's summary as `final/...` metrics: mean and std over seeds per split, reliance."""
    summary: dict[str, float] = {}
    for split, values in (result.get("splits") or {}).items():
        for name, stats in values.items():
            for stat in ("mean", "std"):
                if isinstance(stats, dict) and isinstance(stats.get(stat), (int, float)):
                    summary[f"final/{split}/{name}_{stat}"] = float(stats[stat])
    reliance = ((result.get("audit") or {}).get("summary") or {}).get("reliance_score")
    if isinstance(reliance, dict):
        for stat in ("mean", "std"):
            if isinstance(reliance.get(stat), (int, float)):
                summary[f"final/reliance_score_{stat}"] = float(reliance[stat])
    return summary


def verdict_of(result: dict) -> str | None:
    return ((result.get("audit") or {}).get("summary") or {}).get("verdict")


def final_step(metrics: Sequence[dict]) -> int:
    return max((int(m["step"]) for m in metrics), default=0)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
