"""Registering what a job wrote to disk: checkpoints and artifacts (plots, reports, weights)."""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from typing import Any

from models import files as files_repo
from models.db import Database
from worker.outages import patiently


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Our weight files, which Python's table would call something else (".pt": a SNES page table).
WEIGHTS = (".pt", ".safetensors", ".onnx")


def add_artifact(db: Database, job_id: str, path: Path, name: str | None = None) -> str:
    name = name or path.name
    guessed = None if name.endswith(WEIGHTS) else mimetypes.guess_type(name)[0]
    media_type = guessed or "application/octet-stream"

    def write() -> None:
        with db.session() as session:
            files_repo.add_artifact(
                session,
                job_id=job_id,
                name=name,
                path=str(path),
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
) -> str:
    sha256 = sha256_of(path)

    def write() -> str:
        with db.session() as session:
            checkpoint = files_repo.add_checkpoint(
                session,
                owner_id=owner_id,
                job_id=job_id,
                seed=seed,
                format=fmt,
                path=str(path),
                sha256=sha256,
                size_bytes=path.stat().st_size,
                model_info=model_info,
                parent_checkpoint_id=parent_checkpoint_id,
            )
            return checkpoint.id

    return patiently(write, f"checkpoint of job {job_id}")
