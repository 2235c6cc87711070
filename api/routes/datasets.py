"""Datasets: the built-ins with their parameters, and datasets users register (.npz uploads, ready at once, or
image folders with a metadata CSV under GS_DATA_DIR or in an object store under GS_DATA_URLS, answered at once and
checked in the background: api/dataset_checks.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, UploadFile
from fastapi.concurrency import run_in_threadpool

from api.deps import Principal, PrincipalDep, SessionDep, SettingsDep
from api.errors import ApiError, not_found, without_server_paths
from api.files_service import check_storage_quota, discard_stored
from api.files_service import delete_dataset as delete_stored_dataset
from api.idempotency import replay_or_create
from api.responses import CREATE_ERRORS, KEYED_ERRORS, error_responses, links_to
from api.schemas import BinaryUpload, DatasetList, DatasetOut
from api.uploads import save_limited
from core import object_images
from core.paths import upload_dir
from core.storage import dataset_key, store
from models import files as files_repo
from models.tables import new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=error_responses(*KEYED_ERRORS))
TO_THE_DATASET = links_to("dataset_id", "get_dataset", "delete_dataset")


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep, principal: PrincipalDep):
    from starvation.datasets import DATASETS

    builtins = [DatasetOut(name=name, builtin=True, description=cls.describe()) for name, cls in DATASETS.items()]
    registered = [dataset_out(d) for d in files_repo.list_datasets(session, owner_id=principal.owner_id)]
    return DatasetList(items=builtins + registered)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep):
    row = files_repo.get_dataset(session, dataset_id, owner_id=principal.owner_id)
    if row is None:
        raise not_found("dataset", dataset_id)
    return dataset_out(row)


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep):
    """Delete a dataset you registered, and the bytes the service stored for it (an .npz; an image folder's index,
    never its images). 409 `dataset_in_use` while a queued or running job names it."""
    row = files_repo.get_dataset(session, dataset_id, owner_id=principal.owner_id)
    if row is None:
        raise not_found("dataset", dataset_id)
    delete_stored_dataset(session, row, settings)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        201: TO_THE_DATASET,
        202: {
            "model": DatasetOut,
            "description": "an image folder, registered as `pending` and checked in the background",
            **TO_THE_DATASET,
        },
        **error_responses(*CREATE_ERRORS, 429),
    },
)
async def register_dataset(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    format: Annotated[Literal["npz", "image_folder"], Form()] = "npz",
    file: Annotated[BinaryUpload | None, File(description=".npz with arrays x, y, attribute (optional split)")] = None,
    folder: Annotated[
        str | None,
        Form(
            description="image_folder: a folder in your data folder, GS_DATA_DIR/<your key "
            "id> (the admin token's: GS_DATA_DIR), or in the object store, s3://BUCKET/PREFIX/<your key id>/... "
            "under a prefix of GS_DATA_URLS (the admin token's: anywhere under one)"
        ),
    ] = None,
    metadata: Annotated[
        str, Form(description="image_folder: the CSV (path,label,attribute,split), in the folder")
    ] = "metadata.csv",
    image_size: Annotated[int, Form(ge=4, le=512)] = 64,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    if format == "image_folder":
        request_hash = f"image_folder:{name}:{folder}:{metadata}:{image_size}"
        create = partial(register_image_folder, session, principal, settings, name, folder, metadata, image_size)
        return await run_in_threadpool(replay_or_create, session, principal, idempotency_key, request_hash, create)
    if file is None:
        raise ApiError(422, "invalid_request", "An npz dataset needs the `file` upload.")
    return await register_npz(session, principal, settings, name, file, idempotency_key)


async def register_npz(session, principal, settings, name: str, file: UploadFile, idempotency_key: str | None):
    from starvation.datasets import load_npz
    from starvation.errors import SpecError

    folder = upload_dir(settings, "datasets")
    tmp_path, sha256, size = await save_limited(file, folder, settings.max_upload_bytes)

    def create() -> tuple[int, Any]:
        check_storage_quota(session, principal, settings, adding="datasets", adding_bytes=size)
        try:
            dataset = load_npz(
                tmp_path,
                name,
                max_bytes=settings.max_dataset_bytes,
                max_compression_ratio=settings.max_dataset_compression_ratio,
            )
        except SpecError as exc:
            raise dataset_refused(exc) from None
        except Exception as exc:  # numpy refuses pickles and broken zips with assorted errors
            raise ApiError(422, "invalid_dataset", f"Not a readable .npz file: {type(exc).__name__}.") from None
        dataset_id = new_id()
        key = dataset_key(dataset_id)
        store(settings).put(key, tmp_path, move=True)
        placed.append(key)
        return 201, add_row(session, principal, dataset_id, name, "npz", key, dataset, {"sha256": sha256}, size)

    placed: list[str] = []  # the key `create` stored, removed if a concurrent twin won
    try:
        return await run_in_threadpool(
            replay_or_create,
            session,
            principal,
            idempotency_key,
            f"{sha256}:{name}",
            create,
            discard=partial(discard_stored, settings, placed),
        )
    finally:
        tmp_path.unlink(missing_ok=True)


def dataset_refused(exc: Exception) -> ApiError:
    """A dataset the science package refused: 413 `too_large` for a size limit (bombs), else 422."""
    code = getattr(exc, "code", "invalid_dataset")
    return ApiError(413 if code == "too_large" else 422, code, str(exc))


def granted_folder(settings, principal: Principal) -> Path:
    """Where the caller's image folders live: the whole GS_DATA_DIR for an admin, GS_DATA_DIR/<key id> for a key."""
    root = Path(settings.data_dir).resolve()
    return root if principal.is_admin else root / principal.owner_id


