"""What the job routes do, kept out of the handlers: validate a spec, record a job, enqueue it, list,
cancel and follow jobs. The /v1 routes and the dashboard both call these, so a page can never do what
the token could not.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api import streams
from api.deps import Principal, still_valid
from api.dispatch import dispatch
from api.errors import ApiError, not_found, without_server_paths
from api.files_service import stored_bytes
from api.hygiene import MAX_DB_INT, first_unstorable
from api.idempotency import body_hash, replay_or_create
from api.schemas import (
    AuditJobCreate,
    AuditJobOut,
    LogLine,
    LogPage,
    MetricOut,
    RepairJobCreate,
    RepairJobOut,
    SweepJobCreate,
    SweepJobOut,
    TrainJobCreate,
    TrainJobOut,
    job_out_adapter,
)
from core import outbound
from core.settings import Settings
from core.storage import job_key, store
from models import files as files_repo
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import database
from models.status import TERMINAL, JobStatus
from models.tables import ID_LENGTH, Job


def job_warnings(job: Job) -> list[str]:
    """Derived from what is stored (the resolved spec, the result), so every job, old ones too, shows them."""
    from starvation.training import spec_warnings

    warnings = spec_warnings(job.spec) if job.kind in ("train", "sweep") else []
    mlflow = (job.result or {}).get("mlflow") or {}
    if mlflow.get("error"):
        warnings.append(f"MLflow export failed: {without_server_paths(str(mlflow['error']))}")
    elif mlflow.get("live_error"):
        warnings.append(
            f"MLflow did not take the metrics while the job ran ("
            f"{without_server_paths(str(mlflow['live_error']))}); they were sent when it ended"
        )
    return warnings


def job_out(job: Job) -> TrainJobOut | AuditJobOut | RepairJobOut | SweepJobOut:
    """The job as the API shows it; its kind picks the shape of `result`."""
    base = f"/v1/jobs/{job.id}"
    return job_out_adapter.validate_python(
        dict(
            id=job.id,
            kind=job.kind,
            status=job.status,
            progress=job.progress,
            spec=job.spec,
            tags=job.tags,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            worker_id=job.worker_id,
            # The worker's messages are ours, but one may quote a file it could not read.
            error={**job.error, "message": without_server_paths(str(job.error.get("message", "")))}
            if job.error
            else None,
            result=job.result,
            warnings=job_warnings(job),
            links={
                "self": base,
                "metrics": f"{base}/metrics",
                "events": f"{base}/events",
                "report": f"{base}/report",
                "report_html": f"{base}/report.html",
                "artifacts": f"{base}/artifacts",
                "logs": f"{base}/logs",
            },
        )
    )


JOB_ID = re.compile(f"[0-9a-f]{{{ID_LENGTH}}}")  # a uuid4's hex digits (models/tables.py new_id)
# A job id may be shortened to a unique prefix of this many hex digits or more (as `gs jobs` shows them).
MIN_ID_PREFIX = 8


def owned_job(session: Session, job_id: str, owner_id: str) -> Job:
    """The owner's job by its id or a unique prefix of it; 404 when none (or someone else's), 409 when ambiguous."""
    job = jobs_repo.get(session, job_id, owner_id=owner_id)
    if job is None and MIN_ID_PREFIX <= len(job_id) < ID_LENGTH:  # the repository takes hex digits only
        matches = jobs_repo.with_id_prefix(session, job_id, owner_id=owner_id, limit=2)
        if len(matches) > 1:
            raise ApiError(
                409, "ambiguous_id", f"More than one of your jobs has an id starting {job_id!r}; give more of it."
            )
        job = matches[0] if matches else None
    if job is None:
        raise not_found("job", job_id)
    return job


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def invalid_cursor() -> ApiError:
    # 400 as docs/api.md and the OpenAPI document promise: a cursor is an opaque token, and this one is not ours.
    return ApiError(400, "invalid_cursor", "The cursor is not one this API returned.")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(parts, list) or len(parts) != size or first_unstorable(parts, []) is not None:
            raise ValueError
        return parts
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_cursor() from None


def invalid_spec(message: str, details: Any = None) -> ApiError:
    return ApiError(422, "invalid_spec", message, details)


def queue_for(device: str) -> str:
    """GPU work goes to the gpu queue; a worker started by `make serve` listens to both."""
    return "cpu" if device == "cpu" else "gpu"


def resolve_train(spec: dict[str, Any], settings: Settings, user_datasets: list[str]) -> dict[str, Any]:
    from starvation.errors import SpecError
    from starvation.training import resolve_train_spec

    try:
        resolved = resolve_train_spec(spec, user_datasets=user_datasets)
    except SpecError as exc:
        raise invalid_spec(str(exc), field_of(exc)) from None
    if resolved["steps"] > settings.max_steps:
        raise invalid_spec(f"steps is {resolved['steps']}; the limit is {settings.max_steps}.")
    if len(resolved["seeds"]) > settings.max_seeds:
        raise invalid_spec(f"{len(resolved['seeds'])} seeds; the limit is {settings.max_seeds}.")
    return resolved


def resolve_sweep(spec: dict[str, Any], settings: Settings, user_datasets: list[str]) -> tuple[dict[str, Any], dict]:
    """(the spec to store: the resolved train spec with its grid and rule, the resolved sweep); 422 naming the field.
    A sweep trains settings x seeds models: at most `max_sweep_models` (GS_MAX_SWEEP_MODELS)."""
    from starvation.errors import SpecError
    from starvation.training.sweep import resolve_sweep_spec

    try:
        resolved = resolve_sweep_spec(spec, user_datasets=user_datasets)
    except SpecError as exc:
        raise invalid_spec(str(exc), field_of(exc)) from None
    base = resolved["base"]
    if base["steps"] > settings.max_steps:
        raise invalid_spec(f"steps is {base['steps']}; the limit is {settings.max_steps}.", {"field": "spec.steps"})
    models = len(resolved["settings"]) * len(base["seeds"])
    if models > settings.max_sweep_models:
        raise invalid_spec(
            f"the sweep trains {len(resolved['settings'])} settings x {len(base['seeds'])} seeds = "
            f"{models} models; the limit is {settings.max_sweep_models}.",
            {"field": "spec.grid"},
        )
    return {**base, "grid": resolved["grid"], "selection": resolved["selection"]}, resolved


def field_of(exc: Exception) -> dict[str, str] | None:
    """{"field": "spec.model.hidden"} where the science package's error names the parameter."""
    field = getattr(exc, "field", None)
    return {"field": f"spec.{field}"} if field else None


