"""Datasets: the built-ins with their parameters, and datasets users register (.npz uploads)."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, UploadFile
from fastapi.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.idempotency import replay_or_create
from api.schemas import COMMON_ERRORS, DatasetList, DatasetOut, error_responses
from api.uploads import save_limited
from models import files as files_repo
from models.tables import new_id

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], responses=error_responses(*COMMON_ERRORS)
)


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep, principal: PrincipalDep):
    from starvation.datasets import DATASETS

    builtins = [DatasetOut(name=name, builtin=True, description=cls.describe()) for name, cls in DATASETS.items()]
    registered = [
        DatasetOut(id=d.id, name=d.name, builtin=False, description=d.info, created_at=d.created_at)
        for d in files_repo.list_datasets(session, owner_id=principal.owner_id)
    ]
    return DatasetList(items=builtins + registered)


@router.post("", status_code=201, response_model=DatasetOut)
async def register_dataset(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=".npz with arrays x, y, attribute (optional split)")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    idempotency_key: Annotated[str | None, Header()] = None,
):
    from starvation.datasets import load_npz
    from starvation.errors import SpecError

    folder = settings.storage_dir / "datasets"
    tmp_path, sha256, _ = await save_limited(file, folder, settings.max_upload_bytes)

    def create() -> tuple[int, Any]:
        try:
            dataset = load_npz(tmp_path, name)
        except SpecError as exc:
            raise ApiError(422, "invalid_dataset", str(exc)) from None
        except Exception as exc:  # numpy refuses pickles and broken zips with assorted errors
            raise ApiError(422, "invalid_dataset", f"Not a readable .npz file: {type(exc).__name__}.") from None
        dataset_id = new_id()
        final = folder / f"{dataset_id}.npz"
        tmp_path.rename(final)
        info = {
            "splits": {k: len(v) for k, v in dataset.splits.items()},
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "sha256": sha256,
        }
        row = files_repo.add_dataset(
            session, id=dataset_id, owner_id=principal.owner_id, name=name, format="npz", path=str(final), info=info
        )
        return 201, DatasetOut(id=row.id, name=row.name, builtin=False, description=info, created_at=row.created_at)

    try:
        return await run_in_threadpool(
            replay_or_create, session, principal, idempotency_key, f"{sha256}:{name}", create
        )
    finally:
        tmp_path.unlink(missing_ok=True)
