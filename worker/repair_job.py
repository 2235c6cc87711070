"""Repair jobs: audit a checkpoint, refit its head on training-split features, register the new
checkpoint with its parent, audit it again on the same data, probes and seed (docs/repair.md).

A TorchScript or ONNX checkpoint is a program: its features are read, its head replaced (or, for
`finetune_sd`, a TorchScript model trained) and the model re-serialised inside its jail; the new
file is only ever loaded again in a jail. Our own safetensors networks are repaired here.
"""

from __future__ import annotations

import copy
from typing import Any

from core.storage import local_copy
from models import files as files_repo
from models import jobs as jobs_repo
from results.repair import RepairResult
from worker import audit_job
from worker.context import JobCancelled, JobContext
from worker.devices import pick_device
from worker.files import add_artifact, add_checkpoint

CHECK_ROWS = 256  # examples on which the repaired model, written and read again, must give the logits it was made with
FINETUNE_CHUNK = 50  # a jailed fine-tuning's updates per call: progress and cancellation between them

Result = RepairResult  # what run() returns (worker/kinds.py checks it before it is recorded)


def run(spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from starvation.checkpoints import CheckpointError
    from starvation.errors import SpecError
    from starvation.repair import build_repair_method

    parent_id, path, fmt, model_info = checkpoint_to_repair(ctx, spec)
    method = build_repair_method(spec.get("method"))
    if fmt not in ("torchscript", "safetensors", "onnx") or (method.WHOLE_NETWORK and fmt == "onnx"):
        raise CheckpointError("unsupported_format", f"{method.NAME} cannot repair a {fmt} model.")
    seed = spec.get("seed", 0)
    audit_spec = {
        "probes": spec.get("probes"),
        "spurious_attribute": spec.get("spurious_attribute", "color"),
        "seed": seed,
    }
    foreign = fmt in ("torchscript", "onnx")
    device = "cpu" if foreign else pick_device(spec.get("device"), ctx.settings.device)
    dataset = audit_job.load_dataset(ctx, spec["dataset"], seed)
    if dataset.test_split in dataset.train_splits:
        raise SpecError(
            f"dataset {dataset.name!r} has no test split apart from its training data; a repair fits "
            "and chooses on the training splits only, so it needs a separate 'test' split to audit on"
        )
    model = audit_job.load_model(
        path,
        fmt,
        model_info,
        device,
        spec.get("layer"),
        settings=ctx.settings,
        repair=foreign,
        interrupt=ctx.stop_if_asked,
    )
    if method.WHOLE_NETWORK:  # it closes the model
        return finetune(ctx, spec, method, parent_id, model, path, fmt, model_info, dataset, audit_spec, device, seed)
    try:
        old_head, features, train = read_head_and_features(model, dataset)
        ctx.on_progress(0.1)
        stop_if_asked(ctx)
        before = audit_job.audit_model(ctx, model, dataset, spec=audit_spec, prefix="before-")
        ctx.on_progress(0.4)
        stop_if_asked(ctx)
        repaired = method.repair(training_features(features, train, dataset), old_head, seed=seed)
        ctx.on_progress(0.6)
        stop_if_asked(ctx)
        new_ids, new_path = save_repaired(ctx, model, fmt, model_info, repaired.head, parent_id, seed)
    finally:
        getattr(model, "close", lambda: None)()

    after_model = audit_job.load_model(
        str(new_path), fmt, model_info, device, spec.get("layer"), settings=ctx.settings, interrupt=ctx.stop_if_asked
    )
    try:
        check_repaired_model(after_model, repaired.head, train.x[:CHECK_ROWS], features[:CHECK_ROWS])
        after = audit_job.audit_model(ctx, after_model, dataset, spec=audit_spec, prefix="after-")
    finally:
        getattr(after_model, "close", lambda: None)()
    ctx.on_progress(1.0)
    repair = {
        "checkpoint_id": new_ids[fmt],
        "checkpoint_ids": new_ids,
        "parent_checkpoint_id": parent_id,
        "format": fmt,
        "method": repaired.method,
        "selection": repaired.selection,
        "changed": repaired.changed,
        "feature_layer": model.feature_layer,
        "head": model.head_description(),
        "head_shape": list(repaired.head.weight.shape),
    }
    if before["summary"].get("verdict") == "low":
        repair["note"] = (
            "the audit before the repair found low reliance on the spurious attribute: there was nothing to repair"
        )
    return {
        **{k: repair[k] for k in ("checkpoint_id", "parent_checkpoint_id", "method", "selection")},
        "before": summary_of(before),
        "after": summary_of(after),
        "repair": repair,
        "reports": {"before": before, "after": after},
        "device": device,
    }


def finetune(
    ctx: JobContext,
    spec: dict[str, Any],
    method,
    parent_id: str,
    model: Any,
    path: str,
    fmt: str,
    model_info: dict[str, Any],
    dataset,
    audit_spec: dict[str, Any],
    device: str,
    seed: int,
) -> dict[str, Any]:
    """A whole-network repair (`starvation.repair.finetune`): the audit before, the candidates' runs (our own network
    through `train`; a TorchScript program in its jail), the kept one registered with its parent and audited after.
    `model`: the loaded parent, closed here."""
    from safetensors.torch import load_file

    from starvation import datasets
    from starvation.repair.finetune import finetune_sd, train_candidates

    foreign = fmt == "torchscript"
    try:
        before = audit_job.audit_model(ctx, model, dataset, spec=audit_spec, prefix="before-")
        stop_if_asked(ctx)
        if foreign:
            run = jailed_candidates(ctx, model, method, seed)
        else:
            run = train_candidates(
                method,
                spec["dataset"],
                dataset,
                model_info,
                load_file(path),
                seed,
                out_dir=ctx.work_dir / "repaired",
                device=device,
                data_dir=str(ctx.settings.data_dir) if ctx.settings.data_dir else None,
                registered=spec["dataset"]["name"] not in datasets.DATASETS,
                should_stop=ctx.should_stop,
            )
        done = finetune_sd(
            method,
            dataset,
            run,
            original=model.logits,
            on_progress=lambda fraction: ctx.on_progress(0.2 + 0.6 * fraction),
        )
        feature_layer, head_shape = model.feature_layer, head_shape_of(model)
    finally:
        getattr(model, "close", lambda: None)()
    if foreign:
        after_model, ids = registered_finetuned(ctx, done, model_info, parent_id, seed)
    else:
        after_model, checkpoint = done.kept
        ids = register(
            ctx,
            {"safetensors": checkpoint.safetensors_path, "torchscript": checkpoint.torchscript_path},
            model_info,
            parent_id,
            seed,
        )
    try:
        after = audit_job.audit_model(ctx, after_model, dataset, spec=audit_spec, prefix="after-")
    finally:
        getattr(after_model, "close", lambda: None)()
    ctx.on_progress(1.0)
    splits, held = list(dataset.train_splits), len(done.validation)
    selection = {
        "fitted_on": {
            "data": "training splits less the validation part (the whole network, from the checkpoint)",
            "splits": splits,
            "n": sum(len(dataset.splits[s]) for s in splits) - held,
        },
        "chosen_on": {
            "data": "validation part held out of the training splits",
            "splits": splits,
            "n": held,
            "fraction": method.params["validation_fraction"],
            "seed": 0,
            "stratified_by": "none (rows drawn per training split)",
            "criterion": method.params["criterion"],
        },
        "test_split_used": False,
        "candidates": done.candidates,
        "chosen": {"sd_lambda": done.candidates[done.chosen]["sd_lambda"]},
        "chosen_validation": done.candidates[done.chosen]["validation"],
        "original_head": {
            "validation": done.original_validation,
            "note": "the checkpoint as it was, for reference only: it was trained on these examples",
        },
        "changed": True,
    }
    repair = {
        "checkpoint_id": ids[fmt],
        "checkpoint_ids": ids,
        "parent_checkpoint_id": parent_id,
        "format": fmt,
        "method": method.resolved(),
        "selection": selection,
        "changed": True,
        "feature_layer": feature_layer,
        "head_shape": head_shape,
    }
    return {
        **{k: repair[k] for k in ("checkpoint_id", "parent_checkpoint_id", "method", "selection")},
        "before": summary_of(before),
        "after": summary_of(after),
        "repair": repair,
        "reports": {"before": before, "after": after},
        "device": device,
    }


def jailed_candidates(ctx: JobContext, model, method, seed: int):
    """`finetune_sd`'s candidate runs of a TorchScript model, in its jail, `FINETUNE_CHUNK` updates per call (progress
    and cancellation between them); each keeps (its file's bytes, its logits on the first `CHECK_ROWS` held-out
    rows)."""
    import torch

    from starvation import datasets
    from starvation.errors import SpecError

    def run(held, sd_lambda: float, progress):
        train = held.train_data()
        if not isinstance(train.x, torch.Tensor):
            raise SpecError("finetune_sd trains a TorchScript model in its jail, which cannot read an image folder")
        model.finetune(
            train.x,
            train.y,
            sd_lambda=sd_lambda,
            lr=method.params["lr"],
            batch_size=method.params["batch_size"],
            seed=seed,
        )
        steps = method.params["steps"]
        for start in range(0, steps, FINETUNE_CHUNK):
            model.finetune_steps(min(FINETUNE_CHUNK, steps - start))
            progress(min(start + FINETUNE_CHUNK, steps) / steps)
            stop_if_asked(ctx)
        check_x = held.splits[datasets.HOLDOUT_SPLIT].x[:CHECK_ROWS]
        return model.logits, (
            model.model_bytes(max_bytes=ctx.settings.max_upload_bytes),
            check_x,
            model.logits(check_x),
        )

    return run


def head_shape_of(model) -> list[int] | None:
    """[outputs, features] of the model's last linear layer; None when it has none (a fine-tuning needs none)."""
    from jail import JailError
    from starvation.repair import NoLinearHead, read_head

    try:
        head = model.head() if hasattr(model, "head") else read_head(model.module)
    except (JailError, NoLinearHead):
        return None
    return list(head.weight.shape)


def registered_finetuned(ctx: JobContext, done, model_info: dict[str, Any], parent_id: str, seed: int):
    """The kept TorchScript candidate written, registered with its parent and opened in a new jail, checked to give
    the logits it was chosen with."""
    data, check_x, expected = done.kept
    out_dir = ctx.work_dir / "repaired"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "repaired.torchscript.pt"
    path.write_bytes(data)
    ids = register(ctx, {"torchscript": path}, model_info, parent_id, seed)
    after_model = audit_job.load_model(
        str(path), "torchscript", model_info, "cpu", settings=ctx.settings, interrupt=ctx.stop_if_asked
    )
    try:
        check_same_outputs(after_model, check_x, expected, "the fine-tuned network it chose")
    except BaseException:
        after_model.close()
        raise
    return after_model, ids


def checkpoint_to_repair(ctx: JobContext, spec: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
    """(id, path, format, model_info) of the named checkpoint, or of the train job's seed (its
    safetensors weights: our own network)."""
    with ctx.db.session() as session:
        if spec.get("checkpoint_id"):
            row = files_repo.get_checkpoint(session, spec["checkpoint_id"], owner_id=ctx.owner_id)
        else:
            job = jobs_repo.get(session, spec["train_job_id"], owner_id=ctx.owner_id)
            rows = (
                [
                    c
                    for c in files_repo.checkpoints_of_job(session, job.id)
                    if c.format == "safetensors" and c.seed == spec.get("seed", 0)
                ]
                if job
                else []
            )
            row = rows[0] if rows else None
        if row is None:
            raise FileNotFoundError("the checkpoint to repair no longer exists")
        return row.id, str(local_copy(ctx.settings, row.path)), row.format, dict(row.model_info)


def read_head_and_features(model, dataset):
    """The model's head and its penultimate features on the pooled training splits (never the
    test split), checked to be what turns those features into the model's logits."""
    import torch

    from starvation.checkpoints import CheckpointError
    from starvation.datasets import batched
    from starvation.repair import NoLinearHead, check_head_feeds_output, finetune_hint, read_head

    train = dataset.train_data()
    logits = batched(model.logits, train.x[:CHECK_ROWS], model.device, 1024)
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            "non_finite_output", "The model's outputs are NaN or infinite; a head cannot be refitted to match them."
        )
    if model.feature_layer is None:
        reason = model.no_features_reason or "the model exposes no feature layer"
        raise NoLinearHead(f"{reason}{finetune_hint(model.format)}")
    old_head = model.head() if hasattr(model, "head") else read_head(model.module)
    features = batched(model.features, train.x, model.device, 1024)
    check_head_feeds_output(old_head, features[:CHECK_ROWS], logits)
    return old_head, features, train


def training_features(features, train, dataset):
    from starvation.repair import TrainingFeatures

    return TrainingFeatures(features=features, y=train.y, attribute=train.attribute, splits=list(dataset.train_splits))


def save_repaired(ctx: JobContext, model, fmt: str, model_info: dict[str, Any], head, parent_id: str, seed: int):
    """Write the repaired model in the input's format family and register it with its parent.
    Returns ({format: checkpoint id}, path of the file in the input's format)."""
    from starvation.checkpoints import save_checkpoint
    from starvation.repair import replace_head

    out_dir = ctx.work_dir / "repaired"
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt in ("torchscript", "onnx"):
        path = out_dir / ("repaired.torchscript.pt" if fmt == "torchscript" else "repaired.onnx")
        path.write_bytes(model.with_head(head, max_bytes=ctx.settings.max_upload_bytes))
        files = {fmt: path}
    else:
        module = copy.deepcopy(model.module).cpu()
        replace_head(module, head)
        saved = save_checkpoint(
            module,
            out_dir,
            seed=seed,
            arch=model_info["arch"],
            arch_params=model_info.get("arch_params") or {},
            input_shape=model_info["input_shape"],
            num_outputs=model_info["num_outputs"],
        )
        files = {"safetensors": saved.safetensors_path, "torchscript": saved.torchscript_path}
    return register(ctx, files, model_info, parent_id, seed), files[fmt]


def register(
    ctx: JobContext, files: dict[str, Any], model_info: dict[str, Any], parent_id: str, seed: int
) -> dict[str, str]:
    """The repaired model's files ({format: path}) as checkpoints with their parent, and as the job's artifacts;
    {format: checkpoint id}."""
    ids = {}
    for file_format, path in files.items():
        ids[file_format] = add_checkpoint(
            ctx.db,
            job_id=ctx.job_id,
            owner_id=ctx.owner_id,
            seed=seed,
            fmt=file_format,
            path=path,
            model_info=model_info,
            parent_checkpoint_id=parent_id,
            settings=ctx.settings,
        )
        add_artifact(ctx.db, ctx.job_id, path, settings=ctx.settings)
    return ids


def check_repaired_model(model, head, x, features) -> None:
    """The written model must give the fitted head's logits: the head really was replaced."""
    check_same_outputs(model, x, head.logits(features.to(head.weight.dtype)).float(), "the fitted head")


def check_same_outputs(model, x, expected, what: str) -> None:
    import torch

    from starvation.checkpoints import CheckpointError
    from starvation.datasets import batched
    from starvation.errors import SpecError

    logits = batched(model.logits, x, model.device, 1024)
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            "non_finite_output", "The repaired model's outputs are NaN or infinite; the repair was not applied."
        )
    gap = float((logits.float() - expected.float()).abs().max()) if len(x) else 0.0
    if not gap <= 1e-3 * max(1.0, float(expected.abs().max())):  # `not <=`: a NaN gap fails too
        raise SpecError(f"the repaired model does not give the outputs of {what}; the repair was not applied")


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The reliance summary of a report, with the numbers a before/after table shows."""
    counterfactual = report.get("counterfactual") or {}
    probe = report.get("linear_probe") or {}
    return {
        **report["summary"],
        "average_accuracy": report.get("average_accuracy"),
        "worst_group_accuracy": report.get("worst_group_accuracy"),
        "flip_rate": counterfactual.get("flip_rate"),
        "core_accuracy": probe.get("core_accuracy"),
        "spurious_accuracy": probe.get("spurious_accuracy"),
    }


def stop_if_asked(ctx: JobContext) -> None:
    if ctx.should_stop():
        raise JobCancelled
