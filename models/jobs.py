"""Queries on jobs: the database row is the truth about a job's state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from models.db import one_row_changed
from models.status import JobStatus
from models.tables import Job, utcnow


def terminal(status: Any, **values: Any) -> dict[str, Any]:
    """Column values for entering a terminal status; a job with a callback_url owes a webhook."""
    return {
        "status": status,
        "finished_at": utcnow(),
        "webhook_status": case((Job.callback_url.is_not(None), "pending"), else_=None),
        **values,
    }


def create(
    session: Session,
    *,
    owner_id: str,
    kind: str,
    spec: dict[str, Any],
    tags: dict[str, str],
    queue: str,
    callback_url: str | None,
) -> Job:
    job = Job(owner_id=owner_id, kind=kind, spec=spec, tags=tags, queue=queue, callback_url=callback_url)
    session.add(job)
    session.flush()
    return job


def get(session: Session, job_id: str, *, owner_id: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to someone else (owner_id given)."""
    job = session.get(Job, job_id)
    if job is None or (owner_id is not None and job.owner_id != owner_id):
        return None
    return job


def state(session: Session, job_id: str) -> tuple[str, float] | None:
    """(status, progress) without loading the rest of the row: what a stream polls."""
    row = session.execute(select(Job.status, Job.progress).where(Job.id == job_id)).first()
    return (row.status, row.progress) if row is not None else None


def list_page(
    session: Session,
    *,
    owner_id: str,
    limit: int,
    after: tuple[datetime, str] | None = None,
    kind: str | None = None,
    status: JobStatus | None = None,
    tags: dict[str, str] | None = None,
) -> list[Job]:
    """Newest first; `after` is the (created_at, id) of the last job of the previous page.

    Tag filters are applied in Python so the query is the same on SQLite and PostgreSQL JSON;
    we fetch in chunks until the page is full.
    """
    query = select(Job).where(Job.owner_id == owner_id)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    query = query.order_by(Job.created_at.desc(), Job.id.desc())
    page: list[Job] = []
    cursor = after
    while len(page) < limit:
        chunk_query = query
        if cursor is not None:
            created_at, job_id = cursor
            chunk_query = query.where(
                or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
            )
        chunk = list(session.scalars(chunk_query.limit(limit + 1)))
        if not chunk:
            break
        for job in chunk:
            if not tags or all(job.tags.get(k) == v for k, v in tags.items()):
                page.append(job)
        cursor = (chunk[-1].created_at, chunk[-1].id)
        if len(chunk) <= limit:
            break
    return page[: limit + 1]


def claim(session: Session, job_id: str, worker_id: str) -> bool:
    """Move a queued job to running; False if another worker has it or it was cancelled.

    A conditional update, so two deliveries of one message can never both run the job; and its row lock orders
    it against `request_cancel`: a cancel before it leaves nothing to claim, one after it sets the polled flag.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            worker_id=worker_id,
            progress=0.0,
        )
    )
    return one_row_changed(result)


def reap_stale(session: Session, *, stale_after: timedelta, max_attempts: int) -> dict[str, str]:
    """Running jobs whose heartbeat stopped lost their worker: re-queue them (the outbox sends
    them again) or, after max_attempts runs, fail them with worker_lost. Returns {id: action}."""
    cutoff = utcnow() - stale_after
    stale = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)).all()
    actions = {}
    for job in stale:
        still_stale = (Job.id == job.id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)
        if job.cancel_requested:
            values = terminal(JobStatus.CANCELLED)
        elif job.attempts >= max_attempts:
            message = f"The worker running this job stopped answering, {job.attempts} times."
            values = terminal(JobStatus.FAILED, error={"code": "worker_lost", "message": message})
        else:
            values = {"status": JobStatus.QUEUED, "enqueued_at": None, "worker_id": None}
        if one_row_changed(session.execute(update(Job).where(*still_stale).values(**values))):
            actions[job.id] = values["status"]
    return actions


def set_progress(session: Session, job_id: str, progress: float | None = None) -> bool:
    """Record a heartbeat (and progress, when given); returns whether a cancel was requested."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING).values(**values))
    return cancel_requested(session, job_id)


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """Close a running job; only one writer ever wins (the job must still be running).

    A job whose cancel was accepted ends `cancelled` even when its work finished before the worker saw the
    flag (the result is kept): a 202 to a cancel is never followed by `succeeded`.
    """
    succeeded = status == JobStatus.SUCCEEDED
    ending: Any = status
    if succeeded:
        ending = case((Job.cancel_requested.is_(True), JobStatus.CANCELLED.value), else_=JobStatus.SUCCEEDED.value)
    values = terminal(ending, error=error)
    if result is not None:
        values["result"] = result
    if succeeded:
        values["progress"] = 1.0
    outcome = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING).values(**values))
    return one_row_changed(outcome)


