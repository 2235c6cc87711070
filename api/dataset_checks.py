"""Image folders are checked in the background after registration: every CSV row and image header, a sample decoded
(`starvation.datasets.index_image_folder`), into an index the workers read. A dataset is `pending` until then,
`ready` or `failed` (with the row at fault) after.

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
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from api.errors import without_server_paths
from core.paths import dataset_index_path
from core.settings import Settings, get_settings
from core.storage import dataset_index_key, store
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
        index = index_image_folder(
            root,
            info["metadata"],
            max_image_pixels=settings.max_image_pixels,
            max_rows=settings.max_dataset_rows,
            time_limit_s=settings.dataset_check_timeout_s,
        )
    except SpecError as exc:
        return {"error": without_server_paths(str(exc))}
    except Exception as exc:
        log.exception("dataset %s: the check failed", dataset_id)
        return {"error": f"the check failed ({type(exc).__name__})"}
    path = dataset_index_path(settings, dataset_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_index(index, partial)
    partial.replace(path)  # a worker never reads half an index
    store(settings).put(dataset_index_key(dataset_id), path, move=True)  # the folder's own file: nothing moves
    opened = open_image_folder(root, index, dataset_id, info["image_size"])  # what a worker will see; reads no image
    summary = index.summary()
    return {
        "info": {
            "splits": {name: split["n"] for name, split in summary.items()},
            "groups": {name: split["groups"] for name, split in summary.items()},
            "input_shape": list(opened.input_shape),
            "num_classes": opened.num_classes,
            "counterfactual": opened.can_intervene,
        }
    }
