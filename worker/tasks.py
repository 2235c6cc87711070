"""Celery task bodies: thin shells over worker.runner."""

from __future__ import annotations

from core.queue import RUN_JOB
from worker.celery_app import app


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    from worker import runner  # imported in the child, where CUDA may be initialised

    runner.run_job(job_id)
