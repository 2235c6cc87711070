"""Where the service keeps a job's files on disk: one function, so the API and the worker agree."""
from __future__ import annotations

from pathlib import Path

from core.settings import Settings


def job_dir(settings: Settings, job_id: str) -> Path:
    """Checkpoints, plots and reports of one job: written by the worker, served and deleted by the API."""
    return settings.storage_dir / "jobs" / job_id
