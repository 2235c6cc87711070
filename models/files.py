"""Checkpoints, artifacts and user datasets: rows that point at files in the storage folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from models.db import one_row_changed
from models.status import TERMINAL
from models.tables import Artifact, Checkpoint, Job, UserDataset, utcnow


def add_checkpoint(session: Session, **fields: Any) -> Checkpoint:
    checkpoint = Checkpoint(**fields)
    session.add(checkpoint)
    session.flush()
    return checkpoint


def get_checkpoint(session: Session, checkpoint_id: str, *, owner_id: str | None) -> Checkpoint | None:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None or (owner_id is not None and checkpoint.owner_id != owner_id):
        return None
    return checkpoint


def uploaded_twin(
    session: Session, *, owner_id: str, sha256: str, format: str, model_info: dict[str, Any]
) -> Checkpoint | None:
    """This owner's earlier upload of the same bytes, format and model card, if one is kept."""
    uploads = session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.owner_id == owner_id,
            Checkpoint.sha256 == sha256,
            Checkpoint.format == format,
            Checkpoint.job_id.is_(None),
        )
        .order_by(Checkpoint.created_at)
    )
    return next((c for c in uploads if all(c.model_info.get(k) == v for k, v in model_info.items())), None)


def list_checkpoints(
    session: Session, *, owner_id: str, limit: int, after_id: str | None = None
) -> Sequence[Checkpoint]:
    stmt = select(Checkpoint).where(Checkpoint.owner_id == owner_id)
    if after_id:
        stmt = stmt.where(Checkpoint.id > after_id)
    return session.scalars(stmt.order_by(Checkpoint.id).limit(limit + 1)).all()


def checkpoints_of_job(session: Session, job_id: str) -> Sequence[Checkpoint]:
    return session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seed)).all()


def add_artifact(session: Session, **fields: Any) -> Artifact:
    artifact = Artifact(**fields)
    session.add(artifact)
    session.flush()
    return artifact


def artifacts_of_job(session: Session, job_id: str) -> Sequence[Artifact]:
    return session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def add_dataset(session: Session, **fields: Any) -> UserDataset:
    dataset = UserDataset(**fields)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str, *, owner_id: str | None) -> UserDataset | None:
    dataset = session.get(UserDataset, dataset_id)
    if dataset is None or (owner_id is not None and dataset.owner_id != owner_id):
        return None
    return dataset


def list_datasets(session: Session, *, owner_id: str) -> Sequence[UserDataset]:
    return session.scalars(
        select(UserDataset).where(UserDataset.owner_id == owner_id).order_by(UserDataset.created_at)
    ).all()


def claim_dataset_check(session: Session, *, stale_after: timedelta, per_key: int) -> UserDataset | None:
    """A pending dataset to check, marked as being checked (one API process gets it); a check begun more than
    `stale_after` ago lost its process and is handed out again. Tenants take turns, as jobs do (`jobs.fair_share`):
    the owner with the fewest checks running (ties: the one waiting longest) gets its oldest, and an owner with
    `per_key` running waits. Commits."""
    now = utcnow()
    free = or_(UserDataset.check_started_at.is_(None), UserDataset.check_started_at < now - stale_after)
    pending = UserDataset.status == "pending"
    running = dict(
        session.execute(
            select(UserDataset.owner_id, func.count()).where(pending, ~free).group_by(UserDataset.owner_id)
        ).all()
    )
    waiting = session.execute(
        select(UserDataset.owner_id, func.min(UserDataset.created_at))
        .where(pending, free)
        .group_by(UserDataset.owner_id)
    ).all()
    turns = sorted(
        (running.get(owner, 0), oldest, owner) for owner, oldest in waiting if running.get(owner, 0) < per_key
    )
    for _, _, owner in turns:
        dataset_id = session.scalar(
            select(UserDataset.id)
            .where(pending, free, UserDataset.owner_id == owner)
            .order_by(UserDataset.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )  # a row another claim holds: the next one
        if dataset_id is None:
            continue
        claimed = session.execute(
            update(UserDataset).where(UserDataset.id == dataset_id, pending, free).values(check_started_at=now)
        )
        session.commit()
        if one_row_changed(claimed):
            return session.get(UserDataset, dataset_id)
    session.commit()
    return None


def pending_checks(session: Session, owner_id: str) -> int:
    """How many of this owner's image folders wait for their check (or are being checked)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(UserDataset)
            .where(UserDataset.owner_id == owner_id, UserDataset.status == "pending")
        )
        or 0
    )


def finish_dataset_check(
    session: Session, dataset_id: str, *, info: dict[str, Any] | None = None, error: str | None = None
) -> None:
    """The check's outcome: `ready` with what it found (merged into `info`), or `failed` with `error`."""
    dataset = session.get(UserDataset, dataset_id)
    if dataset is None:
        return
    dataset.status = "failed" if error is not None else "ready"
    dataset.error = error
    dataset.info = {**dataset.info, **(info or {})}
    dataset.check_started_at = None


def job_owner(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.owner_id).where(Job.id == job_id))


def forget_outputs(session: Session, job_id: str) -> None:
    """Drop the checkpoint and artifact rows of a job (before it runs again)."""
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))


@dataclass(frozen=True)
class StoredUploads:
    """What one key keeps of its own uploads: the storage quota's count."""

    bytes: int
    datasets: int
    checkpoints: int


def stored_uploads(session: Session, owner_id: str) -> StoredUploads:
    """The owner's datasets and uploaded checkpoints (those a job made go with the job), and their stored bytes (an
    image folder's images are the operator's, not ours: 0)."""
    datasets, dataset_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(UserDataset.size_bytes), 0)).where(UserDataset.owner_id == owner_id)
    ).one()
    checkpoints, checkpoint_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Checkpoint.size_bytes), 0)).where(
            Checkpoint.owner_id == owner_id, Checkpoint.job_id.is_(None)
        )
    ).one()
    return StoredUploads(bytes=int(dataset_bytes + checkpoint_bytes), datasets=datasets, checkpoints=checkpoints)


def active_jobs_naming(
    session: Session, owner_id: str, *, dataset_id: str | None = None, checkpoint: Checkpoint | None = None
) -> list[str]:
    """Ids of the owner's queued or running jobs whose spec names the dataset, or the checkpoint (by id, as initial
    weights, or as a seed of the train job that made it). Read in Python: one key has few active jobs."""
    rows = session.execute(
        select(Job.id, Job.spec).where(Job.owner_id == owner_id, Job.status.not_in(TERMINAL))
    ).tuples()
    names: set[str] = set()
    if dataset_id is not None:
        names.add(dataset_id)
    if checkpoint is not None:
        names |= {name for name in (checkpoint.id, checkpoint.job_id) if name is not None}
    return sorted(
        job_id
        for job_id, spec in rows
        if names
        & {
            (spec.get("dataset") or {}).get("name"),
            spec.get("checkpoint_id"),
            spec.get("init_checkpoint_id"),
            spec.get("train_job_id"),
        }
    )


def remove_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    """The checkpoint's row, and the job artifact that is the same file (a job's checkpoints are also its files)."""
    if checkpoint.job_id is not None:
        session.execute(delete(Artifact).where(Artifact.job_id == checkpoint.job_id, Artifact.path == checkpoint.path))
    session.delete(checkpoint)
