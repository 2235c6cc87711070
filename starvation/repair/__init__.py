"""Repair a model that leans on a spurious feature by refitting its head (its last linear layer)
on the penultimate features of the training data (docs/repair.md).

`build_repair_method(spec).repair(TrainingFeatures(...), old_head, seed=...)` returns the new
head and how it was chosen; `starvation.repair.heads` reads and writes heads of modules.
"""

from starvation.repair.fit import TrainingFeatures, carve_validation, score
from starvation.repair.heads import (
    LinearHead,
    NoLinearHead,
    check_head_feeds_output,
    find_linear_head,
    finetune_hint,
    read_head,
    read_model_head,
    replace_head,
    replace_model_head,
    torchscript_bytes,
)
from starvation.repair.methods import (
    REPAIR_METHODS,
    HeadRepair,
    RepairMethod,
    build_repair_method,
)

__all__ = [
    "REPAIR_METHODS",
    "HeadRepair",
    "LinearHead",
    "NoLinearHead",
    "RepairMethod",
    "TrainingFeatures",
    "build_repair_method",
    "carve_validation",
    "check_head_feeds_output",
    "find_linear_head",
    "finetune_hint",
    "read_head",
    "read_model_head",
    "replace_head",
    "replace_model_head",
    "score",
    "torchscript_bytes",
]
