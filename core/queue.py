"""The broker: queue names, the Celery configuration both sides share, and sending a job.

The API sends through `broker()`, an app that knows no task bodies; the worker builds its own app
from the same `make_celery` and adds its tasks (worker/celery_app.py). Importing this never
imports the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from kombu import Exchange, Queue

from core.settings import Settings, get_settings

RUN_JOB = "gs.run_job"
QUEUES = ("gpu", "cpu")
# Redis redelivers an unacked message after this long; it must exceed the longest job.
VISIBILITY_TIMEOUT_S = 24 * 3600
WORKER_START_TIMEOUT_S = 120.0
# With a timeout_s a job stops itself; Celery kills the process this much later if it could not.
HARD_LIMIT_GRACE_S = 60

log = logging.getLogger("gs.queue")


def broker_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    return {"visibility_timeout": VISIBILITY_TIMEOUT_S}


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    app = Celery("gs", broker=settings.broker_url, include=list(include))
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        # Each queue its own direct exchange, so a message lands in exactly one queue.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_acks_late=True,  # a worker that dies mid-job leaves the message for another
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time per worker process (one per GPU)
        task_ignore_result=True,  # the database row is the result
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # A child imports torch at start (limit_address_space); Celery's default 4 s to come up is too short.
        worker_proc_alive_timeout=WORKER_START_TIMEOUT_S,
    )
    return app


@lru_cache(maxsize=1)
def broker() -> Celery:
    """The sending side's app (the API's): made once per process, on first use."""
    return make_celery(get_settings())


def send(job_id: str, queue: str, timeout_s: float | None = None) -> bool:
    """True once the broker has the message. Never raises: the outbox sweep will try again.

    With a timeout_s the job stops itself at that time (cooperatively); Celery kills the
    process a minute later if it could not (the hard limit).
    """
    limits = {"time_limit": timeout_s + HARD_LIMIT_GRACE_S} if timeout_s else {}
    app = broker()
    try:
        with app.connection_for_write() as connection:
            # Fail fast when the broker is down: the request must not wait on reconnects.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
            app.send_task(
                RUN_JOB,
                args=[job_id],
                queue=queue,
                retry=False,
                headers={"job_id": job_id},
                connection=connection,
                **limits,
            )
        return True
    except Exception as exc:  # broker down: the job stays queued with enqueued_at = null
        log.warning("broker unreachable, job %s stays in the outbox: %s", job_id, exc)
        return False


def check_broker() -> None:
    """For readiness: raises what the connection raised when the broker cannot be reached."""
    with broker().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
