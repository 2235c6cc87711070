"""The Celery application. Importing it never touches CUDA: workers initialise it in the child."""
from __future__ import annotations

import logging
import os
import resource

from celery import Celery
from celery.signals import setup_logging, worker_process_init
from kombu import Exchange, Queue

from api.logging_config import configure_logging, connect_celery_job_context
from api.settings import Settings, get_settings

RUN_JOB = "gs.run_job"
QUEUES = ("gpu", "cpu")
# Redis redelivers an unacked message after this long; it must exceed the longest job.
VISIBILITY_TIMEOUT_S = 24 * 3600
WORKER_START_TIMEOUT_S = 120.0

log = logging.getLogger("gs.worker")
PER_CPU_ADDRESS_SPACE = 128 << 20


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
        # A child imports torch at start (limit_address_space); Celery's default 4 s to come up is too short.
        worker_proc_alive_timeout=WORKER_START_TIMEOUT_S,
    )
    return app


app = make_celery(get_settings())


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # Connections opened before fork must not be shared with the child.
    from worker import runner

    runner.reset_process_state()


@worker_process_init.connect
def _memory_limit_in_child(**_: object) -> None:
    limit = limit_address_space(get_settings())
    if limit is not None:
        log.info("worker child %d: address space limited to %.1f GiB (RLIMIT_AS)", os.getpid(), limit / 2**30)


def address_space_limit(mapped_bytes: int, settings: Settings, cpus: int | None = None) -> int:
    """RLIMIT_AS for a worker child that maps `mapped_bytes` with torch loaded: that, the jobs' memory budget
    (what `starvation.budget` lets a job use at submit), the headroom for libraries imported later, and per CPU
    what torch's threads map (measured: ~90 MiB each, an 8 MiB stack and a 64 MiB malloc arena)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return (mapped_bytes + settings.worker_memory_budget_bytes + settings.worker_address_space_headroom_bytes
            + cpus * PER_CPU_ADDRESS_SPACE)


def limit_address_space(settings: Settings) -> int | None:
    """Cap this process's address space (soft RLIMIT_AS) after importing torch; the limit, or None where skipped.

    A job past it fails with MemoryError (or torch's "can't allocate memory") instead of taking the machine, and
    the OOM killer's retry loop with it. Only the soft limit: the jail's children, started from here, set their
    own (jail/lockdown.py). Skipped where a job may use CUDA: the driver reserves terabytes of virtual address
    space (unified memory), so any RLIMIT_AS that lets it start limits nothing.
    """
    if not settings.worker_limit_address_space:
        return None
    import torch  # the child imports it for its first job anyway; its mappings are part of the baseline

    may_use_cuda = settings.device != "cpu" or "gpu" in settings.worker_queues.split(",")
    if may_use_cuda and torch.cuda.is_available():
        log.info("worker child %d: CUDA present, no RLIMIT_AS (CUDA maps huge virtual ranges)", os.getpid())
        return None
    from jail.lockdown import address_space_in_use

    limit = address_space_limit(address_space_in_use(), settings)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


@setup_logging.connect
def _json_logs(loglevel: str | None = None, **_: object) -> None:
    configure_logging("worker", loglevel or "INFO")


connect_celery_job_context()  # log lines inside a task carry its job_id
