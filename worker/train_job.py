"""Train jobs: call the training engine, register its checkpoints, audit them when asked."""

from __future__ import annotations

import logging
from typing import Any

from core.paths import resume_dir
from core.storage import local_copy
from results.train import TrainResult
from worker import audit_job
from worker.context import JobContext
from worker.devices import pick_device
from worker.files import add_artifact, add_checkpoint, resume_kept

log = logging.getLogger("gs.worker")


Result = TrainResult  # what run() returns (worker/kinds.py checks it before it is recorded)


def run(spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from starvation.datasets import DATASETS
    from starvation.training import ResolvedTrainSpec, TrainingStopped, spec_warnings, train

    device = pick_device(spec.get("device"), ctx.settings.device)
    registered = spec["dataset"]["name"] not in DATASETS
    # Resolved and checked when the job was submitted (api/jobs_service.py): run as it is.
    engine_spec = ResolvedTrainSpec.of(spec)  # the train spec's fields: SERVICE_FIELDS are the service's
    for warning in spec_warnings(engine_spec):
        ctx.say("warning", warning)
    mlflow = start_mlflow(spec, ctx) if spec.get("mlflow") else None
    history = stored_metrics(ctx) if mlflow is not None else []  # every metric of the job, for MLflow
    if mlflow is not None:
        mlflow.add(history)

    # The NTK alignments over training, drawn in each seed's audit report (an earlier attempt's are stored already).
    kernel_rows = [r for r in stored_metrics(ctx) if _kernel(r)] if spec.get("ntk_every") and spec.get("audit") else []

    def on_metrics(batch: list[Any]) -> None:
        rows = ctx.on_metrics(batch)
        kernel_rows.extend(r for r in rows if _kernel(r))
        if mlflow is not None:
            history.extend(rows)
            mlflow.add(rows)

    try:
        with resume_kept(ctx.settings, ctx.job_id):
            outcome = train(
                engine_spec,
                out_dir=ctx.work_dir,
                device=device,
                data_dir=str(ctx.settings.data_dir) if ctx.settings.data_dir else None,
                on_metrics=on_metrics,
                on_progress=lambda fraction: ctx.on_progress(0.9 * fraction if spec.get("audit") else fraction),
                should_stop=ctx.should_stop,
                dataset=audit_job.load_dataset(ctx, spec["dataset"], seed=0, device=device) if registered else None,
                resume_dir=resume_dir(ctx.work_dir),
                init_weights=initial_weights(ctx, spec.get("init_checkpoint_id")),
            )
        for seed, step in outcome.result.get("resumed", {}).items():
            ctx.say("info", f"seed {seed} resumed from its state saved at step {step}")
        result: dict[str, Any] = {
            **outcome.result,
            "device": device,
            "checkpoints": register_checkpoints(ctx, outcome.checkpoints),
        }
        if spec.get("audit"):
            result["audit"] = audit_checkpoints(ctx, spec["dataset"], outcome.checkpoints, device, kernel_rows)
    except BaseException as exc:
        if mlflow is not None:
            mlflow.abandon("KILLED" if isinstance(exc, TrainingStopped) else "FAILED")
        raise
    if mlflow is not None:
        result["mlflow"] = finish_mlflow(mlflow, spec, ctx, history, result)
    return result


def initial_weights(ctx: JobContext, checkpoint_id: str | None) -> dict[str, Any] | None:
    """The state dict of the owner's safetensors checkpoint to start from (safetensors: nothing is unpickled)."""
    if checkpoint_id is None:
        return None
    from safetensors.torch import load_file

    from models import files as files_repo

    with ctx.db.session() as session:
        row = files_repo.get_checkpoint(session, checkpoint_id, owner_id=ctx.owner_id)
        path = row.path if row is not None else None
    if path is None:
        raise FileNotFoundError(f"the checkpoint {checkpoint_id!r} to start from no longer exists")
    return load_file(local_copy(ctx.settings, path))


def register_checkpoints(ctx: JobContext, checkpoints: list[Any], prefix: str = "") -> list[dict[str, Any]]:
    """Each trained network as two checkpoints (TorchScript, safetensors) and artifacts of the job, named
    `prefix` + the file's name: [{"seed", "torchscript": id, "safetensors": id}]."""
    registered = []
    for ckpt in checkpoints:
        ids = {}
        for fmt, path in (("torchscript", ckpt.torchscript_path), ("safetensors", ckpt.safetensors_path)):
            ids[fmt] = add_checkpoint(
                ctx.db,
                job_id=ctx.job_id,
                owner_id=ctx.owner_id,
                seed=ckpt.seed,
                fmt=fmt,
                path=path,
                model_info=model_info(ckpt),
                settings=ctx.settings,
            )
            add_artifact(ctx.db, ctx.job_id, path, f"{prefix}{path.name}", settings=ctx.settings)
        registered.append({"seed": ckpt.seed, **ids})
    return registered


def model_info(ckpt: Any) -> dict[str, Any]:
    return {
        "arch": ckpt.arch,
        "arch_params": ckpt.arch_params,
        "input_shape": list(ckpt.input_shape),
        "num_outputs": ckpt.num_outputs,
    }


def _kernel(row: dict[str, Any]) -> bool:
    return str(row["name"]).startswith("ntk_alignment_")


def audit_checkpoints(
    ctx,
    dataset_ref: dict[str, Any],
    checkpoints: list[Any],
    device: str,
    history: list[dict[str, Any]] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Each network audited on its seed's data: {"reports": [{"seed", ...}], "summary": pooled over seeds}.
    `history`: metric rows of the training, each seed's drawn in its report where they hold NTK alignments."""
    from starvation.audit import pool_reliance

    reports = []
    for ckpt in checkpoints:
        model = audit_job.load_model(str(ckpt.safetensors_path), "safetensors", model_info(ckpt), device)
        dataset = audit_job.load_dataset(ctx, dataset_ref, ckpt.seed, device)
        audit_spec = {"seed": ckpt.seed, "spurious_attribute": dataset.attribute_name or "attribute"}
        seed_rows = [row for row in history or () if row.get("seed") == ckpt.seed]
        report = audit_job.audit_model(
            ctx, model, dataset, spec=audit_spec, prefix=f"{prefix}seed{ckpt.seed}-", history=seed_rows
        )
        reports.append({"seed": ckpt.seed, **report})
    return {"reports": reports, "summary": pool_reliance(reports)}


def start_mlflow(spec: dict[str, Any], ctx: JobContext) -> Any:
    """The job's MLflow run, logging its metrics from now on; its troubles are warnings in the job's log."""
    import os

    # MLflow's own defaults retry for minutes; a worker must not hang on a dead tracking server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from worker.mlflow_export import MlflowRun

    def trouble(error: str, retrying: bool) -> None:
        then = "its metrics wait and are sent again later" if retrying else "nothing more is sent"
        ctx.say("warning", f"MLflow live logging failed: {error}; the job goes on, {then}")

    run = MlflowRun(
        tracking_uri=spec["mlflow"]["tracking_uri"],
        experiment=spec["mlflow"]["experiment"],
        job_id=ctx.job_id,
        spec=spec,
        allowed_schemes=ctx.settings.mlflow_allowed_schemes.split(","),
        outbound_allow=ctx.settings.outbound_allow,
        flush_s=ctx.settings.mlflow_flush_s,
        on_trouble=trouble,
        on_recovery=lambda: ctx.say("info", "MLflow takes the live metrics again"),
    )
    run.start()
    return run


def stored_metrics(ctx: JobContext) -> list[dict[str, Any]]:
    """The job's metrics stored already: what an earlier attempt kept for this one, which resumes after them (a
    resumed seed does not report its earlier steps again). None when the database cannot say: MLflow is no
    reason to fail the job."""
    from models import metrics as metrics_repo

    rows: list[dict[str, Any]] = []
    after = None
    try:
        with ctx.db.session() as session:
            while page := metrics_repo.query(session, ctx.job_id, after_id=after, limit=5000):
                rows += [
                    {"step": m.step, "name": m.name, "value": m.value, "seed": m.seed, "split": m.split} for m in page
                ]
                after = page[-1].id
    except Exception as exc:
        log.warning("job %s: its stored metrics not read for MLflow: %s", ctx.job_id, exc)
        return []
    return rows


def finish_mlflow(
    run: Any, spec: dict[str, Any], ctx, history: list[dict[str, Any]], result: dict[str, Any]
) -> dict[str, Any]:
    """Export the rest of the finished job; an unreachable MLflow is recorded, it does not fail the job."""
    target = dict(spec["mlflow"])
    reports = [str(path) for path in sorted(ctx.work_dir.glob("seed*-audit/report.json"))]
    try:
        outcome = {**target, "run_id": run.finish(history, result, reports)}
    except Exception as exc:
        outcome = {**target, "error": f"{type(exc).__name__}: {exc}"}
        ctx.say("warning", f"MLflow export failed: {outcome['error']}")
    else:
        ctx.say("info", f"MLflow run {outcome['run_id']} in experiment {outcome['experiment']}")
    if run.live_error:
        outcome["live_error"] = run.live_error
    return outcome
