"""A job's log page and its live streams (`logs?follow=true` as JSON lines, `events` as Server-Sent Events), polled
from the rows through api/streams.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session

from api import streams
from api.deps import Principal, still_valid
from api.errors import without_server_paths
from api.jobs_service import job_out, owned_job
from api.paging import after_row, encode_cursor
from api.schemas import LogLine, LogPage, MetricOut
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import database
from models.status import TERMINAL


def log_line(row: Any) -> dict[str, Any]:
    line = LogLine.model_validate(row, from_attributes=True).model_dump(mode="json")
    # The worker's lines are ours, but one may quote an error that names a file on this server.
    return {**line, "message": without_server_paths(line["message"])}


def logs_page(session: Session, job_id: str, *, cursor: str | None, limit: int) -> LogPage:
    rows = logs_repo.query(session, job_id, after_id=after_row(cursor), limit=limit + 1)
    items, more = rows[:limit], len(rows) > limit
    return LogPage(items=[log_line(r) for r in items], next_cursor=encode_cursor(items[-1].id) if more else None)


def follow_logs(
    job_id: str, cursor: str | None, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's log as JSON lines, as they are written, until the job has finished and every line was sent
    (or the key is revoked). The caller has checked the owner; the cursor is checked now."""
    after_id = after_row(cursor)

    def poll() -> tuple[str, bool]:
        nonlocal after_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            rows = logs_repo.query(session, job_id, after_id=after_id, limit=1000)
        if rows:
            after_id = rows[-1].id
        ended = state is None or (state[0] in TERMINAL and not rows)
        return "".join(json.dumps(log_line(r)) + "\n" for r in rows), ended

    return streams.polled(poll, is_disconnected)


def follow(
    session: Session, job_id: str, principal: Principal, is_disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The job's Server-Sent Events, once the owner is checked: `status` on every change of status or
    progress, `metrics` and `logs` for new rows, `end` when it has finished and everything was sent.
    A revoked key's stream ends without `end`."""
    job_id = owned_job(session, job_id, principal.owner_id).id  # the full id, when given a prefix
    last_state, last_metric_id, last_log_id = None, None, None

    def poll() -> tuple[str, bool]:
        nonlocal last_state, last_metric_id, last_log_id
        with database().session() as session:
            if not still_valid(session, principal):
                return "", True
            state = jobs_repo.state(session, job_id)
            if state is None:
                return "", True
            state = (state[0], round(state[1], 4))
            job = jobs_repo.get(session, job_id) if state != last_state else None  # the whole row only when news
            rows = metrics_repo.query(session, job_id, after_id=last_metric_id, limit=5000)
            lines = logs_repo.query(session, job_id, after_id=last_log_id, limit=1000)
        events = []
        if job is not None:
            last_state = (job.status, round(job.progress, 4))
            events.append(f"event: status\ndata: {json.dumps(job_out(job).model_dump(mode='json'))}\n\n")
        if rows:
            last_metric_id = rows[-1].id
            payload = [MetricOut.model_validate(m, from_attributes=True).model_dump() for m in rows]
            events.append(f"event: metrics\ndata: {json.dumps(payload)}\n\n")
        if lines:
            last_log_id = lines[-1].id
            events.append(f"event: logs\ndata: {json.dumps([log_line(r) for r in lines])}\n\n")
        ended = state[0] in TERMINAL and not rows and not lines
        if ended:
            events.append("event: end\ndata: {}\n\n")
        return "".join(events), ended

    return streams.polled(poll, is_disconnected)