def check_memory_budget(
    session: Session, spec: dict[str, Any], settings: Settings, owner_id: str, sweep_stack: int | None = None
) -> None:
    """A train job (or a sweep whose widest stack trains `sweep_stack` settings at once) whose estimated peak memory
    (starvation/budget.py) is over the worker's budget is a 422."""
    from starvation import budget, datasets
    from starvation.errors import SpecError

    name = spec["dataset"]["name"]
    check_dataset(session, name, owner_id)
    row = None if name in datasets.DATASETS else files_repo.get_dataset(session, name, owner_id=owner_id)
    info = dict(row.info or {}) if row is not None else {}
    streamed = row is not None and row.format == "image_folder"
    if streamed and not spec.get("batch_size"):
        raise invalid_spec(
            f"Dataset {name!r} is an image folder, read from disk in minibatches: set batch_size.",
            {"field": "spec.batch_size"},
        )
    try:
        if row is None:
            data = budget.data_size(spec, str(settings.data_dir) if settings.data_dir else None)
        else:
            data = datasets.registered_size(info["splits"], info["input_shape"], info["num_classes"], streamed=streamed)
        budget.check_train_budget(
            spec, settings.worker_memory_budget_bytes, data, shared_dataset=row is not None, sweep_stack=sweep_stack
        )
    except budget.OverBudget as exc:
        details = {
            "field": f"spec.{exc.field}",
            "estimate_bytes": exc.estimate.total_bytes,
            "budget_bytes": exc.budget_bytes,
            "parts": exc.estimate.parts,
        }
        raise ApiError(422, "over_budget", str(exc), details) from None
    except SpecError as exc:
        raise invalid_spec(str(exc), field_of(exc)) from None


