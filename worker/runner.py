"""Runs one job: claim it, call the science package, record metrics, files and the outcome."""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.paths import job_dir, resume_dir
from core.settings import Settings, get_settings
from core.storage import StoredFileTooLarge, StoreUnavailable, job_key, store
from models import files as files_repo
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import Database, database
from models.status import JobStatus
from models.tables import utcnow
from worker.files import patiently_stored, restore_resume
from worker.outages import DATABASE_BLINKS, OUTAGE_PATIENCE_S, patiently

log = logging.getLogger("gs.worker")


class JobCancelled(Exception):
    pass


class JobTimedOut(Exception):
    pass


class JobWriter(threading.Thread):
    """Writes a job's metrics and log lines off the training loop: the loop hands rows over, this thread
    inserts them in batches (one insert per table for all rows waiting), so a step never waits on the database."""

    def __init__(self, db: Database, job_id: str) -> None:
        super().__init__(daemon=True, name=f"writer-{job_id}")
        self.db, self.job_id = db, job_id
        self.rows: queue.Queue[tuple[Any, list[dict[str, Any]]] | None] = queue.Queue()

    def put(self, rows: list[dict[str, Any]]) -> None:
        self.rows.put((metrics_repo, rows))

    def say(self, level: str, message: str) -> None:
        """A line of the job's own log, which its owner reads (GET /v1/jobs/{id}/logs)."""
        self.rows.put((logs_repo, [{"at": utcnow(), "level": level, "message": message}]))

    def run(self) -> None:
        pending: dict[Any, list[dict[str, Any]]] = {metrics_repo: [], logs_repo: []}
        done, blinked_since = False, None
        while not done or any(pending.values()):
            try:  # wait for rows; with rows kept through a database blink, only a second before trying again
                item = self.rows.get(timeout=1.0 if any(pending.values()) else None)
                while True:
                    if item is None:
                        done = True
                    else:
                        pending[item[0]].extend(item[1])
                    item = self.rows.get_nowait()
            except queue.Empty:
                pass
            for repo, batch in pending.items():
                if not batch:
                    continue
                try:
                    with self.db.session() as session:
                        repo.add_batch(session, self.job_id, batch)
                    batch.clear()
                    blinked_since = None
                except DATABASE_BLINKS as exc:  # kept and tried again, for as long as an outage may last
                    blinked_since = blinked_since or time.monotonic()
                    if time.monotonic() - blinked_since < OUTAGE_PATIENCE_S:
                        break
                    log.error("job %s: %d %s rows not stored: %s", self.job_id, len(batch), repo.__name__, exc)
                    batch.clear()
                except Exception as exc:  # keep the job running; say what was lost
                    log.error("job %s: %d %s rows not stored: %s", self.job_id, len(batch), repo.__name__, exc)
                    batch.clear()

    def close(self) -> None:
        """Flush what is waiting and stop; the job's outcome is recorded only after this."""
        self.rows.put(None)
        self.join()


@dataclass
class JobContext:
    """What a running job may do to the outside world: report metrics and progress, and ask
    whether it should stop. The science package sees only plain callbacks built from this."""

    db: Database
    job_id: str
    owner_id: str
    settings: Settings
    writer: JobWriter
    deadline: float | None = None  # time.monotonic() after which the job stops (its timeout_s)
    steps: int | None = None  # a train job's length, for its log lines
    _last_poll: float = 0.0
    _stop: bool = False
    _blinking: bool = False

    @property
    def work_dir(self) -> Path:
        return job_dir(self.settings, self.job_id)

    def on_metrics(self, batch: list[Any], *, log_lines: bool = True) -> list[dict[str, Any]]:
        """Store the rows and return them as stored; `log_lines`: and say each evaluation's accuracies in the
        job's log."""
        rows = [
            {"step": m.step, "name": m.name, "value": float(m.value), "seed": m.seed, "split": m.split} for m in batch
        ]
        self.writer.put(rows)
        for line in evaluation_lines(rows, self.steps) if log_lines else ():
            self.writer.say("info", line)
        return rows

    def say(self, level: str, message: str) -> None:
        self.writer.say(level, message)

    def on_progress(self, fraction: float) -> None:
        try:
            with self.db.session() as session:
                self._stop = jobs_repo.set_progress(session, self.job_id, min(max(fraction, 0.0), 1.0))
            self._database_answers()
        except DATABASE_BLINKS as exc:  # the next report or poll will tell; the attempt goes on
            log.warning("job %s: progress not stored (database unavailable): %s", self.job_id, exc)
            self._database_blinked()
        self._last_poll = time.monotonic()
        self.check_deadline()

    def should_stop(self) -> bool:
        """Cheap to call every step: reads the cancel flag at most every cancel_poll_s."""
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= self.settings.cancel_poll_s:
            self._last_poll = now
            try:
                with self.db.session() as session:
                    self._stop = jobs_repo.cancel_requested(session, self.job_id)
                self._database_answers()
            except DATABASE_BLINKS as exc:  # read again at the next poll
                log.warning("job %s: cancel flag not read (database unavailable): %s", self.job_id, exc)
                self._database_blinked()
            self.check_deadline()
        return self._stop

    def stop_if_asked(self) -> None:
        """Raise JobCancelled (or JobTimedOut past the deadline) where the job should stop: what a wait on a
        jailed model calls between its polls."""
        if self.should_stop():
            raise JobCancelled

    def _database_blinked(self) -> None:
        # Said once per outage in the job's own log (each progress report and cancel poll would repeat it).
        if not self._blinking:
            self._blinking = True
            self.say("warning", "the database is unavailable; the job goes on, its rows wait to be stored")

    def _database_answers(self) -> None:
        if self._blinking:
            self._blinking = False
            self.say("info", "the database answers again")

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimedOut


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
        steps=spec.get("steps") if kind == "train" else None,
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
    from starvation.training import Resume

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


