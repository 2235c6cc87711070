"""Where the service keeps a job's files and a dataset's index on disk: the API and the worker agree here."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings


def job_dir(settings: Settings, job_id: str) -> Path:
    """Checkpoints, plots and reports of one job: written by the worker, served and deleted by the API."""
    return settings.storage_dir / "jobs" / job_id


def dataset_index_path(settings: Settings, dataset_id: str) -> Path:
    """An image folder's checked index: written by the API's check (api/dataset_checks.py), read by the worker."""
    return settings.storage_dir / "datasets" / f"{dataset_id}.index.npz"


def resume_dir(work_dir: Path) -> Path:
    """Where a train job keeps what a re-run after a lost worker resumes from (`starvation.training.Resume`)."""
    return work_dir / "resume"
