"""What the dataset and checkpoint routes do beyond reading a row: the per-key storage quota, and deleting what a
key stored (never while a queued or running job names it; never an image folder's own files)."""

from __future__ import annotations

import logging
from contextlib import suppress

from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from api.deps import Principal
from api.errors import ApiError
from core.settings import Settings, get_settings
from core.storage import StoredFileMissing, StoreUnavailable, attachment, dataset_index_key, key_of, store
from models import files as files_repo
from models.tables import Checkpoint, UserDataset

log = logging.getLogger("gs.api")


def check_storage_quota(
    session: Session, principal: Principal, settings: Settings, *, adding: str, adding_bytes: int
) -> None:
    """One more of `adding` ("datasets" or "checkpoints") of `adding_bytes` fits the key's quota: else a 429 for the
    count (GS_MAX_DATASETS_PER_KEY, GS_MAX_CHECKPOINTS_PER_KEY) or a 413 for the bytes (GS_MAX_STORED_BYTES_PER_KEY).
    DELETE frees both."""
    if principal.is_admin:
        return
    stored = files_repo.stored_uploads(session, principal.owner_id)
    count, limit = getattr(stored, adding), getattr(settings, f"max_{adding}_per_key")
    if count >= limit:
        raise ApiError(
            429,
            f"too_many_{adding}",
            f"This key keeps {count} {adding}; the limit is {limit}. Delete some (DELETE /v1/{adding}/{{id}}) first.",
            {"stored": count, "limit": limit},
        )
    limit_bytes = settings.max_stored_bytes_per_key
    if stored.bytes + adding_bytes > limit_bytes:
        raise ApiError(
            413,
            "storage_quota_exceeded",
            f"This key stores {stored.bytes} bytes of datasets and checkpoints; {adding_bytes} more would "
            f"pass its quota of {limit_bytes}. Delete some first.",
            {"stored_bytes": stored.bytes, "adding_bytes": adding_bytes, "limit_bytes": limit_bytes},
        )


def refuse_if_in_use(session: Session, owner_id: str, what: str, object_id: str, **named) -> None:
    jobs = files_repo.active_jobs_naming(session, owner_id, **named)
    if jobs:
        raise ApiError(
            409,
            f"{what}_in_use",
            f"{len(jobs)} queued or running job(s) use {what} {object_id}; cancel "
            "them or wait for them to finish, then delete it.",
            {"jobs": jobs},
        )


def delete_dataset(session: Session, dataset: UserDataset, settings: Settings) -> None:
    """The row, then the stored .npz or an image folder's index (the folder itself is the operator's: kept)."""
    refuse_if_in_use(session, dataset.owner_id, "dataset", dataset.id, dataset_id=dataset.id)
    if dataset.status == "pending" and dataset.check_started_at is not None:
        raise ApiError(
            409,
            "dataset_in_use",
            f"Dataset {dataset.id} is being checked; delete it when it is ready or failed.",
            {"jobs": []},
        )
    ours = dataset_index_key(dataset.id) if dataset.format == "image_folder" else key_of(settings, dataset.path)
    answering(settings, ours)
    session.delete(dataset)
    session.commit()  # the row goes first: a file without a row is only space, a row without its file a broken job
    delete_object(settings, ours)


def delete_checkpoint(session: Session, checkpoint: Checkpoint, settings: Settings) -> None:
    """The row (and the job artifact that is the same file), then the file."""
    refuse_if_in_use(session, checkpoint.owner_id, "checkpoint", checkpoint.id, checkpoint=checkpoint)
    key = key_of(settings, checkpoint.path)  # a key of ours: a row never makes us delete anything else
    answering(settings, key)
    files_repo.remove_checkpoint(session, checkpoint)
    session.commit()
    delete_object(settings, key)


def answering(settings: Settings, key: str) -> None:
    """The store answers for `key` (there or not): one that is down is a 503 before a row is deleted, so a 503
    still means that nothing was changed."""
    with suppress(StoredFileMissing):
        store(settings).stat(key)


def delete_object(settings: Settings, key: str) -> None:
    """The object of a row already deleted: a store gone down since leaves it as space only (logged with its key),
    not a 503 for a delete that was done."""
    try:
        store(settings).delete(key)
    except StoreUnavailable as exc:
        log.warning("stored file %s left behind, its row deleted: %s", key, exc)


def discard_stored(settings: Settings, keys: list[str]) -> None:
    """Delete what an upload stored when a concurrent twin won (api/idempotency.py `discard`)."""
    for key in keys:
        store(settings).delete(key)


def stored_file(settings: Settings, recorded: str, *, media_type: str, filename: str) -> Response:
    """The file a row recorded: from the shared folder as it is, or streamed from the object store (never whole in
    memory), or, with GS_PRESIGNED_DOWNLOADS_S, a 307 to a presigned GET of the object (the caller checked the
    owner first). A missing one is a 404 `file_missing`, a store that does not answer a 503 (api/errors.py)."""
    kept, key = store(settings), key_of(settings, recorded)
    if kept.local:
        return FileResponse(kept.fetch(key), media_type=media_type, filename=filename)
    size = kept.stat(key).size  # a missing object is a 404 and a store that is down a 503, redirected or not
    if lifetime_s := settings.presigned_downloads_s:
        url = kept.presigned_get(key, expires_s=lifetime_s, filename=filename, media_type=media_type)
        if url is not None:  # the URL expires: no cache may keep the redirect
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    headers = {"Content-Length": str(size), "Content-Disposition": attachment(filename)}
    return StreamingResponse(kept.chunks(key), media_type=media_type, headers=headers)


INLINED_BYTES = 16 << 20  # a plot a page inlines; anything larger is not ours to paste into HTML


def stored_bytes(recorded: str) -> bytes:
    """A small stored file (a plot) whole, for a page that inlines it; a missing or oversized one is left out
    (FileNotFoundError)."""
    settings = get_settings()
    kept, key = store(settings), key_of(settings, recorded)
    if kept.stat(key).size > INLINED_BYTES:
        raise FileNotFoundError(f"{key} is too large to inline")
    return kept.fetch(key).read_bytes()
