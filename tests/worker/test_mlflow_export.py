"""MLflow export: a train job's params, metric history, result and report land in one MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.mlflow_export import export_run, flatten_params, metric_key

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
    report = tmp_path / "report.html"
    report.write_text("<html><body>report</body></html>")

    run_id = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0001", spec=spec,
                        metrics=rows, result=result, report_path=str(report))

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
        a.path for a in client.list_artifacts(run_id, "report")}
    assert {"result.json", "spec.json", "report/report.html"} <= artifacts
    downloaded = Path(client.download_artifacts(run_id, "result.json", str(tmp_path)))
    assert json.loads(downloaded.read_text()) == json.loads(json.dumps(result))


def test_exporting_a_job_again_returns_its_run(trained, tracking_uri):
    spec, rows, result = trained
    first = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0002", spec=spec,
                       metrics=rows[:10], result=result, report_path=None)
    again = export_run(tracking_uri=tracking_uri, experiment="gs-tests", job_id="job0002", spec=spec,
                       metrics=rows[:10], result=result, report_path=None)
    assert again == first