def check_initial_weights(session: Session, spec: dict[str, Any], owner_id: str) -> None:
    """`init_checkpoint_id` names the owner's safetensors checkpoint of the spec's arch (their shapes are checked
    against the network when the job builds it)."""
    field = {"field": "spec.init_checkpoint_id"}
    row = files_repo.get_checkpoint(session, spec["init_checkpoint_id"], owner_id=owner_id)
    if row is None:
        raise invalid_spec(f"No checkpoint {spec['init_checkpoint_id']!r} to start from.", field)
    if row.format != "safetensors":
        raise invalid_spec(
            f"Initial weights come from a safetensors checkpoint (a state dict); this one is {row.format}.", field
        )
    arch = (row.model_info or {}).get("arch")
    if arch != spec["model"]["arch"]:
        raise invalid_spec(
            f"The checkpoint holds weights of arch {arch!r}; the spec trains {spec['model']['arch']!r}.", field
        )


def check_mlflow_uri(uri: str, settings: Settings) -> None:
    try:
        outbound.check_target(uri, settings.mlflow_allowed_schemes.split(","), settings.outbound_allow)
    except outbound.OutboundRefused as exc:
        raise invalid_spec(f"mlflow.tracking_uri is refused: {exc}", {"field": "spec.mlflow.tracking_uri"}) from None


def check_callback_url(url: str, settings: Settings) -> None:
    """Webhooks go to public internet hosts only (or ones the operator admits): no SSRF."""
    try:
        outbound.check_url(url, settings.outbound_allow)
    except outbound.OutboundRefused as exc:
        message = f"callback_url is refused: {exc}"
        raise ApiError(422, "invalid_callback_url", message, {"field": "callback_url"}) from None


def check_dataset(session: Session, name: str, owner_id: str) -> None:
    """A built-in, or a dataset the owner registered that is ready (an image folder still being checked is a 409:
    nothing half-registered is used)."""
    from starvation.datasets import DATASETS

    if name in DATASETS:
        return
    row = files_repo.get_dataset(session, name, owner_id=owner_id)
    if row is None:
        known = ", ".join(sorted(DATASETS))
        raise invalid_spec(f"Unknown dataset {name!r}: use a built-in ({known}) or a registered dataset id.")
    if row.status == "pending":
        raise ApiError(
            409,
            "dataset_not_ready",
            f"Dataset {name!r} is still being checked (status pending); "
            "submit again when GET /v1/datasets/{id} says ready.",
            {"field": "spec.dataset.name"},
        )
    if row.status != "ready":
        raise ApiError(
            409,
            "dataset_not_ready",
            f"Dataset {name!r} failed its check and cannot be used: {row.error}",
            {"field": "spec.dataset.name"},
        )


def check_builtin_audit_data(name: str, params: dict[str, Any], spurious_attribute: str) -> None:
    """A built-in dataset's params and attribute, checked now rather than failing the job later."""
    from starvation.datasets import DATASETS, resolve_params
    from starvation.errors import SpecError

    if name not in DATASETS:
        return  # a registered dataset: no params, one unnamed attribute
    try:
        resolve_params(name, params)
    except SpecError as exc:
        raise invalid_spec(f"dataset.params: {exc}") from None
    declared = DATASETS[name].ATTRIBUTES
    if declared and spurious_attribute not in declared:
        raise invalid_spec(
            f"Dataset {name!r} has spurious attribute(s) {sorted(declared)}, not {spurious_attribute!r}."
        )


