"""Where the CLI finds the server and its token: flag, then environment, then the local token file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class ConfigError(Exception):
    """The CLI cannot tell which server or token to use."""


@dataclass(frozen=True)
class Connection:
    url: str
    token: str
    token_source: str  # "flag" | "GS_TOKEN" | "GS_ADMIN_TOKEN" | the token file's path


def default_url() -> str:
    from core.settings import get_settings

    settings = get_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def token_file() -> Path:
    from core.settings import get_settings

    return get_settings().admin_token_file


def resolve(url: str | None, token: str | None) -> Connection:
    """`url`/`token` are the flags (typer already folds GS_URL and GS_TOKEN into them)."""
    url = (url or default_url()).rstrip("/")
    if token:
        return Connection(url, token.strip(), "flag")
    for name in ("GS_TOKEN", "GS_ADMIN_TOKEN"):
        if os.environ.get(name, "").strip():
            return Connection(url, os.environ[name].strip(), name)
    path = token_file()
    if path.is_file():
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
        if value:
            return Connection(url, value, str(path))
    raise ConfigError(
        f"no API token: pass --token, set GS_TOKEN, or run where the server keeps its token file ({path})"
    )
