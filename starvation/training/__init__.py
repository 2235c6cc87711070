"""Train classifiers from a plain spec: one model per seed, metrics through a callback, checkpoints to a folder.

Two ways to run a job's seeds, chosen by the spec's `execution`, with the same metrics and checkpoints:
sequential (`train_seed`, one seed after another; the reference) and batched (`train_batched`, every seed as
one stacked model, `starvation.ensemble`). Each loop reads top to bottom; one optimizer update is `train_step`
or `stacked_train_step`. Step `t` in the metrics is the model after `t` updates: evaluated at 0, every
`eval_every`, and at `steps` (the saved model). Between evaluations the loops never wait on the device.
"""

from starvation.training.acceleration import GraphedUpdates, forward_precision, tf32_matmuls
from starvation.training.evaluation import (
    EVAL_CHUNK,
    STARVED_GRADIENT,
    as_logits,
    evaluate,
    evaluate_stacked,
    evaluation_splits,
    predictions,
    split_metrics,
    stacked_logits,
    stacked_splits,
)
from starvation.training.execution import CPU_PER_SEED_MATMUL_MACS, choose_execution, per_seed_matmuls
from starvation.training.loop import Metric, ProgressCallback, TrainingStopped, TrainOutcome, train
from starvation.training.resolved import ResolvedTrainSpec, spec_warnings
from starvation.training.spec import (
    DEFAULTS,
    EXECUTIONS,
    MAX_SEED,
    OPTIMIZERS,
    PRECISIONS,
    build_optimizer,
    resolve_device,
    resolve_train_spec,
)
from starvation.training.state import Batches, Resume
from starvation.training.update import stacked_train_step, train_step

__all__ = [
    "CPU_PER_SEED_MATMUL_MACS",
    "DEFAULTS",
    "EVAL_CHUNK",
    "EXECUTIONS",
    "MAX_SEED",
    "OPTIMIZERS",
    "PRECISIONS",
    "ResolvedTrainSpec",
    "STARVED_GRADIENT",
    "Batches",
    "GraphedUpdates",
    "Metric",
    "ProgressCallback",
    "Resume",
    "TrainOutcome",
    "TrainingStopped",
    "as_logits",
    "build_optimizer",
    "choose_execution",
    "evaluate",
    "evaluate_stacked",
    "evaluation_splits",
    "forward_precision",
    "per_seed_matmuls",
    "predictions",
    "resolve_device",
    "resolve_train_spec",
    "spec_warnings",
    "split_metrics",
    "stacked_logits",
    "stacked_splits",
    "stacked_train_step",
    "tf32_matmuls",
    "train",
    "train_step",
]