def run_kind(kind: str, spec: dict, ctx: JobContext) -> tuple[JobStatus, dict | None, dict | None]:
    from jail import JailError
    from starvation.checkpoints import CheckpointError, out_of_memory
    from starvation.datasets import DatasetError
    from starvation.errors import SpecError
    from starvation.repair import NoLinearHead, UnsupportedMethod
    from starvation.training import TrainingStopped
    from worker import audit_job, repair_job, sweep_job, train_job

    handlers: dict[str, Callable[[dict, JobContext], dict]] = {
        "train": train_job.run,
        "audit": audit_job.run,
        "repair": repair_job.run,
        "sweep": sweep_job.run,
    }
    try:
        result = handlers[kind](spec, ctx)
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
        return JobStatus.SUCCEEDED, result, None
    except (TrainingStopped, JobCancelled):
        if ctx.deadline is not None and time.monotonic() > ctx.deadline:
            return JobStatus.FAILED, None, timeout_error(spec)
        return JobStatus.CANCELLED, None, None
    except JobTimedOut:
        return JobStatus.FAILED, None, timeout_error(spec)
    except (JailError, CheckpointError) as exc:  # a foreign model refused or failed: messages we wrote
        return JobStatus.FAILED, None, {"code": exc.code, "message": exc.message}
    except DatasetError as exc:
        return JobStatus.FAILED, None, {"code": exc.code, "message": str(exc)}
    except NoLinearHead as exc:
        return JobStatus.FAILED, None, {"code": "no_linear_head", "message": f"The model cannot be repaired: {exc}."}
    except UnsupportedMethod as exc:
        return JobStatus.FAILED, None, {"code": "unsupported_method", "message": str(exc)}
    except SpecError as exc:
        return JobStatus.FAILED, None, {"code": "invalid_spec", "message": str(exc)}
    except StoreUnavailable as exc:  # past the writes' patience (worker/files.py)
        log.error("job %s: the object store stayed unavailable: %s", ctx.job_id, exc)
        return (
            JobStatus.FAILED,
            None,
            {"code": "store_unavailable", "message": "The object store stayed unavailable; run the job again later."},
        )
    except StoredFileTooLarge as exc:
        return JobStatus.FAILED, None, {"code": "input_too_large", "message": str(exc)}
    except FileNotFoundError as exc:
        # Ours name what is missing; the operating system's would name a path on this server.
        message = str(exc) if exc.filename is None else "A file this job needs is missing."
        return JobStatus.FAILED, None, {"code": "missing_input", "message": message}
    except Exception as exc:
        if out_of_memory(exc):  # past the worker child's RLIMIT_AS: the job's size, not a crash to retry
            log.error("job %s ran out of memory:\n%s", ctx.job_id, traceback.format_exc())
            return (
                JobStatus.FAILED,
                None,
                {"code": "memory_limit", "message": "The job needed more memory than this worker may use."},
            )
        # our fault: the details go to our log only (the job's log names the kind of error), keep the worker alive
        log.error("job %s crashed:\n%s", ctx.job_id, traceback.format_exc())
        ctx.say("error", f"internal error ({type(exc).__name__}); the operators' log has the details")
        return (
            JobStatus.FAILED,
            None,
            {"code": "internal_error", "message": "The job failed on our side; the operators have the details."},
        )


def non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinity in a JSON-like value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")) is not None:
            return found
    return None


def evaluation_lines(rows: list[dict[str, Any]], steps: int | None) -> list[str]:
    """One log line per evaluated step: each split's accuracy (test first, then by name), the mean over seeds."""
    accuracy: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        if row["name"] == "accuracy" and row["split"]:
            accuracy.setdefault(row["step"], {}).setdefault(row["split"], []).append(row["value"])
    lines = []
    for step, splits in sorted(accuracy.items()):
        ordered = sorted(splits.items(), key=lambda item: (item[0] != "test", item[0]))  # test first
        parts = [f"{split} accuracy {sum(values) / len(values):.3f}" for split, values in ordered]
        seeds = max(len(values) for values in splits.values())
        lines.append(
            f"step {step}{f'/{steps}' if steps else ''}: {', '.join(parts)}"
            + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        )
    return lines


def timeout_error(spec: dict[str, Any]) -> dict[str, str]:
    return {"code": "timeout", "message": f"The job ran longer than its timeout_s of {spec.get('timeout_s')} s."}
