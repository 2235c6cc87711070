"""MLflow export: a train job's params, metric history, result and report land in one MLflow run; its metrics
arrive while it trains, and a server that fails meanwhile costs the job a warning, nothing more."""
from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from core.outbound import OutboundRefused
from worker.mlflow_export import MlflowRun, check_artifact_uri, export_run, flatten_params, metric_key

SPEC = {"preset": "paper_moons_sd", "steps": 20, "eval_every": 5, "seeds": [0, 1], "audit": False,
        "mlflow": {"tracking_uri": "ignored", "experiment": "ignored"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, list[dict], dict]:
    """A real (tiny) training run: the spec, its metric rows as the API serves them, its result."""
    from starvation.training import resolve_train_spec, train

    rows: list[dict] = []
    spec = {k: v for k, v in SPEC.items() if k != "mlflow"}
    outcome = train(spec, out_dir=tmp_path_factory.mktemp("train"),
                    on_metrics=lambda batch: rows.extend(vars(m).copy() for m in batch))
    return {**resolve_train_spec(spec), "mlflow": SPEC["mlflow"]}, rows, outcome.result


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    # MLflow 3 keeps its file store only on request; a real deployment points at a tracking server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_the_run_holds_our_params_metric_history_result_and_report(trained, tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    spec, rows, result = trained
    reports = []
    for seed in (0, 1):  # every seed's report, as the job writes them
        (tmp_path / f"seed{seed}-audit").mkdir()
        reports.append(tmp_path / f"seed{seed}-audit" / "report.json")
        reports[-1].write_text(json.dumps({"seed": seed}))
        (tmp_path / f"seed{seed}-audit" / "groups.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([seed]))

    run_id = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0001", spec=spec,
                        metrics=rows, result=result, reports=[str(r) for r in reports], allowed_schemes=["file"])

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gs.job_id"] == "job0001"
    assert run.data.params == flatten_params(spec)
    assert run.data.params["method.sd_lambda"] == "0.006" and "mlflow.tracking_uri" not in run.data.params

    ours: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        ours.setdefault(metric_key(row), []).append((row["step"], row["value"]))
    assert {"accuracy/train/seed0", "loss/test/seed1", "starved_fraction/train/seed1"} <= set(ours)
    for key, history in ours.items():
        theirs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert theirs == sorted(history), key
    final = client.get_metric_history(run_id, "final/test/accuracy_mean")
    assert final[0].value == pytest.approx(result["splits"]["test"]["accuracy"]["mean"])

    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for folder in ("report/seed0-audit", "report/seed1-audit") for a in client.list_artifacts(run_id, folder)}
    assert {"result.json", "spec.json", "report/seed0-audit/report.json", "report/seed1-audit/report.json",
            "report/seed0-audit/groups.png", "report/seed1-audit/groups.png"} <= artifacts
    seed1 = Path(client.download_artifacts(run_id, "report/seed1-audit/report.json", str(tmp_path / "down")))
    assert json.loads(seed1.read_text()) == {"seed": 1}
    downloaded = Path(client.download_artifacts(run_id, "result.json", str(tmp_path)))
    assert json.loads(downloaded.read_text()) == json.loads(json.dumps(result))


def test_exporting_a_job_again_returns_its_run(trained, tracking_uri):
    spec, rows, result = trained
    first = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0002", spec=spec,
                       metrics=rows[:10], result=result, allowed_schemes=["file"])
    again = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0002", spec=spec,
                       metrics=rows[:10], result=result, allowed_schemes=["file"])
    assert again == first


class HostileMlflow(http.server.BaseHTTPRequestHandler):
    """Just enough of MLflow's REST API; create-run answers the artifact_uri the test chose."""

    artifact_uri = ""
    calls: list[tuple[str, str]] = []
    metrics: list[dict] = []  # every metric point log-batch took
    failing = False  # log-batch answers 503

    def answer(self, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def handle_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        HostileMlflow.calls.append((self.command, path))
        if path.endswith("/runs/log-batch") and HostileMlflow.failing:
            self.send_error(503)
            return
        if path.endswith("/runs/log-batch"):
            HostileMlflow.metrics += json.loads(body).get("metrics") or []
        run_info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                    "artifact_uri": HostileMlflow.artifact_uri, "lifecycle_stage": "active", "start_time": 0}
        if path.endswith("/experiments/get-by-name"):
            self.answer({"experiment": {"experiment_id": "1", "name": "e", "lifecycle_stage": "active"}})
        elif path.endswith("/runs/search"):
            self.answer({"runs": []})
        elif path.endswith("/runs/create"):
            self.answer({"run": {"info": run_info, "data": {}}})
        elif path.endswith("/runs/update"):
            self.answer({"run_info": run_info})
        else:
            self.answer({})

    do_GET = do_POST = do_PUT = handle_any  # noqa: N815 (http.server's naming)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hostile_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    HostileMlflow.calls, HostileMlflow.metrics, HostileMlflow.failing = [], [], False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileMlflow)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_artifact_uri_off_the_tracking_server_is_refused_before_anything_is_written(
        trained, hostile_mlflow, tmp_path):
    spec, rows, result = trained
    target = tmp_path / "victim"
    HostileMlflow.artifact_uri = target.as_uri()
    with pytest.raises(OutboundRefused, match="artifact location"):
        export_run(tracking_uri=hostile_mlflow, experiment="e", job_id="job0003", spec=spec, metrics=rows[:5],
                   result=result, outbound_allow="127.0.0.1")
    assert not target.exists()
    assert ("POST", "/api/2.0/mlflow/runs/update") in HostileMlflow.calls  # the run was marked FAILED