def request_cancel(session: Session, job: Job) -> bool:
    """A queued job is cancelled at once; a running one is asked to stop (its worker polls). False when it had
    already finished. One UPDATE that decides on the row as it is when locked, so a claim committed between
    the caller's read and this write turns the cancel into a request to stop instead of losing it."""
    queued = Job.status == JobStatus.QUEUED
    cancelled_if_queued = {
        column: case((queued, value), else_=getattr(Job, column))
        for column, value in terminal(JobStatus.CANCELLED).items()
    }
    outcome = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        .values(cancel_requested=True, **cancelled_if_queued)
    )
    session.refresh(job)
    return one_row_changed(outcome)


def with_id_prefix(session: Session, prefix: str, *, owner_id: str, limit: int) -> Sequence[Job]:
    """The owner's jobs whose id starts with `prefix` (hex digits only: nothing LIKE would read as a pattern)."""
    if not all(c in "0123456789abcdef" for c in prefix):
        return []
    return session.scalars(
        select(Job).where(Job.owner_id == owner_id, Job.id.startswith(prefix)).order_by(Job.id).limit(limit)
    ).all()


def remove(session: Session, job: Job) -> None:
    session.execute(delete(Job).where(Job.id == job.id))


def reserve_resending(session: Session, job_id: str, *, sent_at: datetime) -> bool:
    """Mark a job the broker lost (sent at `sent_at`, never claimed) as sent again; True for the one caller that
    should send it: every API process's dispatcher reads it as lost, and only the first to swap `sent_at` wins."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.enqueued_at == sent_at)
        .values(enqueued_at=utcnow())
    )
    return one_row_changed(result)


def unreserve_resending(session: Session, job_id: str, *, sent_at: datetime) -> None:
    """The broker refused the message again: the job is as lost as it was (the next round tries again)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(enqueued_at=sent_at))


def active_count(session: Session, owner_id: str) -> int:
    """The owner's jobs that are queued or running (what the per-key limit counts)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        )
        or 0
    )


def in_flight(session: Session) -> dict[str, int]:
    """{queue: jobs sent to the broker and not yet claimed}."""
    rows = session.execute(
        select(Job.queue, func.count())
        .where(Job.status == JobStatus.QUEUED, Job.enqueued_at.is_not(None))
        .group_by(Job.queue)
    ).all()
    return {queue: count for queue, count in rows}


def fair_share(session: Session, queue: str, room: int, *, older_than: timedelta = timedelta(0)) -> list[Job]:
    """Up to `room` unsent jobs of `queue`, one tenant at a time: each pick goes to the owner with the fewest
    jobs running or already sent (ties: the one waiting longest), its oldest job. One tenant's backlog then
    waits behind the others' new jobs instead of in front of them."""
    if room <= 0:
        return []
    cutoff = utcnow() - older_than
    waiting = session.scalars(
        select(Job)
        .where(
            Job.queue == queue,
            Job.status == JobStatus.QUEUED,
            Job.enqueued_at.is_(None),
            Job.created_at <= cutoff,
        )
        .order_by(Job.created_at, Job.id)
    ).all()
    heads: dict[str, list[Job]] = {}
    for job in waiting:
        heads.setdefault(job.owner_id, []).append(job)
    busy = dict(
        session.execute(
            select(Job.owner_id, func.count())
            .where(
                Job.queue == queue,
                or_(
                    Job.status == JobStatus.RUNNING, and_(Job.status == JobStatus.QUEUED, Job.enqueued_at.is_not(None))
                ),
            )
            .group_by(Job.owner_id)
        ).all()
    )
    chosen: list[Job] = []
    while heads and len(chosen) < room:
        owner = min(heads, key=lambda o: (busy.get(o, 0), heads[o][0].created_at))
        chosen.append(heads[owner].pop(0))
        busy[owner] = busy.get(owner, 0) + 1
        if not heads[owner]:
            del heads[owner]
    return chosen


def reserve_sending(session: Session, job_id: str) -> bool:
    """Mark a queued, unsent job as sent; True for the one caller that should send it (dispatchers may race)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))
        .values(enqueued_at=utcnow())
    )
    return one_row_changed(result)


def unreserve_sending(session: Session, job_id: str) -> None:
    """The broker refused the message: the job is unsent again (the outbox retries it)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(enqueued_at=None))


def unclaimed(session: Session, *, sent_before: timedelta) -> Sequence[Job]:
    """Queued jobs sent longer than `sent_before` ago and never claimed: a broker that lost its data lost them."""
    cutoff = utcnow() - sent_before
    return session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED, Job.enqueued_at.is_not(None), Job.enqueued_at < cutoff)
    ).all()
