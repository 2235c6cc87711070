"""The service (scripts/serve.py: API + supervised worker) in a subprocess, for tests and benchmarks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """`scripts/serve.py` (API + supervised worker) in a subprocess, and an HTTP client for it."""

    def __init__(self, name: str, env: dict[str, str], var_dir: Path, serve_args: tuple[str, ...] = ()) -> None:
        self.name, self.var_dir, self.serve_args = name, var_dir, serve_args  # e.g. ("--no-worker",)
        self.port = free_port()
        self.env = {**os.environ, **env, "GS_PORT": str(self.port), "GS_VAR_DIR": str(var_dir),
                    "GS_ADMIN_TOKEN": ADMIN_TOKEN, "GS_CANCEL_POLL_S": "0.2"}
        self.log_path = var_dir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def start(self, timeout_s: float = 90, probe: str = "/readyz") -> Stack:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), *self.serve_args], cwd=ROOT, env=self.env,
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} stack exited:\n{self.log()}")
            try:
                if self.client.get(probe).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} stack not ready in {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.client.close()

    def wait_for(self, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        job = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} is {job.get('status')} after {timeout_s}s\n{self.log()}")
