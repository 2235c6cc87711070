"""Structured logs: JSON lines that carry the job id, for the API and the worker alike."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from core.logging_config import JsonFormatter, connect_celery_job_context, job_context, logging_dict

ROOT = Path(__file__).resolve().parents[2]


def log_lines(emit) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service="worker"))
    logger = logging.getLogger("gs.test.logging")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_json_with_the_job_id_of_the_running_job():
    def emit(log):
        log.info("before %s", "start")
        with job_context("job123456"):
            log.info("training", extra={"step": 40})
        log.info("done", extra={"job_id": "explicit99"})

    before, during, explicit = log_lines(emit)
    assert before["message"] == "before start" and "job_id" not in before
    assert before["level"] == "info" and before["service"] == "worker" and before["ts"].endswith("Z")
    assert during["job_id"] == "job123456" and during["step"] == 40
    assert explicit["job_id"] == "explicit99"


def test_exceptions_are_one_line_with_the_traceback_inside():
    def emit(log):
        try:
            raise ValueError("bad spec")
        except ValueError:
            log.exception("job crashed")

    (line,) = log_lines(emit)
    assert line["level"] == "error" and "ValueError: bad spec" in line["exception"]


def test_access_lines_name_the_job_of_their_path():
    path = "/v1/jobs/0123456789abcdef/metrics?since_step=3"
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", path, "1.1", 200), None)
    line = json.loads(JsonFormatter(service="api").format(record))
    assert line["job_id"] == "0123456789abcdef" and "GET /v1/jobs/" in line["message"]


def test_celery_tasks_log_with_their_job_id():
    from celery.signals import task_postrun, task_prerun

    from core.logging_config import current_job_id

    connect_celery_job_context()
    task_prerun.send(sender=None, task_id="t1", task=None, args=("abcdef0123",), kwargs={})
    assert current_job_id.get() == "abcdef0123"
    task_postrun.send(sender=None, task_id="t1", task=None, args=("abcdef0123",), kwargs={})
    assert current_job_id.get() is None


def test_uvicorn_log_config_file_is_the_generated_one():
    shipped = json.loads((ROOT / "core" / "logging_api.json").read_text())
    assert shipped == logging_dict("api"), "regenerate it: python -m core.logging_config"
