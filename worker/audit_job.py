"""Audit jobs: load a checkpoint without unpickling it, run the probes, keep the report and plots."""

from __future__ import annotations

import json
from typing import Any

from core.object_images import images_in_store, is_store_folder
from core.storage import dataset_index_key, local_copy
from models import files as files_repo
from models import jobs as jobs_repo
from results.audit import AuditResult
from worker.context import JobContext
from worker.devices import pick_device
from worker.files import STORE_PATIENCE_S, add_artifact

Result = AuditResult  # what run() returns (worker/kinds.py checks it before it is recorded)


def load_dataset(ctx: JobContext, dataset_spec: dict[str, Any], seed: int, device: str = "cpu"):
    """A built-in dataset by name, or a dataset the job's owner registered, by id (an image folder streams from
    its checked index, read by GS_DATA_WORKERS processes, pinned for a GPU `device`, from this host's disk or from
    the object store, each image as its check read it: core/object_images.py)."""
    from starvation import datasets

    name = dataset_spec["name"]
    if name in datasets.DATASETS:
        data_dir = str(ctx.settings.data_dir) if ctx.settings.data_dir else None
        return datasets.build(name, dataset_spec.get("params") or {}, seed=seed, data_dir=data_dir)
    with ctx.db.session() as session:
        row = files_repo.get_dataset(session, name, owner_id=ctx.owner_id)
        if row is None:
            raise FileNotFoundError(f"dataset {name!r} is neither built in nor registered by this key")
        path, label, fmt, info, status, error = row.path, row.name, row.format, dict(row.info), row.status, row.error
    settings = ctx.settings
    if status != "ready":
        raise FileNotFoundError(
            f"dataset {name!r} is {status}" + (f": {error}" if error else " (its images are still being checked)")
        )
    if fmt == "image_folder":
        index = datasets.load_index(local_copy(settings, dataset_index_key(name)))
        folder = images_in_store(settings, path, patience_s=STORE_PATIENCE_S) if is_store_folder(path) else path
        return datasets.open_image_folder(
            folder,
            index,
            label,
            info["image_size"],
            max_image_pixels=settings.max_image_pixels,
            workers=settings.data_workers,
            pin_memory=device.startswith("cuda"),
        )
    return datasets.load_npz(
        local_copy(settings, path),
        label,
        max_bytes=settings.max_dataset_bytes,
        max_compression_ratio=settings.max_dataset_compression_ratio,
    )


def audit_model(
    ctx: JobContext, model, dataset, *, spec: dict[str, Any], prefix: str = "", history: list[dict] | None = None
) -> dict[str, Any]:
    """Run the probes, register the plots and the JSON report as artifacts, return the report. `history`: the
    trained network's metric rows, whose NTK alignments over training (if any) become one more plot."""
    from starvation.audit import run_audit
    from starvation.audit.plots import draw_alignment_curves

    out_dir = ctx.work_dir / f"{prefix}audit"
    report = run_audit(
        model,
        dataset,
        probes=spec.get("probes"),
        spurious_attribute=spec.get("spurious_attribute", "color"),
        seed=spec.get("seed", 0),
        out_dir=out_dir,
    )
    report["head"] = model.head_description()
    report["plots"] += draw_alignment_curves(history or [], out_dir)
    report["plots"] = [
        add_artifact(ctx.db, ctx.job_id, out_dir / p, name=f"{prefix}{p}", settings=ctx.settings)
        for p in report["plots"]
    ]
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    add_artifact(ctx.db, ctx.job_id, report_path, name=f"{prefix}report.json", settings=ctx.settings)
    return report


def checkpoint_to_audit(ctx: JobContext, spec: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(path, format, model_info) of the named checkpoint, or the first seed of a train job
    (its safetensors weights: our own network, which needs no jail)."""
    with ctx.db.session() as session:
        if spec.get("checkpoint_id"):
            row = files_repo.get_checkpoint(session, spec["checkpoint_id"], owner_id=ctx.owner_id)
        else:
            job = jobs_repo.get(session, spec["train_job_id"], owner_id=ctx.owner_id)
            rows = (
                [c for c in files_repo.checkpoints_of_job(session, job.id) if c.format == "safetensors"] if job else []
            )
            row = rows[0] if rows else None
        if row is None:
            raise FileNotFoundError("the checkpoint to audit no longer exists")
        return str(local_copy(ctx.settings, row.path)), row.format, dict(row.model_info)


def load_model(
    path: str,
    fmt: str,
    model_info: dict[str, Any],
    device: str,
    layer: str | None = None,
    *,
    settings=None,
    repair: bool = False,
    interrupt=None,
):
    """An AuditableModel. TorchScript and ONNX files are programs: they run in a jail on the
    CPU (pass `settings` for its limits; `repair=True` readies the jail to replace the head; `interrupt`, the
    job's `stop_if_asked`, is called every second while the jail works, so a cancel or deadline ends it).
    Safetensors weights fill one of our own networks, which runs here, on `device`."""
    options: dict[str, Any] = {
        "input_shape": list(model_info["input_shape"]) if model_info.get("input_shape") else None,
        "feature_layer": layer,
    }
    if fmt in ("torchscript", "onnx"):
        from jail import Limits, open_model

        return open_model(
            path,
            fmt,
            limits=Limits.from_settings(settings),
            wall_seconds=settings.jail_call_seconds,
            repair=repair,
            interrupt=interrupt,
            **options,
        )
    from starvation.checkpoints import load_checkpoint

    return load_checkpoint(
        path,
        fmt,
        arch=model_info.get("arch"),
        arch_params=model_info.get("arch_params"),
        num_outputs=model_info.get("num_outputs"),
        **options,
    ).to(device)


def run(spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    path, fmt, model_info = checkpoint_to_audit(ctx, spec)
    device = "cpu" if fmt in ("torchscript", "onnx") else pick_device(spec.get("device"), ctx.settings.device)
    model = load_model(
        path, fmt, model_info, device, spec.get("layer"), settings=ctx.settings, interrupt=ctx.stop_if_asked
    )
    try:
        dataset = load_dataset(ctx, spec["dataset"], spec.get("seed", 0), device)
        ctx.on_progress(0.1)
        report = audit_model(ctx, model, dataset, spec=spec)
    finally:
        getattr(model, "close", lambda: None)()
    report["device"] = device
    return report
