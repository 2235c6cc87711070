"""The checks a submission shares between kinds: the quota, the dataset, the memory budget, outbound URLs. Each
refusal is a 4xx naming the field; a kind's own checks live in its module (api/kinds/)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Principal
from api.errors import ApiError, coded_error
from core import outbound
from core.settings import Settings
from models import files as files_repo
from models import jobs as jobs_repo
from models.tables import UserDataset
from starvation import budget, datasets
from starvation.datasets import DATASETS, resolve_params
from starvation.errors import SpecError


def invalid_spec(message: str, details: Any = None) -> ApiError:
    return ApiError(422, "invalid_spec", message, details)


def queue_for(device: str) -> str:
    """GPU work goes to the gpu queue; a worker started by `make serve` listens to both."""
    return "cpu" if device == "cpu" else "gpu"


def check_memory_budget(
    spec: dict[str, Any], settings: Settings, row: UserDataset | None, sweep_stack: int | None = None
) -> None:
    """A train job (or a sweep whose widest stack trains `sweep_stack` settings at once) whose estimated peak memory
    (starvation/budget.py) is over the worker's budget is a 422. `row`: the registered dataset it trains on (None:
    a built-in), as `usable_dataset` read it."""
    name = spec["dataset"]["name"]
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
    except SpecError as exc:  # OverBudget too: its code and details
        raise coded_error(exc) from None


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


def usable_dataset(session: Session, name: str, owner_id: str) -> UserDataset | None:
    """None for a built-in, else the owner's registered dataset, read once for every check of the submission; one
    that is unknown is a 422, one not ready a 409 (an image folder still being checked: nothing half-registered is
    used)."""
    if name in DATASETS:
        return None
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
    return row


def check_builtin_audit_data(name: str, params: dict[str, Any], spurious_attribute: str) -> None:
    """A built-in dataset's params and attribute, checked now rather than failing the job later."""

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


def check_probes_for_format(probes: Sequence[str] | None, fmt: str) -> None:
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
