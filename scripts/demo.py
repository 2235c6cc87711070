"""The main job, end to end over HTTP: train ERM and SD on Colored MNIST, audit both, compare.

Starts the service (scripts/serve.py, embedded default unless GS_* say otherwise), submits two
train jobs with the paper's recipes and `audit: true`, shows their progress, prints the
comparison, and stops what it started (KEEP=1 leaves the service running).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.settings import get_settings  # noqa: E402
from models.status import TERMINAL, JobStatus  # noqa: E402

METHODS = (("ERM", "paper_cmnist_erm"), ("SD", "paper_cmnist_sd"))


def token(settings) -> str:
    if os.environ.get("GS_TOKEN"):
        return os.environ["GS_TOKEN"]
    if settings.admin_token:
        return settings.admin_token
    deadline = time.monotonic() + 30
    while not settings.admin_token_file.exists():  # the API writes it on first start
        if time.monotonic() > deadline:
            sys.exit(f"no admin token: set GS_TOKEN or start the API once ({settings.admin_token_file})")
        time.sleep(0.2)
    return settings.admin_token_file.read_text().strip()


def wait_ready(client: httpx.Client, server: subprocess.Popen | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            sys.exit("the service exited during start-up; see the lines above")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the service did not become ready")


def fmt(stat: dict | None) -> str:
    return "-" if not stat else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def summary_row(name: str, job: dict) -> list[str]:
    result = job.get("result") or {}
    splits = result.get("splits", {})
    starved = result.get("starved_fraction", {})
    audit = result.get("audit", {})
    reports = audit.get("reports", [])
    flip = [r["counterfactual"]["flip_rate"] for r in reports if r.get("counterfactual")]
    return [
        name,
        str(job["spec"]["steps"]),
        fmt(splits.get("train", {}).get("accuracy")),
        fmt(splits.get("test", {}).get("accuracy")),
        f"{starved.get('first', float('nan')):.2f} → {starved.get('last', float('nan')):.2f}",
        f"{sum(flip) / len(flip):.3f}" if flip else "-",
        audit.get("summary", {}).get("verdict", "-"),
    ]


def print_table(rows: list[list[str]]) -> None:
    header = ["method", "steps", "train acc", "test acc", "starved frac", "flip rate", "verdict"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main() -> int:
    settings = get_settings()
    seeds = [int(s) for s in os.environ.get("DEMO_SEEDS", "0").split(",")]
    base_url = os.environ.get("GS_URL", f"http://{settings.host}:{settings.port}")
    server = None
    if not os.environ.get("GS_URL"):
        # The service's JSON logs go to a file, so the terminal shows the demo's own progress.
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        log_path = settings.var_dir / "demo-service.log"
        print(f"starting the service (logs: {log_path})", flush=True)
        with log_path.open("ab") as log:
            server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py")], cwd=ROOT,
                                      start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            wait_ready(client, server)
            client.headers["Authorization"] = f"Bearer {token(settings)}"
            jobs = {}
            for name, preset in METHODS:
                body = {"kind": "train", "spec": {"preset": preset, "seeds": seeds, "audit": True}, "tags": {"demo": "1"}}
                response = client.post("/v1/jobs", json=body)
                response.raise_for_status()
                jobs[name] = response.json()
                print(f"submitted {name} ({preset}): job {jobs[name]['id']}", flush=True)
            while any(j["status"] not in TERMINAL for j in jobs.values()):
                time.sleep(5)
                jobs = {n: client.get(f"/v1/jobs/{j['id']}").json() for n, j in jobs.items()}
                print("  ".join(f"{n}: {j['status']} {100 * j['progress']:5.1f}%" for n, j in jobs.items()), flush=True)
            failed = {n: j["error"] for n, j in jobs.items() if j["status"] != JobStatus.SUCCEEDED}
            if failed:
                print(f"failed: {failed}")
                return 1
            print("\nColored MNIST: ERM vs Spectral Decoupling (paper, Table 1: test 23.7% vs 68.4%)\n")
            print_table([summary_row(n, j) for n, j in jobs.items()])
            for name, job in jobs.items():
                print(f"{name} report: {base_url}/v1/jobs/{job['id']}/report.html")
            erm, sd = jobs["ERM"]["id"], jobs["SD"]["id"]
            print(f"side by side: {base_url}/dashboard/compare?a={erm}&b={sd}")
            if os.environ.get("KEEP") == "1" and server is not None:
                print(f"\nservice kept running; dashboard: {base_url}/dashboard (sign in with the token in "
                      f"{settings.admin_token_file}); Ctrl-C stops it")
                server.wait()
            return 0
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