def resolve_audit(session: Session, body: AuditJobCreate, owner_id: str) -> dict[str, Any]:
    from starvation.audit import PROBES

    spec = body.spec
    if (spec.checkpoint_id is None) == (spec.train_job_id is None):
        raise invalid_spec("Give exactly one of checkpoint_id and train_job_id.")
    if spec.checkpoint_id is not None:
        checkpoint = files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id)
        if checkpoint is None:
            raise invalid_spec(f"No checkpoint with id {spec.checkpoint_id!r}.")
        check_probes_for_format(spec.probes, checkpoint.format)
    else:
        train_job = jobs_repo.get(session, spec.train_job_id, owner_id=owner_id)
        if train_job is None or train_job.kind != "train":
            raise invalid_spec(f"No train job with id {spec.train_job_id!r}.")
        if train_job.status != JobStatus.SUCCEEDED:
            raise invalid_spec(f"Train job {spec.train_job_id} is {train_job.status}, not succeeded.")
    check_dataset(session, spec.dataset.name, owner_id)
    check_builtin_audit_data(spec.dataset.name, spec.dataset.params, spec.spurious_attribute)
    unknown = sorted(set(spec.probes or []) - set(PROBES))
    if unknown:
        raise invalid_spec(f"Unknown probes {unknown}; known: {sorted(PROBES)}.")
    return spec.model_dump()


def check_probes_for_format(probes: list[str] | None, fmt: str) -> None:
    """Probes that need a network's parameters (`ntk`) cannot run on a TorchScript or ONNX upload, which runs
    sealed in the jail."""
    if "ntk" in (probes or []) and fmt in ("torchscript", "onnx"):
        raise invalid_spec(
            f"The probe 'ntk' needs the network's parameters, which a {fmt} upload does not expose "
            "to us (it runs in the jail); audit a train job's checkpoint or a safetensors upload.",
            {"field": "spec.probes"},
        )


QUOTA_RETRY_AFTER_S = 30


def check_quota(session: Session, principal: Principal, settings: Settings) -> None:
    """One key may have at most GS_MAX_ACTIVE_JOBS_PER_KEY jobs queued or running: past that a 429, not a backlog."""
    active = jobs_repo.active_count(session, principal.owner_id)
    if active >= settings.max_active_jobs_per_key:
        raise ApiError(
            429,
            "too_many_jobs",
            f"This key has {active} jobs queued or running; the limit is {settings.max_active_jobs_per_key}. "
            "Submit more when some have finished.",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )


