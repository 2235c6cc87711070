"""`--wait`: follow a job to its end with a live progress bar and its latest metrics.

The job's event stream (SSE) drives the bar; when the stream breaks, we reconnect (the server sends
everything again, so rows are de-duplicated), and after repeated failures fall back to polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from cli.client import TERMINAL, ApiClient, ApiFailure, JobStatus

POLL_S = 1.0
BAR_WIDTH = 30  # spinner, "train 0123456789ab running", bar, percentage and elapsed time fit in 80 columns
MAX_STREAM_FAILURES = 3


class LatestMetrics:
    """The newest value of each (seed, split, name), and a one-line summary for the bar."""

    def __init__(self, total_steps: int | None) -> None:
        self.total_steps = total_steps
        self.seen: set[tuple] = set()
        self.values: dict[tuple[Any, Any, str], tuple[int, float]] = {}
        self.seed: Any = None
        self.step = -1

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            key = (row["step"], row["name"], row.get("seed"), row.get("split"))
            if key in self.seen:
                continue
            self.seen.add(key)
            slot = (row.get("seed"), row.get("split"), row["name"])
            if slot not in self.values or row["step"] >= self.values[slot][0]:
                self.values[slot] = (row["step"], row["value"])
            # Rows come in the order they were written, and seeds train one after another.
            self.seed, self.step = row.get("seed"), row["step"]

    def line(self) -> str:
        if self.step < 0:
            return ""

        def value(split: str | None, name: str) -> float | None:
            found = self.values.get((self.seed, split, name))
            return found[1] if found else None

        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"seed {self.seed}" if self.seed is not None else "", f"step {self.step}{total}"]
        for label, split, name in (
            ("loss", "train", "loss"),
            ("train acc", "train", "accuracy"),
            ("test acc", "test", "accuracy"),
            ("starved", "train", "starved_fraction"),
        ):
            number = value(split, name)
            if number is not None:
                parts.append(f"{label} {number:.3f}")
        return "  ".join(p for p in parts if p)


def follow(
    client: ApiClient, job_id: str, on_status: Callable[[dict], None], on_metrics: Callable[[list[dict]], None]
) -> dict:
    """Call back on every status and batch of metrics until the job ends; return the final job."""
    failures = 0
    while failures < MAX_STREAM_FAILURES:
        try:
            for event, data in client.events(job_id):
                if event == "status":
                    on_status(data)
                elif event == "metrics":
                    on_metrics(data)
            final = client.job(job_id)
            on_status(final)
            if final["status"] in TERMINAL:
                return final
            time.sleep(POLL_S)  # the stream ended early (a restarting server): open it again
        except ApiFailure as failure:
            if failure.status is not None and failure.status < 500:
                raise  # 401/404: reconnecting will not help
            failures += 1
            time.sleep(POLL_S * failures)
    return poll(client, job_id, on_status, on_metrics)


def poll(
    client: ApiClient, job_id: str, on_status: Callable[[dict], None], on_metrics: Callable[[list[dict]], None]
) -> dict:
    since_step: int | None = None
    while True:
        job = client.job(job_id)
        rows = client.metrics(job_id, since_step=since_step)
        if rows:
            on_metrics(rows)
            since_step = max(r["step"] for r in rows)  # that step again: a seed may be mid-way through it
        on_status(job)
        if job["status"] in TERMINAL:
            return job
        time.sleep(POLL_S)


def wait_with_progress(client: ApiClient, job: dict, console: Console) -> dict:
    """A bar with the status and percentage on one line, the latest metrics on the next: 80 columns hold both."""
    latest = LatestMetrics((job.get("spec") or {}).get("steps"))
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=BAR_WIDTH),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    metrics = Text("", no_wrap=True, overflow="ellipsis")
    task = progress.add_task(f"{job['kind']} {job['id'][:12]} {job['status']}", total=1.0)
    with Live(Group(progress, metrics), console=console, refresh_per_second=8):

        def on_status(current: dict) -> None:
            progress.update(
                task,
                completed=current.get("progress") or 0.0,
                description=f"{current['kind']} {current['id'][:12]} {current['status']}",
            )

        def on_metrics(rows: list[dict]) -> None:
            latest.add(rows)
            metrics.plain = latest.line()

        final = follow(client, job["id"], on_status, on_metrics)
        if final["status"] == JobStatus.SUCCEEDED:
            progress.update(task, completed=1.0)
    return final
