"""The worker child runs under RLIMIT_AS: baseline (torch imported) + the memory budget + headroom. A job past it
fails with an allocation error in that job instead of taking the machine; small jobs are unaffected."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from core.settings import Settings
from worker import celery_app

GiB = 2**30

# Runs in a fresh interpreter: what Celery's prefork child does on start (worker_process_init), then a small
# job and one far over the budget.
CHILD = """
import json, resource, tempfile
from celery.signals import worker_process_init
import worker.celery_app as celery_app
from jail.lockdown import address_space_in_use

worker_process_init.send(sender=None)  # every handler the worker child runs, ours included
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
from starvation import training
out = {"soft": soft, "hard_unlimited": hard == resource.RLIM_INFINITY, "vm": address_space_in_use()}
if soft == resource.RLIM_INFINITY:  # unlimited: nothing below may run here
    print(json.dumps(out))
    raise SystemExit(0)
with tempfile.TemporaryDirectory() as folder:
    training.train({"preset": "paper_moons_erm", "steps": 20, "eval_every": 10, "seeds": [0, 1]}, out_dir=folder)
    out["small_job"] = "ok"
import torch
try:  # what a job's first too-large tensor meets (training's activations come from the same allocator)
    torch.empty(16 << 30, dtype=torch.uint8)
    out["big_job"] = "allocated"
except BaseException as exc:
    out["big_job"] = f"{type(exc).__name__}: {exc}"[:300]
import numpy
try:
    numpy.ones(8 << 30, dtype=numpy.uint8)
    out["numpy"] = "allocated"
except MemoryError:
    out["numpy"] = "MemoryError"
print(json.dumps(out))
"""


def run_child(env: dict[str, str]) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env}, cwd=os.getcwd())
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_limit_is_baseline_plus_budget_plus_headroom_per_cpu() -> None:
    settings = Settings(worker_memory_budget_bytes=8 * GiB, worker_address_space_headroom_bytes=4 * GiB)
    assert celery_app.address_space_limit(3 * GiB, settings, cpus=2) == 15 * GiB + 2 * celery_app.PER_CPU_ADDRESS_SPACE
    assert celery_app.address_space_limit(3 * GiB, settings, cpus=16) > celery_app.address_space_limit(
        3 * GiB, settings, cpus=2)


def test_no_limit_where_a_job_may_use_cuda_or_where_it_is_turned_off(monkeypatch) -> None:
    import torch

    before = resource.getrlimit(resource.RLIMIT_AS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert celery_app.limit_address_space(Settings(device="auto")) is None
    assert celery_app.limit_address_space(Settings(device="cpu", worker_queues="gpu,cpu")) is None
    assert celery_app.limit_address_space(Settings(worker_limit_address_space=False)) is None
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # this test process was not limited


def test_a_worker_child_is_limited_and_a_job_over_it_fails_cleanly() -> None:
    budget, headroom = 1 * GiB, 1 * GiB
    out = run_child({"GS_DEVICE": "cpu", "GS_WORKER_QUEUES": "cpu", "GS_WORKER_MEMORY_BUDGET_BYTES": str(budget),
                     "GS_WORKER_ADDRESS_SPACE_HEADROOM_BYTES": str(headroom)})
    assert out["hard_unlimited"]  # only the soft limit: the jail's children set their own
    assert out["vm"] < out["soft"] <= out["vm"] + budget + headroom + (os.cpu_count() or 1) * 256 << 20
    assert out["small_job"] == "ok"
    # What worker/runner.py sees from a job past the limit (to map to a code of its own, not a retry):
    assert out["big_job"].startswith(("MemoryError", "RuntimeError")), out["big_job"]
    assert "alloc" in out["big_job"].lower() or out["big_job"].startswith("MemoryError")
    assert out["numpy"] == "MemoryError"


def test_the_limit_can_be_turned_off() -> None:
    out = run_child({"GS_DEVICE": "cpu", "GS_WORKER_QUEUES": "cpu", "GS_WORKER_LIMIT_ADDRESS_SPACE": "false"})
    assert out["soft"] == resource.RLIM_INFINITY
