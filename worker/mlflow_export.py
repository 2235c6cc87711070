"""Export a finished train job to an MLflow tracking server: params, metric history, result, report.

A spec asks for it with `"mlflow": {"tracking_uri": ..., "experiment": ...}`. One job is one MLflow
run, tagged `gs.job_id`; exporting the same job again returns the run already there, so a retried
job never makes a second run.

The tracking URI is user input: it is checked again here (core/outbound.py), MLflow's connections go
only to checked addresses, and the server's `artifact_uri` is followed only back to that server.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from core import outbound

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
    reports: Sequence[str] = (),
    allowed_schemes: Sequence[str] = outbound.WEB_SCHEMES,
    outbound_allow: str = "",
) -> str:
    """Log the job to `experiment` at `tracking_uri` and return the MLflow run id.

    `metrics`: rows as GET /v1/jobs/{id}/metrics serves them ({step, name, value, seed, split}).
    `reports`: every seed's report file, each logged under report/<its folder> (e.g. report/seed1-audit/).
    Each (name, split, seed) becomes one MLflow metric key (`metric_key`) with its history by step.
    `allowed_schemes` and `outbound_allow`: GS_MLFLOW_ALLOWED_SCHEMES and GS_OUTBOUND_ALLOW.
    Raises OutboundRefused for a target (or an artifact location) this service must not write to.
    """
    outbound.check_target(tracking_uri, allowed_schemes, outbound_allow)
    with outbound.guard_urllib3(outbound_allow):
        return log_job(tracking_uri, experiment, job_id, spec, metrics, result, reports)


def log_job(
    tracking_uri: str, experiment: str, job_id: str, spec: dict, metrics: list[dict], result: dict,
    reports: Sequence[str],
) -> str:
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
        documents = {"result.json": result, "spec.json": spec}
        log_artifacts(run.info.artifact_uri, tracking_uri, documents, reports)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_artifacts(
    artifact_uri: str, tracking_uri: str, documents: dict[str, dict], reports: Sequence[str]
) -> None:
    """Write to the artifact location create_run answered, once checked (never asked for again)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    check_artifact_uri(artifact_uri, tracking_uri)
    repository = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        for name, document in documents.items():
            path = Path(folder) / name
            path.write_text(json.dumps(document, indent=2))
            repository.log_artifact(str(path))
    for report in reports:
        repository.log_artifact(report, f"report/{Path(report).parent.name}")


def check_artifact_uri(artifact_uri: str, tracking_uri: str) -> None:
    """A hostile server could answer `file:///etc/...`: artifacts go back to the tracking server
    (its http(s) origin or `mlflow-artifacts:`), or, for a file: store, under that store's folder."""
    where, tracking = urlsplit(artifact_uri), urlsplit(tracking_uri)
    scheme, tracking_scheme = where.scheme.lower(), tracking.scheme.lower()
    if "@" not in where.netloc and tracking_scheme in outbound.WEB_SCHEMES:
        same_origin = (where.hostname, where.port) == (tracking.hostname, tracking.port)
        if scheme == "mlflow-artifacts" and (not where.netloc or same_origin):
            return
        if scheme == tracking_scheme and same_origin:
            return
    if tracking_scheme == "file" and scheme == "file" and where.netloc in ("", "localhost"):
        store = Path(url2pathname(tracking.path)).resolve()
        if Path(url2pathname(where.path)).resolve().is_relative_to(store):
            return
    raise outbound.OutboundRefused(
        f"the MLflow server answered the artifact location {artifact_uri!r}, which is not on the "
        f"tracking server {tracking_uri!r}; nothing was written there."
    )


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