def resolve_repair(session: Session, body: RepairJobCreate, owner_id: str) -> dict[str, Any]:
    """A repair spec checked against everything knowable now: the checkpoint (or the train job's
    seed) and its format, the dataset and its attribute, the method and its parameters."""
    from starvation.audit import PROBES
    from starvation.datasets import DATASETS
    from starvation.errors import SpecError
    from starvation.repair import UnsupportedMethod, build_repair_method

    spec = body.spec
    if (spec.checkpoint_id is None) == (spec.train_job_id is None):
        raise invalid_spec("Give exactly one of checkpoint_id and train_job_id.")
    if spec.checkpoint_id is not None:
        checkpoint = files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id)
        if checkpoint is None:
            raise invalid_spec(f"No checkpoint with id {spec.checkpoint_id!r}.", {"field": "spec.checkpoint_id"})
        if checkpoint.format not in ("torchscript", "safetensors", "onnx"):
            raise ApiError(
                422,
                "unsupported_format",
                f"Checkpoint {spec.checkpoint_id} is {checkpoint.format}: a repair rewrites a TorchScript, "
                "ONNX or safetensors model.",
                {"field": "spec.checkpoint_id"},
            )
        check_probes_for_format(spec.probes, checkpoint.format)
    else:
        train_job = jobs_repo.get(session, spec.train_job_id, owner_id=owner_id)
        if train_job is None or train_job.kind != "train":
            raise invalid_spec(f"No train job with id {spec.train_job_id!r}.", {"field": "spec.train_job_id"})
        if train_job.status != JobStatus.SUCCEEDED:
            raise invalid_spec(
                f"Train job {spec.train_job_id} is {train_job.status}, not succeeded.", {"field": "spec.train_job_id"}
            )
        seeds = [c.seed for c in files_repo.checkpoints_of_job(session, train_job.id) if c.format == "safetensors"]
        if spec.seed not in seeds:
            raise invalid_spec(
                f"Train job {spec.train_job_id} has no checkpoint of seed {spec.seed} "
                f"(its seeds: {sorted(set(seeds))}).",
                {"field": "spec.seed"},
            )
    name = spec.dataset.name
    check_dataset(session, name, owner_id)
    if name in DATASETS and not DATASETS[name].ATTRIBUTES:
        raise ApiError(
            422,
            "no_attribute",
            f"Dataset {name!r} has no spurious attribute, so there is nothing to repair against: a "
            "repair needs the attribute to balance and to measure reliance.",
            {"field": "spec.dataset"},
        )
    check_builtin_audit_data(name, spec.dataset.params, spec.spurious_attribute)
    check_separate_test_split(session, name, owner_id)
    unknown = sorted(set(spec.probes or []) - set(PROBES))
    if unknown:
        raise invalid_spec(f"Unknown probes {unknown}; known: {sorted(PROBES)}.", {"field": "spec.probes"})
    try:
        method = build_repair_method(spec.method.model_dump())
    except UnsupportedMethod as exc:
        raise ApiError(422, "unsupported_method", str(exc), {"field": "spec.method.name"}) from None
    except SpecError as exc:
        raise invalid_spec(str(exc), field_of(exc)) from None
    if method.WHOLE_NETWORK:
        check_trainable(session, spec, method, owner_id)
    elif spec.checkpoint_id is not None:
        check_head_rewritable(files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id))
    return {**spec.model_dump(), "method": method.resolved()}


def check_head_rewritable(checkpoint) -> None:
    """A head refit writes into the head its upload check found in the graph: none, a tied one or one computed at
    run time is refused now, with the reason that check gave (uploads from before it recorded none are tried)."""
    head = (checkpoint.model_info or {}).get("head")
    if checkpoint.format in ("torchscript", "onnx") and isinstance(head, dict) and not head.get("repairable"):
        instead = " Use finetune_sd, which retrains the whole network." if checkpoint.format == "torchscript" else ""
        raise ApiError(
            422,
            "no_linear_head",
            f"Checkpoint {checkpoint.id} has no head that a refit can rewrite: "
            f"{head.get('not_repairable_because') or 'no linear map makes its output'}.{instead}",
            {"field": "spec.checkpoint_id"},
        )


def check_trainable(session: Session, spec, method, owner_id: str) -> None:
    """A whole-network repair trains our own networks (safetensors checkpoints, train jobs' seeds) and TorchScript
    programs (in their jail, from data in memory), not ONNX graphs; an image folder only in minibatches."""
    checkpoint = None
    if spec.checkpoint_id is not None:
        checkpoint = files_repo.get_checkpoint(session, spec.checkpoint_id, owner_id=owner_id)
        if checkpoint.format == "onnx":
            raise ApiError(
                422,
                "unsupported_format",
                f"{method.NAME} trains the whole network; checkpoint {spec.checkpoint_id} is an ONNX graph, "
                "which this service runs but does not train: use last_layer or last_layer_sd.",
                {"field": "spec.checkpoint_id"},
            )
    row = files_repo.get_dataset(session, spec.dataset.name, owner_id=owner_id)
    if row is not None and row.format == "image_folder":
        if checkpoint is not None and checkpoint.format == "torchscript":
            raise ApiError(
                422,
                "unsupported_format",
                f"{method.NAME} trains a TorchScript model in its jail, which cannot read an image folder: "
                "use last_layer or last_layer_sd, or a checkpoint of our own networks.",
                {"field": "spec.checkpoint_id"},
            )
        if not method.params["batch_size"]:
            raise invalid_spec(
                f"Dataset {spec.dataset.name!r} is an image folder, read in minibatches: set method.batch_size.",
                {"field": "spec.method.batch_size"},
            )


