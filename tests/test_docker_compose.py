"""docker-compose.yml cannot run here (no Docker engine): check its shape by reading it."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_of_the_stack_is_declared():
    assert {"api", "worker", "redis", "postgres", "migrate"} <= set(load()["services"])


def test_datastores_have_healthchecks_and_the_api_waits_for_them():
    services = load()["services"]
    for name in ("postgres", "redis", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_and_runs_one_job_at_a_time():
    worker = load()["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    command = worker["command"]
    assert command[command.index("--concurrency") + 1] == "1"


def test_services_use_postgres_and_redis_urls_the_settings_understand():
    from core.settings import Settings

    env = load()["services"]["api"]["environment"]
    settings = Settings(database_url=env["GS_DATABASE_URL"], broker_url=env["GS_BROKER_URL"])
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://")


def test_dockerfile_copies_every_package_the_services_import():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("core", "api", "worker", "models", "jail", "starvation", "migrations", "scripts", "cli"):
        assert f"COPY {folder} ./{folder}" in dockerfile


def test_the_processes_that_run_jails_may_make_bubblewraps_namespaces():
    services = load()["services"]
    for name in ("api", "worker"):
        assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(services[name]["security_opt"]), name
    assert "bubblewrap" in (ROOT / "Dockerfile").read_text()


def test_api_and_workers_share_only_the_database_the_broker_and_a_store_made_at_start():
    from core.settings import Settings
    from core.storage import S3Store, store

    services = load()["services"]
    assert not {"volumes"} & (set(services["api"]) | set(services["worker"]))  # no shared folder
    assert "gs" in services["minio-init"]["entrypoint"][-1] and "mb" in services["minio-init"]["entrypoint"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert env["GS_STORAGE_URL"].startswith("s3://gs/") and env["GS_S3_ENDPOINT_URL"] == "http://minio:9000"
    settings = Settings(storage_url=env["GS_STORAGE_URL"], s3_endpoint_url=env["GS_S3_ENDPOINT_URL"])
    assert isinstance(store(settings), S3Store)
    assert "--scale worker=N" in (ROOT / "docker-compose.yml").read_text()


def test_api_and_worker_replicas_can_be_scaled_and_the_way_is_written_down():
    """`--scale` refuses a service with a container_name or a single fixed host port: each replica needs its own."""
    services, text = load()["services"], (ROOT / "docker-compose.yml").read_text()
    for name in ("api", "worker"):
        assert "container_name" not in services[name], name
    (published,) = services["api"]["ports"]
    host, container = str(published).rsplit(":", 1)
    first, last = (int(port) for port in host.split("-"))
    assert container == "8000" and last - first + 1 >= 2  # two API replicas, each on a host port of its own
    assert "ports" not in services["worker"]
    assert "--scale worker=N" in text and "--scale api=2" in text
    assert services["api"]["environment"]["GS_ADMIN_TOKEN"] == services["worker"]["environment"]["GS_ADMIN_TOKEN"]
