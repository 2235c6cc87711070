"""Run the service in the foreground: migrate, then the API and a supervised Celery worker.

Used by `make serve`, the demo and the end-to-end tests. Configuration comes from GS_* (see
core/settings.py); with none set it runs on the embedded default (SQLite + filesystem broker
under ./var/). A worker that dies (even by SIGKILL) is started again, as a process manager would.

`--no-worker` runs an API-only node, `--no-api` a worker-only node (docs/storage.md, "Running API-only and
worker-only nodes"): any number of each may share one database, broker and store.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.settings import get_settings  # noqa: E402
from models.migrate import upgrade  # noqa: E402

RESTART_DELAY_S = 1.0


def api_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(port),
        "--log-config", str(ROOT / "core" / "logging_api.json"),  # JSON lines with job ids
    ]


def worker_command(queues: str) -> list[str]:
    # prefork with one child: the task (and any CUDA) runs in the child, never in the parent.
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", queues, "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO", "--without-gossip",
        "--without-mingle", "-n", f"worker-{os.getpid()}@%h",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-worker", action="store_true", help="run the API only")
    parser.add_argument("--no-api", action="store_true", help="run a worker only")
    args = parser.parse_args()
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    if args.no_worker and not settings.admin_token:
        # Each API process would make its own admin token in its GS_VAR_DIR: another node would refuse it, and the
        # dashboard's forms (signed with it) would fail whenever the load balancer picks the other node.
        print("an API-only node (--no-worker) of several needs GS_ADMIN_TOKEN, the same on every node", flush=True)
    upgrade(settings.database_url)

    procs: dict[str, subprocess.Popen] = {}
    commands = {}
    if not args.no_api:
        commands["api"] = api_command(settings.host, settings.port)
    if not args.no_worker:
        commands["worker"] = worker_command(settings.worker_queues)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for name, command in commands.items():
        procs[name] = subprocess.Popen(command, cwd=ROOT)
    print(f"serving on http://{settings.host}:{settings.port} (database {settings.database_url.split('://')[0]}, "
          f"broker {settings.broker_url.split('://')[0]})", flush=True)
    while not stopping:
        time.sleep(0.5)
        for name, proc in list(procs.items()):
            if proc.poll() is not None and not stopping:
                if name == "api":
                    print(f"api exited with {proc.returncode}; stopping", flush=True)
                    stopping = True
                    break
                print(f"worker exited with {proc.returncode}; restarting", flush=True)
                time.sleep(RESTART_DELAY_S)
                procs[name] = subprocess.Popen(commands[name], cwd=ROOT)
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