def check_separate_test_split(session: Session, name: str, owner_id: str) -> None:
    """A repair fits and chooses on the training splits only; a registered dataset whose test split
    is also its training data (no `split` column, or no split named train*) cannot be repaired on."""
    from starvation.datasets import DATASETS
    from starvation.datasets.user import train_and_test_splits

    row = None if name in DATASETS else files_repo.get_dataset(session, name, owner_id=owner_id)
    splits = list(((row.info or {}).get("splits") or {}) if row is not None else {})
    if splits:
        train, test = train_and_test_splits(splits)
        if test in train:
            raise ApiError(
                422,
                "no_test_split",
                f"Dataset {name!r} has no test split apart from its training data (splits: {splits}); "
                "a repair fits on splits named train* and audits on a separate 'test' split.",
                {"field": "spec.dataset"},
            )


def submit(
    session: Session,
    body: TrainJobCreate | AuditJobCreate | RepairJobCreate | SweepJobCreate,
    principal: Principal,
    settings: Settings,
) -> Job:
    check_quota(session, principal, settings)
    if isinstance(body, (TrainJobCreate, SweepJobCreate)):
        given = body.spec.model_dump(exclude_unset=True)  # not JSON mode: that would make a NaN null, i.e. a default
        # The service's business, not the engine's: kept beside the resolved spec.
        service_fields = {
            k: given.pop(k) for k in ("timeout_s", "mlflow", "init_checkpoint_id") if given.get(k) is not None
        }
        owned = [d.id for d in files_repo.list_datasets(session, owner_id=principal.owner_id)]
    if isinstance(body, TrainJobCreate):
        spec = resolve_train(given, settings, owned) | service_fields
        check_memory_budget(session, spec, settings, principal.owner_id)
        if "init_checkpoint_id" in spec:
            check_initial_weights(session, spec, principal.owner_id)
    elif isinstance(body, SweepJobCreate):
        from starvation.training.sweep import stacks

        if "mlflow" in service_fields:
            raise invalid_spec(
                "A sweep does not export to MLflow (yet); train its chosen setting with mlflow.",
                {"field": "spec.mlflow"},
            )
        if "init_checkpoint_id" in service_fields:
            raise invalid_spec(
                "A sweep starts from fresh weights (yet); train from init_checkpoint_id instead.",
                {"field": "spec.init_checkpoint_id"},
            )
        if "selection" in given:
            given["selection"] = str(given["selection"])
        spec, resolved = resolve_sweep(given, settings, owned)
        spec |= service_fields
        # The sweep saves and frees each stack as it ends: it holds the data once and one stack's networks at a time.
        # Stacks may differ in shape (a grid over model.*): each is checked with its own network.
        for group in stacks(resolved["settings"]):
            network = resolved["settings"][group[0]]["spec"]["model"]
            check_memory_budget(
                session, {**spec, "model": network}, settings, principal.owner_id, sweep_stack=len(group)
            )
    elif isinstance(body, RepairJobCreate):
        spec = resolve_repair(session, body, principal.owner_id)
    else:
        spec = resolve_audit(session, body, principal.owner_id)
    # Last, the checks that ask DNS (seconds when a resolver is slow): a spec refused on its own merits never waits.
    if spec.get("mlflow"):
        check_mlflow_uri(spec["mlflow"]["tracking_uri"], settings)
    if body.callback_url:
        check_callback_url(str(body.callback_url), settings)
    return jobs_repo.create(
        session,
        owner_id=principal.owner_id,
        kind=body.kind,
        spec=spec,
        tags=body.tags,
        queue=queue_for(spec.get("device", "auto")),
        callback_url=str(body.callback_url) if body.callback_url else None,
    )


