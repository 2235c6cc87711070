"""Where a process keeps a job's files on its own disk while it writes them (core/storage.py keeps them for the
others): with a shared folder, that folder itself; with an object store, this process's scratch."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from core.storage import store


def local_root(settings: Settings) -> Path:
    """The shared folder when files are kept in one (its layout is the keys'), else this process's scratch."""
    return settings.storage_dir if store(settings).local else settings.scratch_dir


def job_dir(settings: Settings, job_id: str) -> Path:
    """Checkpoints, plots and reports of one job as the worker writes them (stored under `core.storage.job_key`)."""
    return local_root(settings) / "jobs" / job_id


def upload_dir(settings: Settings, kind: str) -> Path:
    """Where an upload of `kind` ("checkpoints", "datasets") is received and checked before it is stored."""
    return local_root(settings) / kind


def dataset_index_path(settings: Settings, dataset_id: str) -> Path:
    """Where an image folder's index is written before it is stored (`core.storage.dataset_index_key`)."""
    return local_root(settings) / "datasets" / f"{dataset_id}.index.npz"


def resume_dir(work_dir: Path) -> Path:
    """Where a train job keeps what a re-run after a lost worker resumes from (`starvation.training.Resume`)."""
    return work_dir / "resume"
