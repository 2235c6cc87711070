"""The Celery application. Importing it never touches CUDA: workers initialise it in the child."""
from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_process_init
from kombu import Exchange, Queue

from api.logging_config import configure_logging, connect_celery_job_context
from api.settings import Settings, get_settings

RUN_JOB = "gs.run_job"
QUEUES = ("gpu", "cpu")
# Redis redelivers an unacked message after this long; it must exceed the longest job.
VISIBILITY_TIMEOUT_S = 24 * 3600


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


def make_celery(settings: Settings) -> Celery:
    app = Celery("gs", broker=settings.broker_url, include=["worker.tasks"])
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
    )
    return app


app = make_celery(get_settings())


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # Connections opened before fork must not be shared with the child.
    from worker import runner

    runner.reset_process_state()


@setup_logging.connect
def _json_logs(loglevel: str | None = None, **_: object) -> None:
    configure_logging("worker", loglevel or "INFO")


connect_celery_job_context()  # log lines inside a task carry its job_id