def submit_once(
    session: Session,
    body: TrainJobCreate | AuditJobCreate,
    principal: Principal,
    settings: Settings,
    idempotency_key: str | None,
) -> JSONResponse:
    """Record the job (or replay the first answer given to this Idempotency-Key), then send it."""

    def create() -> tuple[int, Any]:
        job = submit(session, body, principal, settings)
        return 202, job_out(job)

    response = replay_or_create(session, principal, idempotency_key, body_hash(body), create)
    # The row is committed before the message is sent: the database is the truth.
    session.commit()
    # In the request's own session: a second session per request would let concurrent submissions exhaust the
    # connection pool and stall. The job goes out now if its queue has room, else when a worker frees up.
    dispatch(session, settings)
    return response


def tag_filters(items: list[str]) -> dict[str, str]:
    """["team:x", ...] of ?tag= as {"team": "x"}."""
    tags: dict[str, str] = {}
    for item in items:
        if ":" not in item:
            raise ApiError(400, "invalid_tag_filter", f"Tag filter {item!r} is not of the form k:v.")
        key, value = item.split(":", 1)
        tags[key] = value
    return tags


def list_jobs(
    session: Session,
    owner_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    kind: str | None = None,
    status: JobStatus | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the owner's jobs, newest first, and the cursor of the next page (None on the last)."""
    after = job_after(cursor) if cursor else None
    page = jobs_repo.list_page(
        session, owner_id=owner_id, limit=limit, after=after, kind=kind, status=status, tags=tags or {}
    )
    items, more = page[:limit], len(page) > limit
    return items, encode_cursor(items[-1].created_at.isoformat(), items[-1].id) if more else None


def job_after(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a jobs cursor continues after: a UTC time and a job id, as `list_jobs` wrote them."""
    created_at, job_id = decode_cursor(cursor, 2)
    try:
        after = datetime.fromisoformat(created_at)
        if after.tzinfo is None or not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ValueError
        return after.astimezone(UTC), job_id
    except (TypeError, ValueError, OverflowError):  # OverflowError: an offset that moves it past year 1 or 9999
        raise invalid_cursor() from None


def after_row(cursor: str | None) -> int | None:
    """The row a metrics or logs cursor continues after (None: from the start)."""
    if not cursor:
        return None
    (after_id,) = decode_cursor(cursor, 1)
    if type(after_id) is not int or not 0 <= after_id <= MAX_DB_INT:  # not isinstance: JSON's true is a bool
        raise invalid_cursor()
    return after_id


def log_line(row: Any) -> dict[str, Any]:
    line = LogLine.model_validate(row, from_attributes=True).model_dump(mode="json")
    # The worker's lines are ours, but one may quote an error that names a file on this server.
    return {**line, "message": without_server_paths(line["message"])}


def logs_page(session: Session, job_id: str, *, cursor: str | None, limit: int) -> LogPage:
    rows = logs_repo.query(session, job_id, after_id=after_row(cursor), limit=limit + 1)
    items, more = rows[:limit], len(rows) > limit
    return LogPage(items=[log_line(r) for r in items], next_cursor=encode_cursor(items[-1].id) if more else None)


def follow_logs(
    job_id: str, cursor: str | None, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's log as JSON lines, as they are written, until the job has finished and every line was sent
    (or the key is revoked). The caller has checked the owner; the cursor is checked now."""
    after_id = after_row(cursor)

    def poll() -> tuple[str, bool]:
        nonlocal after_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            rows = logs_repo.query(session, job_id, after_id=after_id, limit=1000)
        if rows:
            after_id = rows[-1].id
        ended = state is None or (state[0] in TERMINAL and not rows)
        return "".join(json.dumps(log_line(r)) + "\n" for r in rows), ended

    return streams.polled(poll, is_disconnected)


def cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once, a running one asked to stop; a finished one is a 409."""
    if job.status in TERMINAL or not jobs_repo.request_cancel(session, job):
        raise ApiError(409, "job_finished", f"Job {job.id} is already {job.status}.")


def follow(
    session: Session, job_id: str, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's Server-Sent Events, once the owner is checked: `status` on every change of status or
    progress, `metrics` and `logs` for new rows, `end` when it has finished and everything was sent.
    A revoked key's stream ends without `end`."""
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
    last_state, last_metric_id, last_log_id = None, None, None

    def poll() -> tuple[str, bool]:
        nonlocal last_state, last_metric_id, last_log_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            if state is None:
                return "", True
            state = (state[0], round(state[1], 4))
            job = jobs_repo.get(session, job_id) if state != last_state else None  # the whole row only when news
            rows = metrics_repo.query(session, job_id, after_id=last_metric_id, limit=5000)
            lines = logs_repo.query(session, job_id, after_id=last_log_id, limit=1000)
        events = []
        if job is not None:
            last_state = (job.status, round(job.progress, 4))
            events.append(f"event: status\ndata: {json.dumps(job_out(job).model_dump(mode='json'))}\n\n")
        if rows:
            last_metric_id = rows[-1].id
            payload = [MetricOut.model_validate(m, from_attributes=True).model_dump() for m in rows]
            events.append(f"event: metrics\ndata: {json.dumps(payload)}\n\n")
        if lines:
            last_log_id = lines[-1].id
            events.append(f"event: logs\ndata: {json.dumps([log_line(r) for r in lines])}\n\n")
        ended = state[0] in TERMINAL and not rows and not lines
        if ended:
            events.append("event: end\ndata: {}\n\n")
        return "".join(events), ended

    return streams.polled(poll, is_disconnected)


def delete(session: Session, job: Job, settings: Settings) -> None:
    """A finished job, its files and checkpoints; one still queued or running is a 409."""
    if job.status not in TERMINAL:
        raise ApiError(409, "job_active", f"Job {job.id} is {job.status}; cancel it first.")
    store(settings).delete_prefix(job_key(job.id))
    for checkpoint in files_repo.checkpoints_of_job(session, job.id):
        session.delete(checkpoint)
    jobs_repo.remove(session, job)


def report_of(job: Job) -> dict[str, Any]:
    """The audit report: an audit job's result, or the first seed's report of an audited train job, or of an
    audited sweep's chosen setting (with every seed's report and the reliance pooled over seeds);
    for a repair job, the reports before and after and what the repair did."""
    result = job.result or {}
    if job.kind == "audit" and job.status == JobStatus.SUCCEEDED:
        return result
    if job.kind == "repair" and job.status == JobStatus.SUCCEEDED:
        return {**result["reports"], "repair": result["repair"]}
    reports = result.get("audit", {}).get("reports") if job.kind in ("train", "sweep") else None
    if reports:
        return {**reports[0], "per_seed": reports, "pooled_summary": result["audit"].get("summary")}
    raise ApiError(404, "no_report", f"Job {job.id} has no report ({job.kind}, {job.status}; train with audit: true).")


def report_html(session: Session, job: Job) -> str:
    from starvation.audit import standalone_page

    return standalone_page(*report_body(session, job))


def report_body(session: Session, job: Job) -> tuple[str, str]:
    """The report's title and its sections as HTML, without a page around them (the dashboard has its own)."""
    from starvation.audit import render_repair_body, render_report_body

    report = report_of(job)
    if job.kind == "repair":
        plots = [*report["before"].get("plots", []), *report["after"].get("plots", [])]
        return f"Repair report: job {job.id}", render_repair_body(
            report["before"], report["after"], report["repair"], _plot_urls(session, job, plots)
        )
    return (
        f"Reliance report: {job.kind} job {job.id}",
        render_report_body(report, _plot_urls(session, job, report.get("plots", []))),
    )


def _plot_urls(session: Session, job: Job, names: list[str]) -> dict[str, str]:
    # Plots inline as data URIs: the page needs no second authenticated request per image.
    urls = {}
    for name in names:
        artifact = files_repo.get_artifact(session, job.id, name)
        if artifact is not None:
            try:
                data = base64.b64encode(stored_bytes(artifact.path)).decode()
            except FileNotFoundError:
                continue
            urls[name] = f"data:{artifact.media_type};base64,{data}"
    return urls