def test_artifacts_go_back_to_the_tracking_server_through_mlflow_artifacts(trained, hostile_mlflow):
    spec, rows, result = trained
    HostileMlflow.artifact_uri = "mlflow-artifacts:/1/r1/artifacts"
    run_id = export_run(tracking_uri=hostile_mlflow, experiment="e", job_id="job0004", spec=spec,
                        metrics=rows[:5], result=result, outbound_allow="127.0.0.1")
    assert run_id == "r1"
    puts = {path for method, path in HostileMlflow.calls if method == "PUT"}
    assert puts == {"/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/result.json",
                    "/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/spec.json"}


def test_a_tracking_server_on_loopback_gets_no_request_without_the_allow_list(trained, hostile_mlflow):
    spec, rows, result = trained
    with pytest.raises(OutboundRefused, match="loopback"):
        export_run(tracking_uri=hostile_mlflow, experiment="e", job_id="job0005", spec=spec, metrics=rows[:5],
                   result=result)
    assert HostileMlflow.calls == []


@pytest.mark.parametrize("artifact_uri, tracking_uri, allowed", [
    ("mlflow-artifacts:/1/r/artifacts", "https://mlflow.example.com", True),
    ("mlflow-artifacts://mlflow.example.com/1/r", "https://mlflow.example.com", True),
    ("https://mlflow.example.com/api/2.0/mlflow-artifacts/artifacts/1", "https://mlflow.example.com", True),
    ("mlflow-artifacts://10.0.0.1:5000/1/r", "https://mlflow.example.com", False),
    ("https://other.example.com/1/r", "https://mlflow.example.com", False),
    ("https://user@mlflow.example.com/1/r", "https://mlflow.example.com", False),
    ("http://mlflow.example.com/1/r", "https://mlflow.example.com", False),
    ("file:///etc/cron.d", "https://mlflow.example.com", False),
    ("/etc/cron.d", "https://mlflow.example.com", False),
    ("s3://bucket/1/r", "https://mlflow.example.com", False),
    ("file:///srv/mlruns/1/r/artifacts", "file:///srv/mlruns", True),
    ("file:///srv/mlruns/../etc/1", "file:///srv/mlruns", False),
    ("file:///etc/1", "file:///srv/mlruns", False),
    ("file://host/srv/mlruns/1", "file:///srv/mlruns", False),
])
def test_where_artifacts_may_go(artifact_uri, tracking_uri, allowed):
    if allowed:
        check_artifact_uri(artifact_uri, tracking_uri)
    else:
        with pytest.raises(OutboundRefused):
            check_artifact_uri(artifact_uri, tracking_uri)


# ---- live: while the job trains --------------------------------------------------------------------------------

def wait_for(condition, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)
    return value


def test_metrics_reach_the_run_while_the_job_trains_and_the_end_sends_no_point_twice(trained, tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from starvation.training import train

    spec = trained[0]
    client = MlflowClient(tracking_uri=tracking_uri)
    run = MlflowRun(tracking_uri=tracking_uri, experiment="gs-live", job_id="job0006", spec=spec,
                    allowed_schemes=["file"], flush_s=0.05)
    run.start()
    rows: list[dict] = []
    in_mlflow_at_step_10: list[int] = []

    def on_metrics(batch) -> None:
        new = [vars(m).copy() for m in batch]
        rows.extend(new)
        run.add(new)
        if new[0]["step"] == 10:  # training waits here: what MLflow has now, it got while the job ran
            history = lambda: [m.step for m in client.get_metric_history(run.run_id, "accuracy/test/seed1")]
            in_mlflow_at_step_10.extend(wait_for(lambda: run.run_id and len(history()) == 3 and history()))

    engine_spec = {k: v for k, v in spec.items() if k != "mlflow"}
    outcome = train(engine_spec, out_dir=tmp_path, on_metrics=on_metrics)
    assert sorted(in_mlflow_at_step_10) == [0, 5, 10]
    assert client.get_run(run.run_id).data.params == flatten_params(spec)  # the params came first

    # What the result says of the job's start: the initial weights (params) and a resume (tag).
    result = {**outcome.result, "init": {"names": "ours", "loaded": 4, "head": "fresh", "skipped": []},
              "resumed": {"0": 10}}
    assert run.finish(rows, result) == run.run_id
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert {key: finished.data.params[key] for key in ("init.names", "init.loaded", "init.head", "init.skipped")} == {
        "init.names": "ours", "init.loaded": "4", "init.head": "fresh", "init.skipped": "[]"}
    assert json.loads(finished.data.tags["gs.resumed"]) == {"0": 10}
    ours: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        ours.setdefault(metric_key(row), []).append((row["step"], row["value"]))
    for key, history in ours.items():  # every point once: none sent again at the end
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key)) == sorted(history), key


