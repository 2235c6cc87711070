"""What the service adds to training: the same train job through the API + worker and as a `train` call here.

    .venv/bin/python bench/service_overhead.py                 # 4 pairs of runs of 2 jobs (~5 min, 2 CPUs)
    .venv/bin/python bench/service_overhead.py --repeats 5

Starts the service (scripts/serve.py: API + one worker) on the embedded default (SQLite, filesystem broker) in
a scratch folder, then alternates: the job's spec through POST /v1/jobs (waited for), and the same spec through
`starvation.training.train` in this process, while the service idles beside it. Compared: the engine's own
step time (`result["timing"]["step_ms"]`: the update loop between evaluations, should_stop and progress callbacks
included, so the worker's database reads and writes count) and the job's wall time (started_at -> finished_at)
against the whole `train` call. Target: the service's step time within 5 % of the in-process one. A short job of
each kind runs first in both places, unmeasured: a fresh worker process pays one-off costs (thread pools, first
allocations) that are not the service's per-step overhead.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from scripts.stack import Stack  # noqa: E402
from starvation.training import train  # noqa: E402

JOBS = {  # spec fields the API accepts today; "auto" execution picks the same path in both places
    "cmnist_erm_2_seeds": {"preset": "paper_cmnist_erm", "seeds": [0, 1], "steps": 300, "eval_every": 100,
                           "audit": False},
    "moons_sd_10_seeds": {"preset": "paper_moons_sd", "seeds": list(range(10)), "steps": 2000, "eval_every": 500,
                          "audit": False},
}


def through_service(stack: Stack, spec: dict) -> dict:
    response = stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec, "tags": {"bench": "overhead"}})
    response.raise_for_status()
    job = stack.wait_for(response.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=900)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}\n{stack.log()}")
    started, finished = (datetime.datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return {"step_ms": job["result"]["timing"]["step_ms"], "wall_s": (finished - started).total_seconds(),
            "used": job["result"]["execution"]["used"]}


def in_process(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = train(spec, out_dir=pathlib.Path(out), device="cpu").result
    return {"step_ms": result["timing"]["step_ms"], "wall_s": result["timing"]["total_s"],
            "used": result["execution"]["used"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    args = parser.parse_args()
    var_dir = pathlib.Path(tempfile.mkdtemp(prefix="gs-overhead-"))
    stack = Stack("overhead", {"GS_DATABASE_URL": f"sqlite:///{var_dir / 'gs.sqlite3'}",
                               "GS_BROKER_URL": "filesystem://", "GS_DEVICE": "cpu"}, var_dir)
    print(machine(torch.device("cpu")))
    print("service: API + 1 worker (scripts/serve.py), SQLite + filesystem broker, on this machine")
    print(f"{'job':20} {'where':10} {'execution':10} {'step ms':>8} {'wall s':>7}")
    stack.start()
    ratios = {}
    try:
        for name in args.jobs.split(","):
            runs: dict[str, list[dict]] = {"in-process": [], "service": []}
            warm_up = {**JOBS[name], "steps": 20, "eval_every": 10}
            in_process(warm_up)
            through_service(stack, warm_up)
            for _ in range(args.repeats):
                for where, run in (("in-process", lambda: in_process(JOBS[name])),
                                   ("service", lambda: through_service(stack, JOBS[name]))):
                    runs[where].append(measured := run())
                    print(f"{name:20} {where:10} {measured['used']:10} {measured['step_ms']:8.2f} "
                          f"{measured['wall_s']:7.1f}", flush=True)
            # Pairs run back to back, so a drift in the machine's speed hits both sides of a ratio alike.
            ratios[name] = statistics.median(service["step_ms"] / alone["step_ms"]
                                             for service, alone in zip(runs["service"], runs["in-process"]))
            print(f"{name:20} service / in-process step time, median of {args.repeats} pairs: {ratios[name]:.3f}",
                  flush=True)
    finally:
        stack.stop()
    worst = max(ratios.values())
    print(f"worst ratio {worst:.3f} (target <= 1.05: {'met' if worst <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
