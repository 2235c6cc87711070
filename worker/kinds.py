"""The job kinds the worker runs, each a module with `run(spec, ctx)` and the model its result must match
(`Result`, from results/), by JobKind. The runner (worker/runner.py) looks a job's kind up here and nowhere else."""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from models.kinds import JobKind
from worker import audit_job, repair_job, sweep_job, train_job
from worker.context import JobContext


class JobModule(Protocol):
    @property
    def Result(self) -> type[BaseModel]:
        """What `run` returns, checked before it is recorded."""
        ...

    def run(self, spec: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        """Run the job as its spec (resolved at submission) says; its result, or raise to fail it."""
        ...


KINDS: dict[str, JobModule] = {
    JobKind.TRAIN: train_job,
    JobKind.AUDIT: audit_job,
    JobKind.REPAIR: repair_job,
    JobKind.SWEEP: sweep_job,
}
