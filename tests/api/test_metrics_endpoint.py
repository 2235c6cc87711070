"""GET /metrics: Prometheus text a scraper can parse, read from the jobs table."""
from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from models.tables import Job, utcnow


def scrape(client) -> dict[str, dict[tuple, float]]:
    """{family name: {(sample name, sorted labels): value}} of one scrape."""
    response = client.get("/metrics")  # the client sends the admin token
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in family.samples
        }
    return families


@pytest.fixture
def some_jobs(client):
    """Jobs in every state the metrics describe; removed afterwards so other tests see none."""
    from models.db import database

    now = utcnow()
    rows = [
        Job(owner_id="metrics-test", kind="train", status="queued", queue="gpu",
            created_at=now - timedelta(seconds=40)),
        Job(owner_id="metrics-test", kind="train", status="running", queue="cpu",
            started_at=now - timedelta(seconds=30), heartbeat_at=now - timedelta(seconds=20)),
        Job(owner_id="metrics-test", kind="train", status="running", queue="cpu",
            started_at=now - timedelta(seconds=30), heartbeat_at=now - timedelta(seconds=2)),
        Job(owner_id="metrics-test", kind="audit", status="succeeded",
            started_at=now - timedelta(seconds=100), finished_at=now - timedelta(seconds=90)),
        Job(owner_id="metrics-test", kind="audit", status="succeeded",
            started_at=now - timedelta(seconds=1000), finished_at=now - timedelta(seconds=100)),
        Job(owner_id="metrics-test", kind="train", status="failed",
            started_at=now - timedelta(seconds=3), finished_at=now - timedelta(seconds=1)),
    ]
    with database().session() as session:
        session.execute(delete(Job).where(Job.owner_id == "metrics-test"))
    before = scrape(client)
    with database().session() as session:
        session.add_all(rows)
    yield before
    with database().session() as session:
        session.execute(delete(Job).where(Job.owner_id == "metrics-test"))


def delta(after: dict, before: dict, family: str, sample: str, **labels: str) -> float:
    key = (sample, tuple(sorted(labels.items())))
    return after[family].get(key, 0.0) - before.get(family, {}).get(key, 0.0)


def test_metrics_count_jobs_queue_durations_and_heartbeats(client, some_jobs):
    before, after = some_jobs, scrape(client)

    assert delta(after, before, "gs_jobs", "gs_jobs", kind="train", status="running") == 2
    assert delta(after, before, "gs_jobs", "gs_jobs", kind="audit", status="succeeded") == 2
    assert delta(after, before, "gs_jobs", "gs_jobs", kind="audit", status="cancelled") == 0
    assert ("gs_jobs", (("kind", "audit"), ("status", "cancelled"))) in after["gs_jobs"]  # zeros are exported
    assert ("gs_jobs", (("kind", "repair"), ("status", "running"))) in after["gs_jobs"]  # for every kind
    assert delta(after, before, "gs_queue_depth", "gs_queue_depth", queue="gpu") == 1
    assert after["gs_oldest_queued_job_age_seconds"][("gs_oldest_queued_job_age_seconds", ())] >= 39

    histogram = "gs_job_duration_seconds"
    succeeded = {"kind": "audit", "status": "succeeded"}
    assert delta(after, before, histogram, f"{histogram}_count", **succeeded) == 2
    assert delta(after, before, histogram, f"{histogram}_sum", **succeeded) == pytest.approx(910, abs=1)
    assert delta(after, before, histogram, f"{histogram}_bucket", le="15.0", **succeeded) == 1
    assert delta(after, before, histogram, f"{histogram}_bucket", le="600.0", **succeeded) == 1
    assert delta(after, before, histogram, f"{histogram}_bucket", le="1800.0", **succeeded) == 2
    assert delta(after, before, histogram, f"{histogram}_bucket", le="+Inf", **succeeded) == 2
    assert delta(after, before, histogram, f"{histogram}_count", kind="train", status="failed") == 1

    newest = after["gs_worker_heartbeat_age_seconds"][("gs_worker_heartbeat_age_seconds", ())]
    stalest = after["gs_running_job_heartbeat_max_age_seconds"][("gs_running_job_heartbeat_max_age_seconds", ())]
    assert newest < 10 and stalest >= 19.5  # other tests' running jobs may only widen the range


def test_metrics_include_the_process(client):
    families = scrape(client)
    assert "gs_jobs" in families and "gs_queue_depth" in families and "gs_job_duration_seconds" in families
    assert any(name.startswith("process_") or name.startswith("python_") for name in families)


def test_metrics_need_the_admin_token(client, tenant):
    # They count every tenant's jobs: no token is a 401, a tenant's key a 403.
    anonymous = client.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert "gs_jobs" not in anonymous.text
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers=tenant()).status_code == 403


def test_gs_metrics_public_lets_a_scraper_without_a_token_in(client, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "metrics_public", True)
    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200 and "gs_jobs" in response.text
