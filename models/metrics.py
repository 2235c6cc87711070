"""Per-step metrics: written in batches (one insert per evaluation), read back in step order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, insert, not_, or_, select
from sqlalchemy.orm import Session

from models.tables import Metric


def add_batch(session: Session, job_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """rows: dicts with step, name, value, seed, split."""
    values = [{"job_id": job_id, **row} for row in rows]
    if values:
        session.execute(insert(Metric), values)
    return len(values)


def query(
    session: Session,
    job_id: str,
    *,
    name: str | None = None,
    seed: int | None = None,
    split: str | None = None,
    since_step: int | None = None,
    after_id: int | None = None,
    limit: int = 500,
) -> Sequence[Metric]:
    """Metrics with step >= since_step, oldest first; `after_id` continues a previous page."""
    stmt = select(Metric).where(Metric.job_id == job_id)
    if name is not None:
        stmt = stmt.where(Metric.name == name)
    if seed is not None:
        stmt = stmt.where(Metric.seed == seed)
    if split is not None:
        stmt = stmt.where(Metric.split == split)
    if since_step is not None:
        stmt = stmt.where(Metric.step >= since_step)
    if after_id is not None:
        stmt = stmt.where(Metric.id > after_id)
    return session.scalars(stmt.order_by(Metric.id).limit(limit)).all()


def forget(session: Session, job_id: str, *, kept_before: dict[int, int | None] | None = None) -> None:
    """Drop a job's metrics, except, per seed in `kept_before`, those of steps before its step (None: all of the
    seed's): what a resumed run will not report again."""
    stmt = delete(Metric).where(Metric.job_id == job_id)
    for seed, step in (kept_before or {}).items():
        kept = Metric.seed == seed if step is None else and_(Metric.seed == seed, Metric.step < step)
        stmt = stmt.where(or_(Metric.seed.is_(None), not_(kept)))
    session.execute(stmt)
