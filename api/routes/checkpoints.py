"""Checkpoints: uploaded models (checked, never unpickled) and those train jobs produce."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import ApiError, not_found
from api.files_service import check_storage_quota, stored_file
from api.files_service import delete_checkpoint as delete_stored_checkpoint
from api.idempotency import replay_if_seen, replay_or_create
from api.responses import CREATE_ERRORS, KEYED_ERRORS, error_responses, links_to, media_response
from api.schemas import BinaryUpload, CheckpointOut, CheckpointPage
from api.uploads import save_limited
from core.paths import upload_dir
from core.storage import checkpoint_key, store
from models import files as files_repo
from models.tables import Checkpoint, new_id

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=error_responses(*KEYED_ERRORS))

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
TO_THE_CHECKPOINT = links_to("checkpoint_id", "get_checkpoint", "download_checkpoint", "delete_checkpoint")


def checkpoint_out(checkpoint: Checkpoint) -> CheckpointOut:
    return CheckpointOut.model_validate(checkpoint, from_attributes=True)


def parse_json_field(name: str, raw: str | None, kind: type) -> Any:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ApiError(422, "invalid_request", f"{name} is not valid JSON.") from None
    if not isinstance(value, kind):
        raise ApiError(422, "invalid_request", f"{name} must be a JSON {kind.__name__}.")
    return value


# 200: the same bytes again (no second check); 413: too large, or past the key's stored bytes; 429: too many model
# checks at once (api/sandbox.py), or past the key's count of checkpoints.
@router.post(
    "",
    status_code=201,
    response_model=CheckpointOut,
    responses={
        **error_responses(*CREATE_ERRORS, 429),
        201: TO_THE_CHECKPOINT,
        200: {
            "model": CheckpointOut,
            "description": "The same bytes, format and model card were uploaded before: "
            "that checkpoint, not checked again.",
            **TO_THE_CHECKPOINT,
        },
    },
)
async def upload_checkpoint(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    file: Annotated[BinaryUpload, File()],
    format: Annotated[Literal["torchscript", "onnx", "safetensors"], Form()],
    arch: Annotated[str | None, Form()] = None,
    arch_params: Annotated[str | None, Form(description="JSON object")] = None,
    input_shape: Annotated[str | None, Form(description="JSON list, e.g. [2, 14, 14]")] = None,
    num_classes: Annotated[int, Form(ge=2, le=100_000)] = 2,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    from api.sandbox import same_upload, validate_checkpoint

    params = parse_json_field("arch_params", arch_params, dict) or {}
    shape = parse_json_field("input_shape", input_shape, list) or [2, 14, 14]
    if not all(isinstance(d, int) and 0 < d <= 4096 for d in shape) or not 1 <= len(shape) <= 4:
        raise ApiError(422, "invalid_request", "input_shape must list 1 to 4 positive sizes (no batch axis).")
    if format == "safetensors" and not arch:
        raise ApiError(422, "invalid_request", "A safetensors upload needs `arch` (a built-in architecture).")
    if format == "safetensors":  # bounded like a train spec's model, before anything is built
        from starvation.errors import SpecError
        from starvation.networks import check_arch_params

        try:
            check_arch_params(arch, params, input_shape=tuple(shape) if input_shape else None)
        except SpecError as exc:
            raise ApiError(422, "invalid_request", str(exc), details={"field": getattr(exc, "field", None)}) from None
    folder = upload_dir(settings, "checkpoints")
    tmp_path, sha256, size = await save_limited(file, folder, settings.max_upload_bytes)
    fields = {"format": format, "arch": arch, "arch_params": params, "input_shape": shape, "num_classes": num_classes}
    request_hash = json.dumps({"sha256": sha256, **fields}, sort_keys=True)

    model_card = {k: v for k, v in fields.items() if k != "format"}

    def answered_before() -> JSONResponse | None:  # a retry, or the same bytes again: no second model check
        if (replayed := replay_if_seen(session, principal, idempotency_key, request_hash)) is not None:
            return replayed
        twin = files_repo.uploaded_twin(
            session,
            owner_id=principal.owner_id,
            sha256=sha256,
            format=format,
            model_info=model_card,
        )
        if twin is not None:
            return JSONResponse(checkpoint_out(twin).model_dump(mode="json"), 200)
        check_storage_quota(session, principal, settings, adding="checkpoints", adding_bytes=size)  # before the jail
        return None

    placed: list[str] = []  # the key `create` stored, removed if a concurrent twin won

    def create() -> tuple[int, Any]:
        checkpoint_id = new_id()
        key = checkpoint_key(checkpoint_id, SUFFIX[format])
        store(settings).put(key, tmp_path, move=True)
        placed.append(key)
        checkpoint = files_repo.add_checkpoint(
            session,
            id=checkpoint_id,
            owner_id=principal.owner_id,
            format=format,
            path=key,
            sha256=sha256,
            size_bytes=size,
            model_info={**model_card, "num_outputs": info.get("num_outputs"), "head": info.get("head")},
        )
        return 201, checkpoint_out(checkpoint)

    def keep() -> JSONResponse:  # committed here, so a duplicate waiting for its turn finds it
        response = replay_or_create(
            session,
            principal,
            idempotency_key,
            request_hash,
            create,
            discard=lambda: [store(settings).delete(key) for key in placed],
        )
        session.commit()
        return response

    try:
        async with same_upload.turn(principal.owner_id, request_hash):
            if (answer := await run_in_threadpool(answered_before)) is not None:
                return answer
            session.commit()  # no database connection is held while the model is checked
            info = await run_in_threadpool(
                validate_checkpoint,
                principal.owner_id,
                settings,
                path=tmp_path,
                fmt=format,
                arch=arch,
                arch_params=params,
                input_shape=list(shape),
                num_classes=num_classes,
                max_bytes=settings.max_upload_bytes,
            )
            return await run_in_threadpool(keep)
    finally:
        tmp_path.unlink(missing_ok=True)  # kept only if renamed into place


@router.get("", response_model=CheckpointPage)
def list_checkpoints(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
):
    rows = files_repo.list_checkpoints(session, owner_id=principal.owner_id, limit=limit, after_id=cursor)
    items = rows[:limit]
    return CheckpointPage(
        items=[checkpoint_out(c) for c in items],
        next_cursor=items[-1].id if len(rows) > limit else None,
    )


@router.get("/{checkpoint_id}", response_model=CheckpointOut, responses=error_responses(404))
def get_checkpoint(checkpoint_id: str, session: SessionDep, principal: PrincipalDep):
    checkpoint = files_repo.get_checkpoint(session, checkpoint_id, owner_id=principal.owner_id)
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id)
    return checkpoint_out(checkpoint)


@router.get(
    "/{checkpoint_id}/file",
    response_class=Response,
    responses={
        **media_response("The checkpoint's file.", "application/octet-stream", binary=True),
        **error_responses(404),
    },
)
def download_checkpoint(checkpoint_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    checkpoint = files_repo.get_checkpoint(session, checkpoint_id, owner_id=principal.owner_id)
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id)
    filename = f"{checkpoint.id}{SUFFIX.get(checkpoint.format, '')}"
    return stored_file(settings, checkpoint.path, media_type="application/octet-stream", filename=filename)


@router.delete("/{checkpoint_id}", status_code=204, responses=error_responses(404, 409))
def delete_checkpoint(checkpoint_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    """Delete a checkpoint, uploaded or made by a job (then also that job's artifact of the same file), and its
    file. 409 `checkpoint_in_use` while a queued or running job names it (or its train job's seeds)."""
    checkpoint = files_repo.get_checkpoint(session, checkpoint_id, owner_id=principal.owner_id)
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id)
    delete_stored_checkpoint(session, checkpoint, settings)
