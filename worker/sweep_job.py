"""Sweep jobs: every setting of a grid x every seed trained in one job (starvation/training/sweep.py), each
network registered as a checkpoint, the chosen setting's networks audited when asked."""

from __future__ import annotations

from typing import Any

from models.kinds import SERVICE_FIELDS
from results.sweep import SweepResult
from worker import audit_job
from worker.context import JobContext
from worker.devices import pick_device
from worker.train_job import audit_checkpoints, initial_weights, register_checkpoints

Result = SweepResult  # what run() returns (worker/kinds.py checks it before it is recorded)


def run(spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from starvation.datasets import DATASETS
    from starvation.training.sweep import sweep

    device = pick_device(spec.get("device"), ctx.settings.device)

    def store_metrics(batch: list[Any]) -> None:
        # Every setting's splits at every evaluation: stored, but too many for a log line (the log says the choice).
        ctx.on_metrics(batch, log_lines=False)

    name = spec["dataset"]["name"]
    registered = name not in DATASETS
    outcome = sweep(
        {k: v for k, v in spec.items() if k not in SERVICE_FIELDS},
        out_dir=ctx.work_dir,
        device=device,
        data_dir=str(ctx.settings.data_dir) if ctx.settings.data_dir else None,
        on_metrics=store_metrics,
        on_progress=lambda fraction: ctx.on_progress(0.9 * fraction if spec.get("audit") else fraction),
        should_stop=ctx.should_stop,
        dataset=audit_job.load_dataset(ctx, spec["dataset"], seed=0, device=device) if registered else None,
        user_datasets=(name,) if registered else (),
        init_weights=initial_weights(ctx, spec.get("init_checkpoint_id")),
    )
    result: dict[str, Any] = {**outcome.result, "device": device}
    for index, (setting, checkpoints) in enumerate(zip(result["settings"], outcome.checkpoints)):
        setting["checkpoints"] = register_checkpoints(ctx, checkpoints, prefix=f"setting{index}-")
    chosen = result["chosen"]
    ctx.say(
        "info",
        f"chose setting {chosen} {result['chosen_params']} by {result['selection']} "
        f"({result['metric']} on {result['scored_on']})",
    )
    if spec.get("audit"):
        result["audit"] = audit_checkpoints(
            ctx, spec["dataset"], outcome.checkpoints[chosen], device, prefix=f"setting{chosen}-"
        )
    return result
