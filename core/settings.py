"""Every setting of the service, read from the environment (prefix GS_) in one place."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VAR_DIR = Path("var")
# One GS_DATA_URLS entry: a bucket's name, then plain path segments, each ended by a slash (core/object_images.py).
DATA_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(?:[A-Za-z0-9_.-]+/)*")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GS_", extra="ignore")

    # Embedded default: a SQLite file and a broker that needs no server, both under ./var/.
    database_url: str = f"sqlite:///{VAR_DIR / 'gs.sqlite3'}"
    broker_url: str = "filesystem://"
    var_dir: Path = VAR_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    metrics_public: bool = False  # /metrics counts every tenant's jobs: admin token only, unless a scraper sends none
    device: str = "auto"  # auto | cpu | cuda | cuda:N, the worker's default when a spec says auto
    data_dir: Path | None = None  # full MNIST IDX files, when a user points the service at them
    worker_queues: str = "gpu,cpu"
    # Files one process writes for another (docs/storage.md): unset or file://PATH, a folder every process shares
    # (default GS_VAR_DIR/storage); s3://BUCKET/PREFIX, an S3-compatible store (credentials: the AWS_* variables).
    storage_url: str | None = None
    s3_endpoint_url: str | None = None  # a store other than AWS (MinIO, Ceph, GCS's S3 API)
    cache_bytes: int = Field(4 << 30, ge=0, description="objects read from the store kept under GS_VAR_DIR/cache")
    # 0: the API streams downloads from the store. N: it answers 307 to a presigned GET valid N seconds (S3 only).
    presigned_downloads_s: int = Field(0, ge=0, le=3600, description="lifetime of a download's presigned URL")
    s3_public_endpoint_url: str | None = None  # the store as clients reach it, for presigned URLs (default: as we do)
    # Image folders in an object store (docs/storage.md): s3://BUCKET/PREFIX/ prefixes, comma-separated, on the store
    # of GS_S3_ENDPOINT_URL; a key registers folders under <prefix><key id>/, the admin token anywhere under them.
    data_urls: str = ""

    # Limits: each enforced with a 4xx.
    max_steps: int = 100_000
    max_seeds: int = 20
    max_sweep_models: int = 64  # a sweep's settings x seeds
    max_upload_bytes: int = 512 * 1024 * 1024
    upload_check_timeout_s: float = 60.0  # loading + a dry forward pass of an uploaded model
    upload_check_slots: int = 2  # upload checks running at once (each a jailed process)
    upload_check_queue: int = 8  # more may wait; past that an upload is a 429
    upload_checks_per_key: int = 2  # running or waiting, per key
    # What one key may keep of its uploads (datasets, uploaded checkpoints; a job's files go with the job): past the
    # bytes a 413, past a count a 429 (docs/security.md). The admin token has no quota.
    max_stored_bytes_per_key: int = Field(10 << 30, ge=0)
    max_datasets_per_key: int = Field(100, ge=0)
    max_checkpoints_per_key: int = Field(200, ge=0)
    # Each foreign model runs in a jailed child (jail/, docs/security.md) with these limits.
    jail_memory_bytes: int = 4 << 30  # address space beyond what torch itself maps
    jail_cpu_seconds: int = 1800  # CPU time of one child: one upload check or one audit
    jail_call_seconds: int = 600  # wall-clock time of one request to a child (a batch of logits, a head)
    jail_threads: int = 1
    max_body_bytes: int = 1024 * 1024  # JSON request bodies (uploads have max_upload_bytes)
    # Memory (docs/security.md, "Limits and budgets"): checked before anything is decompressed or allocated.
    max_dataset_bytes: int = 2 << 30  # an .npz dataset once loaded (its arrays, x as float32); image folders stream
    max_dataset_compression_ratio: float = 100.0  # an .npz member over 16 MiB unpacking more than this: a bomb
    max_image_pixels: int = 50_000_000  # one image of an image-folder dataset, read from its header
    max_image_bytes: int = Field(64 << 20, ge=1)  # one image of a folder in an object store: larger is never read
    # Image folders: checked in the background after registration (api/dataset_checks.py), in child processes, tenants
    # taking turns; a check that has not finished dataset_check_stale_s after it began lost its API process and is
    # taken up again (so it must exceed dataset_check_timeout_s).
    dataset_check_stale_s: float = 3600.0
    dataset_check_slots: int = Field(2, ge=1, description="image-folder checks one API process runs at once")
    dataset_check_slots_per_key: int = Field(1, ge=1, description="of those, checks of one key's folders")
    dataset_check_timeout_s: float = Field(600.0, gt=0, description="one check's wall-clock limit: past it, failed")
    dataset_checks_per_key: int = Field(20, ge=1, description="folders one key may have waiting: past it, a 429")
    max_dataset_rows: int = 2_000_000  # images one image folder's CSV may list
    data_workers: int = Field(2, ge=0, description="DataLoader processes reading an image folder's batches")
    worker_memory_budget_bytes: int = 8 << 30  # a train job's estimated peak (starvation/budget.py), at submit
    # The worker child's RLIMIT_AS: what it maps once torch is imported + the budget + this headroom (thread
    # stacks, malloc arenas, libraries loaded later). Off with worker_limit_address_space=false; never on CUDA.
    worker_address_space_headroom_bytes: int = 4 << 30
    worker_limit_address_space: bool = True
    cancel_poll_s: float = Field(0.5, description="how often a running job reads its cancel flag")

    # Reliability: a running job beats every heartbeat_s; one silent for heartbeat_timeout_s has
    # lost its worker and is re-queued, up to max_attempts runs, then fails with worker_lost.
    heartbeat_s: float = 5.0
    heartbeat_timeout_s: float = 60.0
    max_attempts: int = 3
    sweep_every_s: float = 5.0
    # Dispatch (api/dispatch.py): at most dispatch_window jobs per queue wait in the broker; the rest wait
    # in the database and are sent one tenant at a time as workers free up, every dispatch_every_s.
    dispatch_window: int = Field(8, ge=1, description="jobs per queue sent to the broker and not yet claimed")
    dispatch_every_s: float = 1.0
    # A job sent this long ago and still unclaimed was lost by the broker (a restart without persistence).
    resend_after_s: float = Field(600.0, gt=0)
    max_active_jobs_per_key: int = Field(1000, ge=1, description="queued + running jobs one key may have")
    # Open streams (logs?follow=true, events; api/streams.py), counted in each API process: past a limit a 429.
    streams_per_key: int = Field(16, ge=1, description="streams one key may hold open")
    streams_total: int = Field(256, ge=1, description="streams open at once, all keys together")
    stream_db_connections: int = Field(2, ge=1, description="database connections all open streams' polls share")
    # Each process's connection pool (PostgreSQL): requests that find none free wait up to 10 s, then get a 503.
    database_pool_size: int = Field(5, ge=1, description="connections kept open")
    database_max_overflow: int = Field(10, ge=0, description="more opened under load, closed when returned")
    webhook_secret: str | None = (
        None  # HMAC key for admin jobs' callbacks (a key's jobs: its own); default: admin token
    )
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 6
    # Webhooks go out in due order, webhook_slots at once per API process, at most webhook_slots_per_key of one
    # key's jobs among them: a receiver that never answers holds its own key's slots only (api/webhooks.py).
    webhook_slots: int = Field(8, ge=1)
    webhook_slots_per_key: int = Field(2, ge=1)
    # MLflow export targets: a tracking URI whose scheme is not listed is refused (no file: by default,
    # so a user cannot make the worker write to its own disk).
    mlflow_allowed_schemes: str = "http,https"
    # A train job's metrics reach its MLflow run while it trains, in batches at most this many seconds apart.
    mlflow_flush_s: float = Field(5.0, gt=0)
    # Webhooks and MLflow reach public internet hosts only (core/outbound.py); these are admitted anyway:
    outbound_allow: str = ""  # comma-separated hostnames and/or CIDRs, e.g. "mlflow.internal,10.0.0.0/8"

    @field_validator("data_urls")
    @classmethod
    def _data_urls(cls, value: str) -> str:
        for url in filter(None, (part.strip() for part in value.split(","))):
            if not DATA_URL.fullmatch(url) or {".", ".."} & set(url.split("/")) or ".." in url.split("/")[2]:
                raise ValueError(f"GS_DATA_URLS lists {url!r}: each must be s3://BUCKET/ or s3://BUCKET/PREFIX/")
        return value

    @property
    def broker_folder(self) -> Path:
        return self.var_dir / "broker"

    @property
    def storage_dir(self) -> Path:
        """Checkpoints, plots and uploaded files, when they are kept in a folder (core/storage.py)."""
        if self.storage_url and self.storage_url.startswith("file://"):
            return Path(self.storage_url.removeprefix("file://"))
        return self.var_dir / "storage"

    @property
    def scratch_dir(self) -> Path:
        """This process's own files: uploads being checked, a job's outputs before they go to an object store."""
        return self.var_dir / "scratch"

    @property
    def admin_token_file(self) -> Path:
        return self.var_dir / "admin_token"


@lru_cache
def get_settings() -> Settings:
    return Settings()
