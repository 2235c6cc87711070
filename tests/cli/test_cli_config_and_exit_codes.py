"""The CLI without a server: where it finds its token, and the exit code of every outcome."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

import cli.app
import cli.base
from cli.client import ApiClient
from cli.config import ConfigError, resolve
from tests.conftest import ROOT

runner = CliRunner()
JOB = {"id": "a" * 32, "kind": "train", "status": "queued", "progress": 0.0, "spec": {"preset": "paper_cmnist_sd",
       "steps": 20}, "tags": {}, "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None,
       "attempts": 0, "error": None, "result": None, "links": {}}


def test_token_comes_from_the_flag_then_the_environment_then_the_token_file(monkeypatch, tmp_path):
    token_file = tmp_path / "admin_token"
    monkeypatch.setattr("cli.config.token_file", lambda: token_file)
    monkeypatch.delenv("GS_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("GS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="GS_TOKEN"):
        resolve("http://h:1", None)
    token_file.write_text("from-file\n")
    assert resolve("http://h:1/", None).token == "from-file"
    assert resolve("http://h:1/", None).url == "http://h:1"
    monkeypatch.setenv("GS_ADMIN_TOKEN", "admin-env")
    assert resolve(None, None).token == "admin-env"
    monkeypatch.setenv("GS_TOKEN", "user-env")
    assert resolve(None, None).token == "user-env"
    assert resolve(None, "flag").token == "flag"


def test_url_and_token_flags_reach_the_server(monkeypatch):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(request.url), request.headers["authorization"]
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    fake_server(monkeypatch, handler)
    result = runner.invoke(cli.app.app, ["--url", "http://example.test:9", "--token", "t0k", "jobs"])
    assert result.exit_code == 0, result.output
    assert seen == {"url": "http://example.test:9/v1/jobs?limit=20", "auth": "Bearer t0k"}


def fake_server(monkeypatch, handler) -> None:
    monkeypatch.setattr(cli.base, "connect", lambda connection: ApiClient(connection,
                                                                         transport=httpx.MockTransport(handler)))


def sse(*events: tuple[str, object]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def server_ending_in(final: dict):
    """A fake API: the job is accepted, streams one metric, then ends as `final` says."""
    metrics = [{"step": 10, "name": "accuracy", "value": 0.75, "seed": 0, "split": "test"}]

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/jobs":
            return httpx.Response(202, json=JOB)
        if path.endswith("/events"):
            body = sse(("status", {**JOB, "status": "running", "progress": 0.5}), ("metrics", metrics),
                       ("status", final), ("end", {}))
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        if path == f"/v1/jobs/{JOB['id']}":
            return httpx.Response(200, json=final)
        if path.endswith("/report"):
            return httpx.Response(404, json={"error": {"code": "no_report", "message": "none", "details": None}})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path, "details": None}})

    return handler


def test_a_failed_job_exits_1_with_its_error_message(monkeypatch):
    failed = {**JOB, "status": "failed", "error": {"code": "invalid_spec", "message": "dataset too small"}}
    fake_server(monkeypatch, server_ending_in(failed))
    result = runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "paper_cmnist_sd", "--wait"])
    assert result.exit_code == 1
    assert "invalid_spec: dataset too small" in result.output


def test_a_cancelled_job_exits_3(monkeypatch):
    fake_server(monkeypatch, server_ending_in({**JOB, "status": "cancelled"}))
    result = runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "paper_cmnist_sd", "--wait"])
    assert result.exit_code == 3 and "cancelled" in result.output


def test_a_succeeded_job_exits_0_and_shows_its_results(monkeypatch):
    result_body = {"splits": {"test": {"accuracy": {"mean": 0.683, "std": 0.01}, "loss": {"mean": 0.6, "std": 0.0}}},
                   "seeds": [0], "starved_fraction": {"first": 0.0, "last": 0.1}}
    fake_server(monkeypatch, server_ending_in({**JOB, "status": "succeeded", "progress": 1.0, "result": result_body}))
    result = runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "paper_cmnist_sd", "--wait"])
    assert result.exit_code == 0, result.output
    assert "0.683 ± 0.010" in result.output and "succeeded" in result.output


def test_the_api_saying_no_exits_4_with_its_message(monkeypatch):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": {"code": "invalid_spec", "message": "unknown preset 'nope'",
                                                   "details": None}})

    fake_server(monkeypatch, handler)
    result = runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "nope"])
    assert result.exit_code == 4 and "unknown preset 'nope'" in result.output


def test_an_unreachable_server_exits_4():
    result = runner.invoke(cli.app.app, ["--url", "http://127.0.0.1:9", "--token", "t", "jobs"])
    assert result.exit_code == 4 and "cannot reach http://127.0.0.1:9" in result.output


def test_bad_flags_exit_2():
    assert runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "p", "--seeds", "0,x"]).exit_code == 2
    assert runner.invoke(cli.app.app, ["--token", "t", "audit"]).exit_code == 2
    assert runner.invoke(cli.app.app, ["--token", "t", "train", "--preset", "p", "--tag", "novalue"]).exit_code == 2


def test_python_dash_m_cli_runs_the_same_program():
    done = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "compare" in done.stdout and "Exit codes" in done.stdout


def test_the_cli_knows_the_same_job_states_as_the_server():
    # gs keeps its own copy (it imports nothing of the server): a state added there must be added here.
    from cli.client import TERMINAL as CLI_TERMINAL
    from cli.client import JobStatus as CliJobStatus
    from models.status import TERMINAL, JobStatus

    assert [s.value for s in CliJobStatus] == [s.value for s in JobStatus]
    assert {s.value for s in CLI_TERMINAL} == {s.value for s in TERMINAL}


def test_the_progress_display_fits_an_80_column_terminal(monkeypatch):
    from rich.console import Console

    from cli.watch import wait_with_progress

    terminal = Console(width=80, force_terminal=True, record=True, color_system=None)
    rows = [{"step": 400, "name": name, "value": 0.123456, "seed": 2, "split": split}
            for split, name in (("train", "loss"), ("train", "accuracy"), ("test", "accuracy"),
                                ("train", "starved_fraction"))]
    running = {**JOB, "status": "running", "progress": 0.2, "spec": {**JOB["spec"], "steps": 2001}}
    final = {**running, "status": "succeeded", "progress": 1.0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            body = sse(("status", running), ("metrics", rows), ("status", final), ("end", {}))
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=final)

    client = ApiClient(resolve("http://x", "t"), transport=httpx.MockTransport(handler))
    wait_with_progress(client, running, terminal)
    shown = terminal.export_text().rstrip("\n").split("\n")[-2:]  # the last frame: the bar, then the metrics
    assert "100%" in shown[0] and "succeeded" in shown[0]
    assert shown[1].startswith("seed 2  step 400/2001") and "test acc 0.123" in shown[1]
    assert all(len(line) <= 80 for line in shown), shown


def test_a_download_follows_a_presigned_redirect_without_the_token(tmp_path):
    """An API with GS_PRESIGNED_DOWNLOADS_S answers 307 to the store: `gs` fetches it there, and its token stays home."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "x":
            return httpx.Response(307, headers={"location": "http://store.test/b/jobs/j/a.png?X-Amz-Signature=s"})
        return httpx.Response(200, content=b"stored bytes")

    client = ApiClient(resolve("http://x", "t"), transport=httpx.MockTransport(handler))
    assert client.download("/v1/jobs/j/artifacts/a.png", tmp_path / "a.png") == len(b"stored bytes")
    assert (tmp_path / "a.png").read_bytes() == b"stored bytes"
    assert [r.url.host for r in seen] == ["x", "store.test"] and "authorization" not in seen[1].headers