def test_a_server_failing_mid_run_is_said_once_and_the_end_sends_what_it_missed(trained, hostile_mlflow):
    spec, rows, result = trained
    HostileMlflow.artifact_uri = "mlflow-artifacts:/1/r1/artifacts"
    troubles: list[tuple[str, bool]] = []
    run = MlflowRun(tracking_uri=hostile_mlflow, experiment="e", job_id="job0007", spec=spec,
                    outbound_allow="127.0.0.1", flush_s=0.0, retry_s=60.0,
                    on_trouble=lambda error, retrying: troubles.append((error, retrying)))
    run.start()
    first, later = rows[:len(rows) // 2], rows[len(rows) // 2:]
    run.add(first)
    wait_for(lambda: len(HostileMlflow.metrics) == len(first))
    HostileMlflow.failing = True
    run.add(later[:5])
    wait_for(lambda: troubles)
    run.add(later[5:])  # the server is still down: waits, said once
    HostileMlflow.failing = False

    assert run.finish(rows, result) == "r1"
    assert len(troubles) == 1 and troubles[0][1] is True and "503" in troubles[0][0]
    assert run.live_error == troubles[0][0]
    points = [(m["key"], m["step"]) for m in HostileMlflow.metrics if not m["key"].startswith("final/")]
    assert sorted(points) == sorted((metric_key(row), row["step"]) for row in rows)  # each once


def test_a_train_job_whose_mlflow_fails_succeeds_with_warnings(hostile_mlflow, monkeypatch, tmp_path):
    """The worker's side: the job's log says it, the job's warnings show it, the job succeeds."""
    from api.jobs_service import job_warnings
    from core.settings import get_settings
    from models import job_logs as logs_repo
    from models import jobs as jobs_repo
    from models.db import Database
    from models.migrate import upgrade
    from models.status import JobStatus
    from starvation.training import resolve_train_spec
    from worker.context import JobContext, JobWriter
    from worker.runner import run_kind

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # what the job sets, kept to this test
    settings = get_settings().model_copy(update={"outbound_allow": "127.0.0.1", "mlflow_flush_s": 0.01,
                                                 "var_dir": tmp_path})
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    spec = {**resolve_train_spec({"preset": "paper_moons_sd", "steps": 20, "eval_every": 5, "seeds": [0]}),
            "mlflow": {"tracking_uri": hostile_mlflow, "experiment": "e"}}
    with db.session() as session:
        job_id = jobs_repo.create(session, owner_id="owner", kind="train", spec=spec, tags={}, queue="cpu",
                                  callback_url=None).id
        jobs_repo.claim(session, job_id, "test-worker")
    HostileMlflow.artifact_uri, HostileMlflow.failing = "mlflow-artifacts:/1/r1/artifacts", True
    writer = JobWriter(db, job_id)
    writer.start()
    ctx = JobContext(db=db, job_id=job_id, owner_id="owner", settings=settings, writer=writer, steps=20)
    status, result, error = run_kind("train", spec, ctx)
    writer.close()

    assert status == JobStatus.SUCCEEDED and error is None
    assert "503" in result["mlflow"]["error"] and "503" in result["mlflow"]["live_error"]
    with db.session() as session:
        jobs_repo.finish(session, job_id, status, result=result)
        lines = [(line.level, line.message) for line in logs_repo.query(session, job_id)]
        warnings = job_warnings(jobs_repo.get(session, job_id))
    said = [message for level, message in lines if level == "warning" and "MLflow" in message]
    assert len(said) == 2 and said[0].startswith("MLflow live logging failed: ") and "sent again later" in said[0]
    assert said[1].startswith("MLflow export failed: ")
    assert [w for w in warnings if "MLflow" in w] == [f"MLflow export failed: {result['mlflow']['error']}"]
