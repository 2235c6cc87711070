"""Runs one job: claim it, call the science package, record metrics, files and the outcome."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
from typing import Any

from pydantic import ValidationError

from core.object_images import ImageChanged
from core.paths import job_dir, resume_dir
from core.settings import Settings, get_settings
from core.storage import StoredFileTooLarge, StoreUnavailable, job_key, store
from models import files as files_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import Database, database
from models.status import JobStatus
from starvation.checkpoints import out_of_memory
from starvation.errors import CodedError
from starvation.training import Resume, TrainingStopped
from worker.context import JobCancelled, JobContext, JobTimedOut, JobWriter
from worker.files import patiently_stored, restore_resume
from worker.kinds import KINDS
from worker.outages import patiently

log = logging.getLogger("gs.worker")


class Heartbeat(threading.Thread):
    """Beats for the job while it runs, whatever the job is doing (loading data, exporting...)."""

    def __init__(self, db: Database, job_id: str, every_s: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.db, self.job_id, self.every_s = db, job_id, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                with self.db.session() as session:
                    jobs_repo.set_progress(session, self.job_id)
            except Exception as exc:  # a missed beat is not fatal; the next one may pass
                log.warning("heartbeat for job %s failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self.stopped.set()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str) -> None:
    db = database()
    settings = get_settings()
    with db.session() as session:
        if not jobs_repo.claim(session, job_id, worker_id()):
            log.info("job %s not claimable (cancelled, finished or taken)", job_id)
            return
        job = jobs_repo.get(session, job_id)
        assert job is not None
        kind, spec, owner_id, attempts = job.kind, dict(job.spec), job.owner_id, job.attempts
    if attempts > 1:
        forget_earlier_attempt(db, job_id, settings)
    timeout_s = spec.get("timeout_s")
    writer = JobWriter(db, job_id)
    ctx = JobContext(
        db=db,
        job_id=job_id,
        owner_id=owner_id,
        settings=settings,
        deadline=time.monotonic() + timeout_s if timeout_s else None,
        writer=writer,
        steps=spec.get("steps"),  # a training kind's length, for its log lines
    )
    log.info("job %s started (%s, attempt %d)", job_id, kind, attempts)
    heartbeat = Heartbeat(db, job_id, settings.heartbeat_s)
    heartbeat.start()
    writer.start()
    started = time.monotonic()
    ctx.say("info", f"{kind} job started: attempt {attempts} on worker {worker_id()}")
    try:
        status, result, error = run_kind(kind, spec, ctx)
        took = f"after {time.monotonic() - started:.1f} s"
        if error is not None:
            ctx.say("error", f"{status} {took}: {error['message']} ({error['code']})")
        else:
            ctx.say("info", f"{status} {took}")
    finally:
        heartbeat.stop()
        writer.close()
        if not store(settings).local:  # all it kept is in the store: this host's copy was scratch
            shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
    patiently(lambda: record_outcome(db, job_id, status, result, error), f"outcome of job {job_id}")
    log.info("job %s %s", job_id, status)


def record_outcome(db: Database, job_id: str, status: JobStatus, result: dict | None, error: dict | None) -> None:
    with db.session() as session:
        jobs_repo.finish(session, job_id, status, result=result, error=error)


def forget_earlier_attempt(db: Database, job_id: str, settings: Settings) -> dict[int, int | None]:
    """A re-run starts clean: what a lost worker half-wrote would otherwise be counted twice. Except what a train
    job saved to resume from (`resume_dir`): that folder stays, and so do the metrics of the steps before each
    seed's saved step, which the resumed run does not report again. Returns those steps per seed."""
    folder = job_dir(settings, job_id)
    saved = restore_resume(settings, job_id)  # from the store: the lost worker may have been another host
    kept = Resume.reported(saved) if saved.is_dir() else {}
    with db.session() as session:
        files_repo.forget_outputs(session, job_id)
        metrics_repo.forget(session, job_id, kept_before=kept)
    patiently_stored(lambda: store(settings).delete_prefix(job_key(job_id), keep=job_key(job_id, "resume")), job_id)
    for path in folder.iterdir() if folder.is_dir() else ():
        if path != resume_dir(folder):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return kept


