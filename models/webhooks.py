"""The webhook outbox, kept on the jobs table: which deliveries are due, in what order, and who is sending each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models.db import one_row_changed
from models.tables import Job, utcnow


def is_due(now: datetime) -> Any:
    return (Job.webhook_status == "pending") & or_(Job.webhook_next_at.is_(None), Job.webhook_next_at <= now)


def due(session: Session, *, room: int, per_key: int, busy: Mapping[str, int]) -> list[Job]:
    """Up to `room` jobs whose webhook is due, the longest due first, with at most `per_key` of one owner's in
    flight once `busy` (owner: deliveries already in flight) is counted."""
    if room <= 0:
        return []
    due_at = func.coalesce(Job.webhook_next_at, Job.finished_at)
    rank = func.row_number().over(partition_by=Job.owner_id, order_by=(due_at, Job.id))
    ranked = select(Job.id, Job.owner_id, due_at.label("due_at"), rank.label("rank")).where(is_due(utcnow())).subquery()
    heads = (
        session.execute(
            select(ranked.c.id, ranked.c.owner_id)
            .where(ranked.c.rank <= per_key)
            .order_by(ranked.c.due_at, ranked.c.id)
        )
        .tuples()
        .all()
    )
    taken: Counter[str] = Counter(busy)
    chosen: list[str] = []
    for job_id, owner_id in heads:
        if len(chosen) == room:
            break
        if taken[owner_id] < per_key:
            chosen.append(job_id)
            taken[owner_id] += 1
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(chosen)))}
    return [jobs[job_id] for job_id in chosen if job_id in jobs]


def lease(session: Session, job_id: str, until: datetime) -> bool:
    """Take a due delivery until `until` (it is not due before then): True for the one API process that gets it."""
    taken = session.execute(update(Job).where(Job.id == job_id, is_due(utcnow())).values(webhook_next_at=until))
    return one_row_changed(taken)


def record(session: Session, job_id: str, **values: Any) -> None:
    """A try's outcome: delivered, failed for good, or due again at a later `webhook_next_at`."""
    session.execute(update(Job).where(Job.id == job_id, Job.webhook_status == "pending").values(**values))
