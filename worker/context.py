"""What a running job may touch: its context (metrics, log lines, progress, the cancel flag, the deadline) and the
two ways it stops early. Below every job module and the runner, so that none of them imports another to get these."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.paths import job_dir
from core.settings import Settings
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import Database
from models.tables import utcnow
from worker.outages import DATABASE_BLINKS, OUTAGE_PATIENCE_S

log = logging.getLogger("gs.worker")


class JobCancelled(Exception):
    """The owner cancelled the job; it ends `cancelled`."""


class JobTimedOut(Exception):
    """The job ran past its timeout_s; it fails with `timeout`."""


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
    _said_non_finite: bool = False

    @property
    def work_dir(self) -> Path:
        return job_dir(self.settings, self.job_id)

    def on_metrics(self, batch: list[Any], *, log_lines: bool = True) -> list[dict[str, Any]]:
        """Store the rows and return them as stored; `log_lines`: and say each evaluation's accuracies in the
        job's log. A NaN or infinite value (a diverged loss) is not stored: no database keeps it as a number and
        JSON has none; the job's log says once where the first one came."""
        rows = []
        for m in batch:
            value = float(m.value)
            if math.isfinite(value):
                rows.append({"step": m.step, "name": m.name, "value": value, "seed": m.seed, "split": m.split})
            elif not self._said_non_finite:
                self._said_non_finite = True
                where = " ".join(f"{k} {v}" for k, v in (("split", m.split), ("seed", m.seed)) if v is not None)
                self.writer.say(
                    "warning",
                    f"{m.name} is {value} at step {m.step} ({where}): the training diverged (a smaller learning rate "
                    "may help); values that are not finite are not stored",
                )
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
