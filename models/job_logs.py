"""A job's log lines: written in batches by the worker, read back in order by the owner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from models.tables import JobLog


def add_batch(session: Session, job_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """rows: dicts with at, level, message."""
    values = [{"job_id": job_id, **row} for row in rows]
    if values:
        session.execute(insert(JobLog), values)
    return len(values)


def query(session: Session, job_id: str, *, after_id: int | None = None, limit: int = 500) -> Sequence[JobLog]:
    """Lines oldest first; `after_id` continues a previous page."""
    stmt = select(JobLog).where(JobLog.job_id == job_id)
    if after_id is not None:
        stmt = stmt.where(JobLog.id > after_id)
    return session.scalars(stmt.order_by(JobLog.id).limit(limit)).all()
