"""Structured logs: one JSON object per line, with the job id whenever a line concerns a job.

The API (uvicorn, through `core/logging_api.json`) and the worker (Celery's `setup_logging` signal)
both log through `JsonFormatter`. A job id comes from, in order: `extra={"job_id": ...}` on the
call, the job the current task runs (`job_context`, set for every Celery task by
`connect_celery_job_context`), or the path of an access-log line (`/v1/jobs/<id>...`).
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

current_job_id: ContextVar[str | None] = ContextVar("gs_current_job_id", default=None)

_JOB_PATH = re.compile(r"/(?:v1/jobs|dashboard/jobs)/([0-9A-Za-z_-]{8,64})")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
# uvicorn's color_message repeats the message with terminal colours.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "service", "logger", "message", "job_id"?, ...extra, "exception"?}`."""

    def __init__(self, service: str = "gs", **_: Any) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or current_job_id.get() or _job_id_in_path(record)
        if job_id:
            entry["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _job_id_in_path(record: logging.LogRecord) -> str | None:
    # uvicorn's access lines carry (client, method, path, http version, status) as args.
    if record.name != "uvicorn.access" or not isinstance(record.args, tuple) or len(record.args) < 3:
        return None
    match = _JOB_PATH.search(str(record.args[2]))
    return match.group(1) if match else None


def logging_dict(service: str, level: str | int = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` document: everything to stderr as JSON lines."""
    level_name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "core.logging_config.JsonFormatter", "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level_name},
        # uvicorn and celery add handlers of their own unless told to leave logging to the root.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")
        },
    }


def configure_logging(service: str, level: str | int = "INFO") -> None:
    logging.config.dictConfig(logging_dict(service, level))


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every line logged inside the block carries `job_id`."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


def _job_id_of_task(args: Any, kwargs: Any) -> str | None:
    # gs.run_job(job_id): the job id is the task's first argument.
    if isinstance(kwargs, dict) and isinstance(kwargs.get("job_id"), str):
        return kwargs["job_id"]
    if isinstance(args, (list, tuple)) and args and isinstance(args[0], str):
        return args[0]
    return None


def _on_task_prerun(args: Any = None, kwargs: Any = None, **_: Any) -> None:
    current_job_id.set(_job_id_of_task(args, kwargs))


def _on_task_postrun(**_: Any) -> None:
    current_job_id.set(None)


def connect_celery_job_context() -> None:
    """Tag every log line of a Celery task with the job it runs (idempotent)."""
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid="gs_job_context_prerun")
    task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="gs_job_context_postrun")


def write_uvicorn_config(path: str) -> None:
    """Regenerate `core/logging_api.json` (uvicorn's --log-config) from `logging_dict("api")`."""
    with open(path, "w") as handle:
        json.dump(logging_dict("api"), handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    import pathlib

    write_uvicorn_config(str(pathlib.Path(__file__).with_name("logging_api.json")))
