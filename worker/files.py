"""Registering what a job wrote to disk: checkpoints and artifacts (plots, reports, weights), each put in the store
(core/storage.py) under its job's key and recorded by that key; and a train job's resume state, kept in the store
while it trains so that another host can go on from it."""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from core.paths import job_dir, resume_dir
from core.settings import Settings, get_settings
from core.storage import StoreUnavailable, job_key, store
from models import files as files_repo
from models.db import Database
from worker.outages import patiently

log = logging.getLogger("gs.worker")
STORE_PATIENCE_S = 120.0  # how long a job's writes wait for a store that is down (as for a database blink)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Our weight files, which Python's table would call something else (".pt": a SNES page table).
WEIGHTS = (".pt", ".safetensors", ".onnx")


def store_output(job_id: str, path: Path, settings: Settings | None = None) -> str:
    """Put a file the job wrote in its folder into the store (patiently); returns its key."""
    settings = settings or get_settings()
    parts = path.parts  # .../jobs/<job id>/<relative>: where the job's folder lies on this host (core.paths.job_dir)
    at = max(i for i in range(len(parts) - 2) if parts[i : i + 2] == ("jobs", job_id))
    key = job_key(job_id, "/".join(parts[at + 2 :]))
    patiently_stored(lambda: store(settings).put(key, path), f"file {path.name} of job {job_id}")
    return key


T = TypeVar("T")


def patiently_stored(write: Callable[[], T], what: str) -> T:
    """`write()`, tried again every second while the store is unavailable, for up to STORE_PATIENCE_S."""
    started = time.monotonic()
    while True:
        try:
            return write()
        except StoreUnavailable as exc:
            if time.monotonic() - started > STORE_PATIENCE_S:
                raise
            log.warning("%s not stored yet (object store unavailable), trying again: %s", what, exc)
            time.sleep(1.0)


def add_artifact(
    db: Database, job_id: str, path: Path, name: str | None = None, *, settings: Settings | None = None
) -> str:
    name = name or path.name
    key = store_output(job_id, path, settings)
    guessed = None if name.endswith(WEIGHTS) else mimetypes.guess_type(name)[0]
    media_type = guessed or "application/octet-stream"

    def write() -> None:
        with db.session() as session:
            files_repo.add_artifact(
                session,
                job_id=job_id,
                name=name,
                path=key,
                media_type=media_type,
                size_bytes=path.stat().st_size,
            )

    patiently(write, f"artifact {name} of job {job_id}")
    return name


def add_checkpoint(
    db: Database,
    *,
    job_id: str,
    owner_id: str,
    seed: int,
    fmt: str,
    path: Path,
    model_info: dict[str, Any],
    parent_checkpoint_id: str | None = None,
    settings: Settings | None = None,
) -> str:
    sha256 = sha256_of(path)
    key = store_output(job_id, path, settings)

    def write() -> str:
        with db.session() as session:
            checkpoint = files_repo.add_checkpoint(
                session,
                owner_id=owner_id,
                job_id=job_id,
                seed=seed,
                format=fmt,
                path=key,
                sha256=sha256,
                size_bytes=path.stat().st_size,
                model_info=model_info,
                parent_checkpoint_id=parent_checkpoint_id,
            )
            return checkpoint.id

    return patiently(write, f"checkpoint of job {job_id}")


def restore_resume(settings: Settings, job_id: str) -> Path:
    """The job's resume state as the store keeps it, in this host's folder for the job (a lost host's successor
    starts with an empty one). Returns that folder."""
    folder = resume_dir(job_dir(settings, job_id))
    kept = store(settings)
    if kept.local:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    prefix = job_key(job_id, "resume")
    for key in patiently_stored(lambda: kept.keys(prefix), f"resume state of job {job_id}"):
        cached = patiently_stored(lambda: kept.fetch(key), key)  # noqa: B023 (called at once)
        partial = folder / (key.removeprefix(prefix + "/") + ".restoring")
        shutil.copyfile(cached, partial)
        partial.replace(partial.with_suffix(""))
    return folder


@contextmanager
def resume_kept(settings: Settings, job_id: str, every_s: float = 0.5) -> Iterator[None]:
    """While a train job runs, each resume state it saves (`starvation.training.Resume`, seed*.pt, replaced whole)
    is put in the store within `every_s`: the training loop needs to know nothing of the store."""
    if store(settings).local:
        yield
        return
    folder = resume_dir(job_dir(settings, job_id))
    sent: dict[Path, int] = {}
    stop = threading.Event()

    def send_new() -> None:
        for path in sorted(folder.glob("seed*.pt")):
            try:
                changed = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if sent.get(path) != changed:
                snapshot = path.with_name(f".sending-{path.name}")  # this state's inode, even if the next replaces it
                snapshot.unlink(missing_ok=True)
                os.link(path, snapshot)
                key = job_key(job_id, f"resume/{path.name}")
                patiently_stored(lambda: store(settings).put(key, snapshot), f"resume state of job {job_id}")  # noqa: B023
                snapshot.unlink()
                sent[path] = changed

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                send_new()
            except Exception as exc:  # the next round tries again; the final round raises
                log.warning("job %s: its resume state not stored yet: %s", job_id, exc)

    for path in folder.glob("seed*.pt"):  # restored from the store: already there
        sent[path] = path.stat().st_mtime_ns
    thread = threading.Thread(target=loop, name=f"resume-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    send_new()
