"""Image folders are checked in the background after registration: every CSV row and image header, a sample decoded
(`starvation.datasets.index_image_folder`), into an index the workers read, from this host's disk or from the object
store (core/object_images.py: the CSV copied to this process's scratch, each image's size and ETag recorded). A
dataset is `pending` until then, `ready` or `failed` (with the row at fault) after.

The API process runs GS_DATASET_CHECK_SLOTS checks at once (api/background.py), tenants in turn: each claim goes to
the owner with the fewest checks running, and at most GS_DATASET_CHECK_SLOTS_PER_KEY of one owner's run at once, so
one tenant's hundred folders wait behind another's one instead of in front of it. Each check runs in a child process
(forked from a server that has the science package loaded): it uses a core of its own rather than the API's, a
backlog's checks run at a lower CPU priority, and a check past GS_DATASET_CHECK_TIMEOUT_S is killed and its dataset
failed. A claim is committed before the check starts, so API processes sharing a database never check a folder twice;
a check whose process died is taken up again after GS_DATASET_CHECK_STALE_S."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from api.errors import without_server_paths
from core import object_images
from core.paths import dataset_index_path
from core.settings import Settings, get_settings
from core.storage import StoredFileTooLarge, StoreUnavailable, dataset_index_key, store
from models import files as files_repo
from models.db import database

log = logging.getLogger("gs.api")
# A key with more folders waiting has its checks run at a lower CPU priority: its backlog takes what cores the
# others' checks (and the API) leave, so it slows nobody's single folder.
BACKLOG_NICENESS = 10
KILL_GRACE_S = 5.0  # the check stops itself at its limit, naming the line; past this too, its process is killed
CLAIMING = threading.Lock()  # this process's slots claim one at a time, or two could take one key's last place
CHILDREN = multiprocessing.get_context("forkserver")  # forking the API itself would copy its threads' locks
CHILDREN.set_forkserver_preload(["api.dataset_checks", "starvation.datasets"])  # torch imported once, not per check


def check_pending_datasets() -> int:
    """Check pending datasets, one claim after another, until there is none this slot may take; returns how many."""
    settings = get_settings()
    checked = 0
    while True:
        with CLAIMING, database().new_session() as session:
            row = files_repo.claim_dataset_check(
                session,
                stale_after=timedelta(seconds=settings.dataset_check_stale_s),
                per_key=settings.dataset_check_slots_per_key,
            )
            if row is None:
                return checked
            dataset_id, root, info = row.id, row.path, dict(row.info)
            niceness = BACKLOG_NICENESS if files_repo.pending_checks(session, row.owner_id) > 1 else 0
        outcome = check_in_child(settings, dataset_id, root, info, niceness)
        with database().session() as session:
            files_repo.finish_dataset_check(session, dataset_id, **outcome)
        log.info("dataset %s checked: %s", dataset_id, "failed" if outcome.get("error") else "ready")
        checked += 1


def check_in_child(
    settings: Settings, dataset_id: str, root: str, info: dict[str, Any], niceness: int = 0
) -> dict[str, Any]:
    """`check_image_folder` in a child process at `niceness`, killed if it outlives its time limit."""
    receiver, sender = CHILDREN.Pipe(duplex=False)
    child = CHILDREN.Process(
        target=report_check, args=(sender, niceness, settings, dataset_id, root, info), daemon=True
    )
    child.start()
    sender.close()
    try:
        if receiver.poll(settings.dataset_check_timeout_s + KILL_GRACE_S):
            return receiver.recv()
        return {"error": f"the check ran past its limit of {settings.dataset_check_timeout_s:g} s and was stopped"}
    except EOFError:  # the child ended without an answer: killed for memory, say
        log.error("dataset %s: the check's process ended without an answer", dataset_id)
        return {"error": "the check's process ended without an answer"}
    finally:
        child.kill()
        child.join()
        receiver.close()


def report_check(
    sender: Connection, niceness: int, settings: Settings, dataset_id: str, root: str, info: dict[str, Any]
) -> None:
    """The child's body: the check's outcome sent to the API process."""
    os.nice(niceness)
    sender.send(check_image_folder(settings, dataset_id, root, info))
    sender.close()


def check_image_folder(settings: Settings, dataset_id: str, root: str, info: dict[str, Any]) -> dict[str, Any]:
    """{"info": what the dataset's description gains} when the folder is sound, else {"error": the reason}."""
    from starvation.datasets import index_image_folder, open_image_folder, save_index
    from starvation.errors import SpecError

    try:
        with folder_to_check(settings, dataset_id, root, info["metadata"]) as (folder, csv_path):
            index = index_image_folder(
                folder,
                csv_path,
                max_image_pixels=settings.max_image_pixels,
                max_image_bytes=settings.max_image_bytes,
                max_rows=settings.max_dataset_rows,
                time_limit_s=settings.dataset_check_timeout_s,
            )
    except (SpecError, StoredFileTooLarge, object_images.ImageChanged) as exc:
        return {"error": without_server_paths(str(exc))}
    except StoreUnavailable as exc:
        log.warning("dataset %s: the object store did not answer its check: %s", dataset_id, exc)
        return {"error": "the object store did not answer during the check; register the folder again later"}
    except Exception as exc:
        log.exception("dataset %s: the check failed", dataset_id)
        return {"error": f"the check failed ({type(exc).__name__})"}
    path = dataset_index_path(settings, dataset_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_index(index, partial)
    partial.replace(path)  # a worker never reads half an index
    store(settings).put(dataset_index_key(dataset_id), path, move=True)  # the folder's own file: nothing moves
    opened = open_image_folder(folder, index, dataset_id, info["image_size"])  # what a worker will see; reads none
    summary = index.summary()
    found = {
        "splits": {name: split["n"] for name, split in summary.items()},
        "groups": {name: split["groups"] for name, split in summary.items()},
        "input_shape": list(opened.input_shape),
        "num_classes": opened.num_classes,
        "counterfactual": opened.can_intervene,
    }
    if index.sizes is not None:  # what a worker's cache holds of it once read
        found["image_bytes"] = int(index.sizes.sum())
    return {"info": found}


@contextmanager
def folder_to_check(settings: Settings, dataset_id: str, root: str, metadata: str) -> Iterator[tuple[Any, Path]]:
    """(the folder as the science package reads it, its metadata CSV on this host): a local folder as it is; a folder
    in the object store as an `ImageSource`, with its CSV copied to this process's scratch for the check's length."""
    if not object_images.is_store_folder(root):
        yield root, Path(metadata)
        return
    from starvation.datasets import DatasetError

    images = object_images.images_in_store(settings, root, cached=False)  # the API's folder keeps no images
    relative = metadata.removeprefix(root)
    if not metadata.startswith(root) or object_images.key_refusal(relative) is not None:
        raise DatasetError("the metadata CSV is not in the image folder")
    copy = settings.scratch_dir / "checks" / f"{dataset_id}.csv"
    copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            object_images.fetch_file(images, relative, copy, settings.max_upload_bytes)
        except OSError as exc:
            raise DatasetError(f"cannot read the metadata CSV ({exc.strerror or type(exc).__name__})") from None
        yield images, copy
    finally:
        copy.unlink(missing_ok=True)
