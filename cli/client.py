"""A small HTTP client for the v1 API: errors become ApiFailure with the API's own message."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from cli.config import Connection


class JobStatus(StrEnum):
    """A job's status as the API sends it. The server's own is models.status.JobStatus; `gs` talks HTTP
    only and imports nothing of the server (tests/test_architecture.py), so it keeps this copy, and
    tests/cli/test_cli_config_and_exit_codes.py checks that the two agree."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class ApiFailure(Exception):
    """The API said no (4xx/5xx) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class ApiClient:
    def __init__(
        self, connection: Connection, *, transport: httpx.BaseTransport | None = None, timeout_s: float = 30.0
    ) -> None:
        self.connection = connection
        self.http = httpx.Client(
            base_url=connection.url,
            headers={"Authorization": f"Bearer {connection.token}"},
            timeout=timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiFailure(f"cannot reach {self.connection.url}: {exc}") from None
        check(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    @contextmanager
    def stream(self, path: str, what: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """GET `path` as a stream; the API's refusal or a broken connection (`what` broke) is an ApiFailure."""
        try:
            with self.http.stream("GET", path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    check(response)
                yield response
        except httpx.HTTPError as exc:
            raise ApiFailure(f"{what} broke: {exc}") from None

    def create(self, path: str, **kwargs: Any) -> Any:
        """POST that creates something, once: a retry after a dropped connection reuses the key."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(3):
            try:
                response = self.http.post(path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise ApiFailure(f"cannot reach {self.connection.url}: {exc}") from None
                time.sleep(1.0 + attempt)
                continue
            check(response)
            return response.json()
        raise AssertionError("unreachable")

    # ---- the calls the commands make ----------------------------------------------------

    def submit_job(self, kind: str, spec: dict, tags: dict[str, str]) -> dict:
        return self.create("/v1/jobs", json={"kind": kind, "spec": spec, "tags": tags})

    def job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{job_id}")

    def jobs(self, *, status: str | None, kind: str | None, tags: list[str], limit: int) -> list[dict]:
        params: dict[str, Any] = {"status": status, "kind": kind, "limit": min(limit, 500)}
        if tags:
            params["tag"] = tags
        return self.get("/v1/jobs", **params)["items"]

    def report(self, job_id: str) -> dict | None:
        try:
            return self.get(f"/v1/jobs/{job_id}/report")
        except ApiFailure as failure:
            if failure.code == "no_report":
                return None
            raise

    def report_html(self, job_id: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/report.html").text

    def metrics(self, job_id: str, *, since_step: int | None = None) -> list[dict]:
        return list(self.pages(f"/v1/jobs/{job_id}/metrics", since_step=since_step, limit=5000))

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def upload_checkpoint(self, path: Path, fields: dict[str, str]) -> dict:
        with path.open("rb") as handle:
            return self.create("/v1/checkpoints", files={"file": (path.name, handle)}, data=fields)

    def pages(self, path: str, **params: Any) -> Iterator[dict]:
        """Every item of a paged list (`items`, `next_cursor`)."""
        cursor = None
        while True:
            page = self.get(path, cursor=cursor, **params)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def checkpoints(self, *, limit: int) -> list[dict]:
        return self.get("/v1/checkpoints", limit=min(limit, 500))["items"]

    def datasets(self) -> list[dict]:
        return self.get("/v1/datasets")["items"]

    def artifacts(self, job_id: str) -> list[dict]:
        return self.get(f"/v1/jobs/{job_id}/artifacts")["items"]

    def download(self, path: str, to: Path) -> int:
        """Stream a file of the API into `to`; the bytes written."""
        written = 0
        # An API on an object store may answer 307 to a presigned URL: httpx drops our token for another host.
        stream = self.stream(path, f"download of {path}", follow_redirects=True)
        with stream as response, to.open("wb") as handle:
            for chunk in response.iter_bytes():
                written += handle.write(chunk)
        return written

    def keys(self) -> list[dict]:
        return list(self.pages("/v1/api-keys", limit=500))

    def create_key(self, name: str) -> dict:
        return self.create("/v1/api-keys", json={"name": name})

    def revoke_key(self, key_id: str) -> dict:
        return self.request("DELETE", f"/v1/api-keys/{key_id}").json()

    def logs(self, job_id: str) -> list[dict]:
        return list(self.pages(f"/v1/jobs/{job_id}/logs", limit=5000))

    def follow_logs(self, job_id: str, *, read_timeout_s: float = 120.0) -> Iterator[dict]:
        """The job's log lines as they are written, until it has finished."""
        timeout = httpx.Timeout(30.0, read=read_timeout_s)
        with self.stream(
            f"/v1/jobs/{job_id}/logs", f"log stream of job {job_id}", params={"follow": "true"}, timeout=timeout
        ) as response:
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def events(self, job_id: str, *, read_timeout_s: float = 60.0) -> Iterator[tuple[str, Any]]:
        """Server-Sent Events of GET /v1/jobs/{id}/events as (event, parsed data), until the stream ends."""
        timeout = httpx.Timeout(30.0, read=read_timeout_s)
        with self.stream(f"/v1/jobs/{job_id}/events", f"event stream of job {job_id}", timeout=timeout) as response:
            event, data = "message", list[str]()
            for line in response.iter_lines():
                if line == "":
                    if data:
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


def check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, code = error["message"], error["code"]
    except (ValueError, KeyError, TypeError):
        message, code = response.text[:300] or response.reason_phrase, None
    raise ApiFailure(f"{message} (HTTP {response.status_code})", status=response.status_code, code=code)
