"""Every setting of the service, read from the environment (prefix GS_) in one place."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

VAR_DIR = Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GS_", extra="ignore")

    # Embedded default: a SQLite file and a broker that needs no server, both under ./var/.
    database_url: str = f"sqlite:///{VAR_DIR / 'gs.sqlite3'}"
    broker_url: str = "filesystem://"
    var_dir: Path = VAR_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N, the worker's default when a spec says auto
    data_dir: Path | None = None  # full MNIST IDX files, when a user points the service at them
    worker_queues: str = "gpu,cpu"

    # Limits: each enforced with a 4xx.
    max_steps: int = 100_000
    max_seeds: int = 20
    max_upload_bytes: int = 512 * 1024 * 1024
    upload_check_timeout_s: float = 60.0  # loading + a dry forward pass of an uploaded model
    max_body_bytes: int = 1024 * 1024  # JSON request bodies (uploads have max_upload_bytes)
    cancel_poll_s: float = Field(0.5, description="how often a running job reads its cancel flag")

    # Reliability: a running job beats every heartbeat_s; one silent for heartbeat_timeout_s has
    # lost its worker and is re-queued, up to max_attempts runs, then fails with worker_lost.
    heartbeat_s: float = 5.0
    heartbeat_timeout_s: float = 60.0
    max_attempts: int = 3
    sweep_every_s: float = 5.0
    webhook_secret: str | None = None  # HMAC key for callback signatures; default: the admin token
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 6
    # MLflow export targets: a tracking URI whose scheme is not listed is refused (no file: by default,
    # so a user cannot make the worker write to its own disk).
    mlflow_allowed_schemes: str = "http,https"

    @property
    def broker_folder(self) -> Path:
        return self.var_dir / "broker"

    @property
    def storage_dir(self) -> Path:
        """Checkpoints, plots and uploaded files."""
        return self.var_dir / "storage"

    @property
    def admin_token_file(self) -> Path:
        return self.var_dir / "admin_token"


@lru_cache
def get_settings() -> Settings:
    return Settings()
