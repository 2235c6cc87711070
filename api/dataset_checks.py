"""Image folders are checked in the background after registration: every CSV row and image header, a sample decoded
(`starvation.datasets.index_image_folder`), into an index the workers read. A dataset is `pending` until then,
`ready` or `failed` (with the row at fault) after. Runs in the API process (api/background.py); a check whose
process died is taken up again after GS_DATASET_CHECK_STALE_S."""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from api.errors import without_server_paths
from core.paths import dataset_index_path
from core.settings import Settings, get_settings
from models import files as files_repo
from models.db import database

log = logging.getLogger("gs.api")


def check_pending_datasets() -> int:
    """Check every pending dataset this process can claim, one after another; returns how many it checked."""
    settings = get_settings()
    checked = 0
    while True:
        with database().new_session() as session:
            row = files_repo.claim_dataset_check(session, stale_after=timedelta(seconds=settings.dataset_check_stale_s))
            if row is None:
                return checked
            dataset_id, root, info = row.id, row.path, dict(row.info)
        outcome = check_image_folder(settings, dataset_id, root, info)
        with database().session() as session:
            files_repo.finish_dataset_check(session, dataset_id, **outcome)
        log.info("dataset %s checked: %s", dataset_id, "failed" if outcome.get("error") else "ready")
        checked += 1


def check_image_folder(settings: Settings, dataset_id: str, root: str, info: dict[str, Any]) -> dict[str, Any]:
    """{"info": what the dataset's description gains} when the folder is sound, else {"error": the reason}."""
    from starvation.datasets import index_image_folder, open_image_folder, save_index
    from starvation.errors import SpecError

    try:
        index = index_image_folder(root, info["metadata"], max_image_pixels=settings.max_image_pixels,
                                   max_rows=settings.max_dataset_rows)
    except SpecError as exc:
        return {"error": without_server_paths(str(exc))}
    except Exception as exc:  # noqa: BLE001 - whatever the folder holds, the dataset fails, not the loop
        log.exception("dataset %s: the check failed", dataset_id)
        return {"error": f"the check failed ({type(exc).__name__})"}
    path = dataset_index_path(settings, dataset_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_index(index, partial)
    partial.replace(path)  # a worker never reads half an index
    opened = open_image_folder(root, index, dataset_id, info["image_size"])  # what a worker will see; reads no image
    summary = index.summary()
    return {"info": {"splits": {name: split["n"] for name, split in summary.items()},
                     "groups": {name: split["groups"] for name, split in summary.items()},
                     "input_shape": list(opened.input_shape), "num_classes": opened.num_classes,
                     "counterfactual": opened.can_intervene}}
