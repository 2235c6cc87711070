"""Pages of jobs, metrics and log lines: opaque cursors (what a page continues after), their checks, and tag
filters. A cursor this API did not issue is a 400."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.hygiene import MAX_DB_INT, first_unstorable
from models import jobs as jobs_repo
from models.status import JobStatus
from models.tables import ID_LENGTH, Job

JOB_ID = re.compile(f"[0-9a-f]{{{ID_LENGTH}}}")  # a uuid4's hex digits (models/tables.py new_id)


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def invalid_cursor() -> ApiError:
    # 400 as docs/api.md and the OpenAPI document promise: a cursor is an opaque token, and this one is not ours.
    return ApiError(400, "invalid_cursor", "The cursor is not one this API returned.")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(parts, list) or len(parts) != size or first_unstorable(parts, []) is not None:
            raise ValueError
        return parts
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_cursor() from None


def tag_filters(items: list[str]) -> dict[str, str]:
    """["team:x", ...] of ?tag= as {"team": "x"}."""
    tags: dict[str, str] = {}
    for item in items:
        if ":" not in item:
            raise ApiError(400, "invalid_tag_filter", f"Tag filter {item!r} is not of the form k:v.")
        key, value = item.split(":", 1)
        tags[key] = value
    return tags


def list_jobs(
    session: Session,
    owner_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    kind: str | None = None,
    status: JobStatus | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the owner's jobs, newest first, and the cursor of the next page (None on the last)."""
    after = job_after(cursor) if cursor else None
    page = jobs_repo.list_page(
        session, owner_id=owner_id, limit=limit, after=after, kind=kind, status=status, tags=tags or {}
    )
    items, more = page[:limit], len(page) > limit
    return items, encode_cursor(items[-1].created_at.isoformat(), items[-1].id) if more else None


def job_after(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a jobs cursor continues after: a UTC time and a job id, as `list_jobs` wrote them."""
    created_at, job_id = decode_cursor(cursor, 2)
    try:
        after = datetime.fromisoformat(created_at)
        if after.tzinfo is None or not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ValueError
        return after.astimezone(UTC), job_id
    except (TypeError, ValueError, OverflowError):  # OverflowError: an offset that moves it past year 1 or 9999
        raise invalid_cursor() from None


def after_row(cursor: str | None) -> int | None:
    """The row a metrics or logs cursor continues after (None: from the start)."""
    if not cursor:
        return None
    (after_id,) = decode_cursor(cursor, 1)
    if type(after_id) is not int or not 0 <= after_id <= MAX_DB_INT:  # not isinstance: JSON's true is a bool
        raise invalid_cursor()
    return after_id