UNUSABLE_FOLDER = (
    "No such image folder and metadata CSV in your data folder; paths are relative to it (GS_DATA_DIR/<your key "
    "id>, given by the operator), or s3://BUCKET/PREFIX/<your key id>/... under a prefix the operator lists."
)


def granted_image_folder(settings, principal: Principal, folder: str | None, metadata: str) -> tuple[str, str]:
    """(the folder, its metadata CSV), both inside the caller's granted folder, on this host's disk or in the
    object store. One answer for a path that is missing, leaves the grant (.., absolute, a link out, another prefix)
    or is another key's: none of them tells what exists."""
    if not folder:
        raise ApiError(422, "invalid_request", "folder is required.")
    if folder.startswith("s3://"):
        return granted_store_folder(settings, principal, folder, metadata)
    if settings.data_dir is None:
        raise ApiError(422, "invalid_request", "Image folders are read from GS_DATA_DIR, which is not set.")
    unusable = ApiError(422, "invalid_path", UNUSABLE_FOLDER)
    grant = granted_folder(settings, principal)
    try:
        root, csv_path = (grant / folder).resolve(), (grant / folder / metadata).resolve()
    except (OSError, ValueError):  # a loop of links, a NUL byte
        raise unusable from None
    if not (root.is_relative_to(grant) and csv_path.is_relative_to(grant) and root.is_dir() and csv_path.is_file()):
        raise unusable
    return str(root), str(csv_path)


def granted_store_folder(settings, principal: Principal, url: str, metadata: str) -> tuple[str, str]:
    """An image folder in the object store, under the caller's grant of GS_DATA_URLS, whose CSV is a key in it."""
    if not object_images.listed_prefixes(settings):
        raise ApiError(
            422, "invalid_request", "Image folders in an object store are read under GS_DATA_URLS, which is not set."
        )
    unusable = ApiError(422, "invalid_path", UNUSABLE_FOLDER)
    found = object_images.granted_folder(settings, url, owner_id=principal.owner_id, is_admin=principal.is_admin)
    if found is None or object_images.key_refusal(metadata) is not None:
        raise unusable
    images = object_images.images_in_store(settings, found.url, patience_s=0, cached=False)  # a request waits not
    if not object_images.exists(images, metadata):
        raise unusable
    return found.url, found.url + metadata


def register_image_folder(session, principal, settings, name, folder, metadata, image_size) -> tuple[int, Any]:
    """202 at once: the folder and its CSV exist in the caller's data folder; rows and images are checked in the
    background."""
    if files_repo.pending_checks(session, principal.owner_id) >= settings.dataset_checks_per_key:
        raise ApiError(
            429,
            "too_many_dataset_checks",
            f"This key has {settings.dataset_checks_per_key} image folders "
            "waiting for their check, the limit; register more when they are ready.",
            headers={"Retry-After": "10"},
        )
    root, csv_path = granted_image_folder(settings, principal, folder, metadata)
    check_storage_quota(session, principal, settings, adding="datasets", adding_bytes=0)
    info = {"metadata": csv_path, "image_size": image_size}
    row = files_repo.add_dataset(
        session,
        id=new_id(),
        owner_id=principal.owner_id,
        name=name,
        format="image_folder",
        path=root,
        info=info,
        status="pending",
    )
    return 202, dataset_out(row)


def add_row(session, principal, dataset_id, name, fmt, path, dataset, extra, size_bytes: int) -> DatasetOut:
    info = {
        "splits": {k: len(v) for k, v in dataset.splits.items()},
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        **extra,
    }
    row = files_repo.add_dataset(
        session,
        id=dataset_id,
        owner_id=principal.owner_id,
        name=name,
        format=fmt,
        path=str(path),
        info=info,
        size_bytes=size_bytes,
    )
    return dataset_out(row)


def dataset_out(row) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        builtin=False,
        description=public_info(row.info),
        created_at=row.created_at,
        status=row.status,
        error=row.error,
    )


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a dataset's owner sees of its row: the metadata CSV relative to GS_DATA_DIR, as they named it
    (the worker keeps the absolute path)."""
    return {key: without_server_paths(value) if isinstance(value, str) else value for key, value in info.items()}
