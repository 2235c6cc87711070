"""The Celery application. Importing it never touches CUDA: workers initialise it in the child."""

from __future__ import annotations

import logging
import os
import resource

from celery.signals import setup_logging, worker_process_init

from core.logging_config import configure_logging, connect_celery_job_context
from core.queue import make_celery
from core.settings import Settings, get_settings
from models.db import forget_database

log = logging.getLogger("gs.worker")
PER_CPU_ADDRESS_SPACE = 128 << 20


app = make_celery(get_settings(), include=["worker.tasks"])


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # Connections opened before fork must not be shared with the child.
    forget_database()


@worker_process_init.connect
def _may_start_data_loaders(**_: object) -> None:
    # Celery's pool marks its children daemonic, and multiprocessing refuses children to a daemon; an image folder's
    # DataLoader needs them (GS_DATA_WORKERS). Its workers watch this process and exit when it does.
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]  # no public setter


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
    return (
        mapped_bytes
        + settings.worker_memory_budget_bytes
        + settings.worker_address_space_headroom_bytes
        + cpus * PER_CPU_ADDRESS_SPACE
    )


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
