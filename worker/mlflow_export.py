"""A train job's MLflow run: params when it starts, metrics while it trains, result and reports when it ends.

A spec asks for it with `"mlflow": {"tracking_uri": ..., "experiment": ...}`. One job is one MLflow
run, tagged `gs.job_id`. `MlflowRun` logs from a thread of its own, so the training loop never waits
on the server: metric rows go in batches (every `flush_s` seconds, or `BATCH` rows), and `finish` adds
only what the run lacks. A server that stops answering costs a warning, not the job: the rows wait
and are sent again, at the latest when the job ends. Exporting a job whose run finished already
returns that run, so a retried job never makes a second one.

The tracking URI is user input: it is checked again here (core/outbound.py), MLflow's connections go
only to checked addresses, and the server's `artifact_uri` is followed only back to that server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from core import outbound
from models.kinds import JobKind

JOB_ID_TAG = "gs.job_id"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
BATCH = 1000  # MLflow's limit on entries in one log_batch call
PARAMS_PER_BATCH = 100
FLUSH_S = 5.0  # the longest a live metric waits for its batch
RETRY_S = 60.0  # after a failed live call, the wait before the next one
MAX_ERROR_CHARS = 500  # an MLflow error can quote a whole response


def export_run(
    *,
    tracking_uri: str,
    experiment: str,
    job_id: str,
    spec: dict,
    metrics: list[dict],
    result: dict,
    reports: Sequence[str] = (),
    allowed_schemes: Sequence[str] = outbound.WEB_SCHEMES,
    outbound_allow: str = "",
) -> str:
    """Log a finished job to `experiment` at `tracking_uri` in one go and return the MLflow run id.

    `metrics`: rows as GET /v1/jobs/{id}/metrics serves them ({step, name, value, seed, split}).
    `reports`: every seed's report file, each logged with the plots (PNG) beside it under report/<its folder>
    (e.g. report/seed1-audit/).
    Each (name, split, seed) becomes one MLflow metric key (`metric_key`) with its history by step.
    `allowed_schemes` and `outbound_allow`: GS_MLFLOW_ALLOWED_SCHEMES and GS_OUTBOUND_ALLOW.
    Raises OutboundRefused for a target (or an artifact location) this service must not write to.
    """
    run = MlflowRun(
        tracking_uri=tracking_uri,
        experiment=experiment,
        job_id=job_id,
        spec=spec,
        allowed_schemes=allowed_schemes,
        outbound_allow=outbound_allow,
    )
    return run.finish(metrics, result, reports)


class MlflowRun:
    """One train job's MLflow run, fed while the job runs.

    `start()` opens the run (tags, params) in a thread, which then logs what `add` hands over, in batches.
    `finish()` stops the thread; it logs the metric points the run lacks (no point twice), the summary, what
    the result says of the job (`init`, `resumed`, the verdict), the result and the reports, and marks the run
    FINISHED. `abandon()` marks it KILLED or FAILED instead, for a job that ends without a result.

    `on_trouble(error, retrying)`: said once when a live call fails (`retrying`: the rows wait for the next
    try; False: the target is refused for good), `on_recovery()` when the server answers again. `live_error`
    keeps the first error. Arguments as `export_run`'s; `flush_s`, `retry_s`: see FLUSH_S and RETRY_S.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        job_id: str,
        spec: dict,
        allowed_schemes: Sequence[str] = outbound.WEB_SCHEMES,
        outbound_allow: str = "",
        flush_s: float = FLUSH_S,
        retry_s: float = RETRY_S,
        on_trouble: Callable[[str, bool], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
    ) -> None:
        self.tracking_uri, self.experiment, self.job_id, self.spec = tracking_uri, experiment, job_id, spec
        self.allowed_schemes, self.outbound_allow = allowed_schemes, outbound_allow
        self.flush_s, self.retry_s = flush_s, retry_s
        self.on_trouble, self.on_recovery = on_trouble, on_recovery
        self.run_id: str | None = None
        self.finished_before = False  # an earlier attempt of the job finished the run: nothing more to log
        self.live_error: str | None = None
        self.logged: set[tuple[str, int]] = set()  # (metric key, step) of every point the run has
        self._client: Any = None
        self._artifact_uri = ""
        self._items: queue.Queue[tuple[int, list[dict]] | str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._troubled = self._refused = False

    # ---- while the job runs ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._live, daemon=True, name=f"mlflow-{self.job_id}")
        self._thread.start()

    def add(self, rows: Sequence[dict]) -> None:
        """Metric rows ({step, name, value, seed, split}), stamped now, for the next batch."""
        if self._thread is not None and rows:
            self._items.put((int(time.time() * 1000), list(rows)))

    def abandon(self, status: str) -> None:
        """The job ends without a result: the thread marks the run `status` (KILLED, FAILED) and stops. Nothing
        here waits on the server: a cancelled job stops at once."""
        if self._thread is not None:
            self._items.put(status)
            self._thread = None

    def _live(self) -> None:
        pending: list[tuple[int, dict]] = []
        oldest = 0.0  # when the oldest pending row came
        next_try = 0.0  # after a failed call, not before this
        if not self._attempt(lambda: None):  # opened now, the run shows its params from the job's start
            if self._refused:
                return
            next_try = time.monotonic() + self.retry_s
        while True:
            wake = max(oldest + self.flush_s, next_try) if pending else next_try if self.run_id is None else None
            item: tuple[int, list[dict]] | tuple[()] | str | None
            try:
                item = self._items.get(timeout=None if wake is None else max(0.0, wake - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return  # finish() sends what is pending
            if isinstance(item, str):  # abandon(item): the points that came, then the run's end
                if self.run_id is not None and not self.finished_before:
                    self._attempt(functools.partial(self._end, pending, item))
                return
            if item:
                oldest = oldest if pending else time.monotonic()
                pending += [(item[0], row) for row in item[1]]
            now = time.monotonic()
            due = self.run_id is None or len(pending) >= BATCH or (pending and now >= oldest + self.flush_s)
            if now < next_try or not due:
                continue
            if self._attempt(functools.partial(self._log_metrics, pending)):
                pending, next_try = [], 0.0
            elif self._refused:
                return
            else:
                next_try = time.monotonic() + self.retry_s

    def _end(self, pending: Sequence[tuple[int, dict]], status: str) -> None:
        self._log_metrics(pending)
        self._client.set_terminated(self.run_id, status)

    def _attempt(self, call: Callable[[], Any]) -> bool:
        """`call` on the opened run; False when it failed (said once per outage)."""
        try:
            with outbound.guard_urllib3(self.outbound_allow):
                self._open()
                call()
        except Exception as exc:
            self._refused = isinstance(exc, outbound.OutboundRefused)
            if not self._troubled:
                self._troubled = True
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                self.live_error = self.live_error or error
                if self.on_trouble is not None:
                    self.on_trouble(error, not self._refused)
            return False
        if self._troubled:
            self._troubled = False
            if self.on_recovery is not None:
                self.on_recovery()
        return True

    # ---- when the job ends -------------------------------------------------------------------

    def finish(self, metrics: Sequence[dict], result: dict, reports: Sequence[str] = ()) -> str:
        """Stop the live logging, log what the run lacks and the rest of the job, and return the run id.

        `metrics`: every row of the job (those sent live are not sent again). Raises what the checks or the
        server raised (OutboundRefused for a target this service must not write to); the run is marked FAILED.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            self._items.put(None)
            thread.join()
        outbound.check_target(self.tracking_uri, self.allowed_schemes, self.outbound_allow)
        with outbound.guard_urllib3(self.outbound_allow):
            self._open()
            assert self.run_id is not None
            if self.finished_before:
                return self.run_id
            try:
                self._log_rest(metrics, result, reports)
            except Exception:
                with contextlib.suppress(Exception):  # the export's own error says more
                    self._client.set_terminated(self.run_id, "FAILED")
                raise
            self._client.set_terminated(self.run_id, "FINISHED")
        return self.run_id

    def _log_rest(self, metrics: Sequence[dict], result: dict, reports: Sequence[str]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._log_metrics([(now, row) for row in metrics])
        last = final_step(metrics)
        summary = [Metric(key, value, now, last) for key, value in summary_metrics(result).items()]
        for chunk in chunks(summary, BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)
        params = [Param(key, value) for key, value in result_params(result).items()]
        tags = [RunTag(key, value) for key, value in result_tags(result).items()]
        for chunk in chunks(params, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        if tags:
            self._client.log_batch(self.run_id, tags=tags)
        documents = {"result.json": result, "spec.json": self.spec}
        log_artifacts(self._artifact_uri, self.tracking_uri, documents, reports)

    # ---- calls to the server (under outbound.guard_urllib3) -----------------------------------

    def _open(self) -> None:
        """Find or make the job's run and log its params, once."""
        if self.run_id is not None:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        outbound.check_target(self.tracking_uri, self.allowed_schemes, self.outbound_allow)
        client = self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = experiment_id_of(client, self.experiment)
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{self.job_id}'", max_results=10
        )
        for found in existing:
            if found.info.status == "FINISHED":
                self.run_id, self.finished_before = found.info.run_id, True
                return
            # What an earlier attempt left (it may hold points this attempt reports again); a run of ours that
            # failed to take its params below is found and deleted here the next time.
            client.delete_run(found.info.run_id)
        run = client.create_run(experiment_id, run_name=f"gs-{self.job_id}", tags=run_tags(self.job_id, self.spec))
        params = [Param(key, value) for key, value in flatten_params(self.spec).items()]
        for chunk in chunks(params, PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=chunk)
        self.run_id, self._artifact_uri = run.info.run_id, run.info.artifact_uri

    def _log_metrics(self, stamped: Sequence[tuple[int, dict]]) -> None:
        """The points the run lacks, `BATCH` at a time; each counted as logged once its call succeeded."""
        from mlflow.entities import Metric

        if self.finished_before:
            return
        points: dict[tuple[str, int], Any] = {}
        for timestamp, row in stamped:
            point = (metric_key(row), int(row["step"]))
            if point not in self.logged:
                points.setdefault(point, Metric(point[0], float(row["value"]), timestamp, point[1]))
        batch = list(points.items())
        for chunk in chunks(batch, BATCH):
            self._client.log_batch(self.run_id, metrics=[metric for _, metric in chunk])
            self.logged.update(point for point, _ in chunk)


def run_tags(job_id: str, spec: dict) -> dict[str, str]:
    tags = {JOB_ID_TAG: job_id, "gs.kind": str(JobKind.TRAIN), "mlflow.source.name": "gradient-starvation-service"}
    method = (spec.get("method") or {}).get("name")
    if method:
        tags["gs.method"] = str(method)
    if spec.get("preset"):
        tags["gs.preset"] = str(spec["preset"])
    return tags


def result_params(result: dict) -> dict[str, str]:
    """What the initial weights filled (`init.names`, `init.loaded`, `init.head`, `init.skipped`): set by the
    spec's init_checkpoint_id, so the same in every attempt of the job."""
    return flatten_params({"init": result["init"]}) if isinstance(result.get("init"), dict) else {}


def result_tags(result: dict) -> dict[str, str]:
    """The audit's verdict, and `gs.resumed` ({seed: step}, JSON) when this attempt went on from saved states."""
    tags = {}
    if verdict_of(result):
        tags["gs.verdict"] = str(verdict_of(result))
    if result.get("resumed"):
        tags["gs.resumed"] = json.dumps(result["resumed"], sort_keys=True)
    return tags


def log_artifacts(artifact_uri: str, tracking_uri: str, documents: dict[str, dict], reports: Sequence[str]) -> None:
    """Write to the artifact location create_run answered, once checked (never asked for again)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    check_artifact_uri(artifact_uri, tracking_uri)
    repository = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        for name, document in documents.items():
            path = Path(folder) / name
            path.write_text(json.dumps(document, indent=2))
            repository.log_artifact(str(path))
    for report in reports:  # each seed's report and its plots, beside it in the seed's audit folder
        seed_folder = Path(report).parent
        for file in [Path(report), *sorted(seed_folder.glob("*.png"))]:
            repository.log_artifact(str(file), f"report/{seed_folder.name}")


def check_artifact_uri(artifact_uri: str, tracking_uri: str) -> None:
    """A hostile server could answer `file:///etc/...`: artifacts go back to the tracking server
    (its http(s) origin or `mlflow-artifacts:`), or, for a file: store, under that store's folder."""
    where, tracking = urlsplit(artifact_uri), urlsplit(tracking_uri)
    scheme, tracking_scheme = where.scheme.lower(), tracking.scheme.lower()
    if "@" not in where.netloc and tracking_scheme in outbound.WEB_SCHEMES:
        same_origin = (where.hostname, where.port) == (tracking.hostname, tracking.port)
        if scheme == "mlflow-artifacts" and (not where.netloc or same_origin):
            return
        if scheme == tracking_scheme and same_origin:
            return
    if tracking_scheme == "file" and scheme == "file" and where.netloc in ("", "localhost"):
        store = Path(url2pathname(tracking.path)).resolve()
        if Path(url2pathname(where.path)).resolve().is_relative_to(store):
            return
    raise outbound.OutboundRefused(
        f"the MLflow server answered the artifact location {artifact_uri!r}, which is not on the "
        f"tracking server {tracking_uri!r}; nothing was written there."
    )


def experiment_id_of(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)  # another worker created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def metric_key(row: dict) -> str:
    """`accuracy/test/seed0`: name first, so MLflow's UI groups one quantity's curves together."""
    parts = [str(row["name"])]
    if row.get("split"):
        parts.append(str(row["split"]))
    if row.get("seed") is not None:
        parts.append(f"seed{row['seed']}")
    return "/".join(parts)


def flatten_params(spec: dict, prefix: str = "") -> dict[str, str]:
    """{"method.sd_lambda": "2.0", "seeds": "[0, 1]", ...}: nested objects dotted, lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in spec.items():
        if key == "mlflow":
            continue  # where to log is not a hyper-parameter
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def summary_metrics(result: dict) -> dict[str, float]:
    """The job's summary as `final/...` metrics: mean and std over seeds per split, reliance."""
    summary: dict[str, float] = {}
    for split, values in (result.get("splits") or {}).items():
        for name, stats in values.items():
            for stat in ("mean", "std"):
                if isinstance(stats, dict) and isinstance(stats.get(stat), (int, float)):
                    summary[f"final/{split}/{name}_{stat}"] = float(stats[stat])
    reliance = ((result.get("audit") or {}).get("summary") or {}).get("reliance_score")
    if isinstance(reliance, dict):
        for stat in ("mean", "std"):
            if isinstance(reliance.get(stat), (int, float)):
                summary[f"final/reliance_score_{stat}"] = float(reliance[stat])
    return summary


def verdict_of(result: dict) -> str | None:
    return ((result.get("audit") or {}).get("summary") or {}).get("verdict")


def final_step(metrics: Sequence[dict]) -> int:
    return max((int(m["step"]) for m in metrics), default=0)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
