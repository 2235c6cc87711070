"""The job kinds the API knows, each a module (`base.KindModule`: its bodies, its resolution at submission, its
summary and report), by JobKind. Nothing else in api/ branches on a job's kind."""

from __future__ import annotations

from api.kinds import audit, repair, sweep, train
from api.kinds.base import KindModule
from models.kinds import JobKind

# Insertion order is the order of the bodies in the OpenAPI document's unions.
KINDS: dict[str, KindModule] = {
    JobKind.TRAIN: train,
    JobKind.AUDIT: audit,
    JobKind.REPAIR: repair,
    JobKind.SWEEP: sweep,
}
