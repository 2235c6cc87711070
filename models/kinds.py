"""The kinds of job, spelled once: the jobs table's `kind`, the API's bodies and filters, the worker's registry and
the pages use these. (The docstring below is the OpenAPI document's description of `kind`.) A kind's own code lives in its modules (docs/architecture.md, "Add a job kind")."""

from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):
    """The kinds of job, as `kind` spells them (the job-creation bodies below, one per kind)."""

    TRAIN = "train"
    AUDIT = "audit"
    REPAIR = "repair"
    SWEEP = "sweep"


# A train or sweep spec's fields that the service acts on (the time limit, MLflow, the checkpoint its weights come
# from), not the training engine: the API takes them out before the engine resolves the rest, the worker before it
# runs it.
SERVICE_FIELDS = ("timeout_s", "mlflow", "init_checkpoint_id")