def run_kind(kind: str, spec: dict[str, Any], ctx: JobContext) -> tuple[JobStatus, dict | None, dict | None]:
    """Run the kind's module (worker/kinds.py) and say how it ended: (status, result, error). A result is recorded
    only once it matches the kind's result model, so that a malformed one fails this job rather than a later GET."""
    job_module = KINDS[kind]
    try:
        result = job_module.run(spec, ctx)
    except (TrainingStopped, JobCancelled):
        if ctx.deadline is not None and time.monotonic() > ctx.deadline:
            return JobStatus.FAILED, None, timeout_error(spec)
        return JobStatus.CANCELLED, None, None
    except JobTimedOut:
        return JobStatus.FAILED, None, timeout_error(spec)
    except Exception as exc:
        return JobStatus.FAILED, None, job_error(exc, ctx)
    if (where := non_finite(result, "result")) is not None:  # no database write may refuse an outcome
        log.warning("job %s: %s is not a finite number", ctx.job_id, where)
        return (
            JobStatus.FAILED,
            None,
            {
                "code": "non_finite_output",
                "message": f"The job's {where} is NaN or infinite: the model's outputs are not finite numbers.",
            },
        )
    try:
        job_module.Result.model_validate(result)
    except ValidationError as exc:
        log.error("job %s: its result is not a %s: %s", ctx.job_id, job_module.Result.__name__, exc)
        ctx.say("error", "internal error (a malformed result); the operators' log has the details")
        return JobStatus.FAILED, None, INTERNAL_ERROR
    return JobStatus.SUCCEEDED, result, None


INTERNAL_ERROR = {"code": "internal_error", "message": "The job failed on our side; the operators have the details."}


def job_error(exc: Exception, ctx: JobContext) -> dict[str, str]:
    """The error a job fails with when it raised `exc`: the code and message of one of our errors (starvation.errors
    `CodedError`, the jail's too), else what the exception's type tells, else ours to look into."""
    if isinstance(exc, CodedError):  # a bad spec, dataset or upload, a foreign model that failed: messages we wrote
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, ImageChanged):  # an image of a folder in the store replaced since its check
        return {"code": "input_changed", "message": str(exc)}
    if isinstance(exc, StoreUnavailable):  # past the writes' (or reads') patience (worker/files.py)
        log.error("job %s: the object store stayed unavailable: %s", ctx.job_id, exc)
        return {"code": "store_unavailable", "message": "The object store stayed unavailable; run the job again later."}
    if isinstance(exc, StoredFileTooLarge):
        return {"code": "input_too_large", "message": str(exc)}
    if isinstance(exc, FileNotFoundError):
        # Ours name what is missing; the operating system's would name a path on this server.
        return {
            "code": "missing_input",
            "message": str(exc) if exc.filename is None else "A file this job needs is missing.",
        }
    if out_of_memory(exc):  # past the worker child's RLIMIT_AS: the job's size, not a crash to retry
        log.error("job %s ran out of memory:\n%s", ctx.job_id, traceback.format_exc())
        return {"code": "memory_limit", "message": "The job needed more memory than this worker may use."}
    # our fault: the details go to our log only (the job's log names the kind of error), keep the worker alive
    log.error("job %s crashed:\n%s", ctx.job_id, traceback.format_exc())
    ctx.say("error", f"internal error ({type(exc).__name__}); the operators' log has the details")
    return INTERNAL_ERROR


def non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinity in a JSON-like value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")) is not None:
            return found
    return None


def timeout_error(spec: dict[str, Any]) -> dict[str, str]:
    return {"code": "timeout", "message": f"The job ran longer than its timeout_s of {spec.get('timeout_s')} s."}
