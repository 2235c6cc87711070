"""What a train job will hold in memory, from its resolved spec alone, so an over-budget job is refused at submit.

The estimate (float32 bytes) is the sum of five parts (six with `ntk_every`): a fixed `runtime` allowance, and
- parameters: weights, gradients and the optimizer's state (Adam: two moments; SGD with momentum: one), for every
  seed, plus the per-seed networks kept beside a batched model;
- activations: what one update's forward pass keeps for the backward pass, with its gradients and temporaries
  (x3), and a minibatch's input rows, for the rows of one update (`batch_size`, or the whole training set: full
  batch, as the paper), for the seeds trained at once (batched execution: all of them; sequential: one);
- evaluation: one chunk of EVAL_CHUNK examples through the network (no gradients: what a pass holds at once,
  `networks.inference_count`), for the seeds at once;
- dataset: every split's inputs, labels and attribute, for each seed (each seed draws its own built-in dataset;
  a registered one is shared), twice (the splits, and the pooled training set or the stacked copy beside them).
  An image folder (`DataSize.streamed`) holds labels only, and STREAM_BATCHES batches of inputs read ahead; its
  evaluation reads IMAGE_BATCH images at a time;
- kernel (`ntk_every` only): the NTK alignments' per-example gradients on their sample (`ntk.kernel_bytes`).
It is an estimate from above: tests/science/test_budget.py checks it against the peak memory of real runs.
The field named when a spec is over budget is the one whose reset (to the arch's default widths, one seed,
minibatches of SMALL_BATCH, SMALL_DATASET training examples) shrinks the estimate most.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from starvation import datasets
from starvation.datasets import DataSize
from starvation.datasets.files import IMAGE_BATCH
from starvation.errors import SpecError
from starvation.methods import method_class
from starvation.networks import (
    activation_count,
    arch_class,
    check_arch_params,
    inference_count,
    largest_tensor,
    output_count,
    parameter_count,
)
from starvation.ntk import TRAINING_EXAMPLES, kernel_bytes

BYTES = 4  # float32
LABEL_BYTES = 16  # y and attribute, int64 each
EVAL_CHUNK = 8192  # starvation.training.EVAL_CHUNK (not imported: this module must not need torch's training code)
SMALL_BATCH = 256
SMALL_DATASET = 10_000  # training examples: between the paper's two moons (300) and MNIST (50,000)
STREAM_BATCHES = 8  # an image folder's batches read ahead and in flight (DataLoader's prefetch, pinned copies)
RUNTIME_BYTES = 256 << 20  # what the first update adds whatever its size (kernels, thread pools, allocator caches)


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # "runtime", "parameters", "activations", "evaluation", "dataset" -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


class OverBudget(SpecError):
    """The spec's estimate is over the budget; `field` is the spec field that contributes most."""

    code = "over_budget"

    def __init__(self, message: str, field: str, estimate: MemoryEstimate, budget_bytes: int) -> None:
        super().__init__(message)
        self.field, self.estimate, self.budget_bytes = field, estimate, budget_bytes

    @property
    def details(self) -> dict[str, object]:
        """What a 422 `over_budget` shows: the field to change, the estimate and its parts, the budget."""
        return {
            "field": f"spec.{self.field}",
            "estimate_bytes": self.estimate.total_bytes,
            "budget_bytes": self.budget_bytes,
            "parts": self.estimate.parts,
        }


def data_size(spec: dict, data_dir: str | None) -> DataSize:
    """A built-in dataset's size from the resolved spec (a registered one's comes from `datasets.registered_size`)."""
    return datasets.size(spec["dataset"]["name"], spec["dataset"]["params"], data_dir=data_dir)


def seeds_at_once(spec: dict) -> int:
    """How many seeds train side by side: all of them when batched (MLPs; `training.choose_execution`), else one."""
    seeds = len(spec["seeds"])
    batched = (
        spec["model"]["arch"] == "mlp"
        and spec["execution"] != "sequential"
        and method_class(spec["method"]["name"]).SEQUENTIAL_ONLY is None
        and (seeds > 1 or spec["execution"] == "batched")
    )
    return seeds if batched else 1


def estimate_train_memory(spec: dict, data: DataSize, *, shared_dataset: bool = False) -> MemoryEstimate:
    """Bytes a train job with the resolved `spec` on `data` holds at its peak (see the module's docstring).

    `shared_dataset`: a registered dataset, loaded once for every seed (built-ins are drawn per seed).
    """
    arch, params = spec["model"]["arch"], {k: v for k, v in spec["model"].items() if k != "arch"}
    outputs = output_count(data.num_classes)
    seeds, at_once = len(spec["seeds"]), seeds_at_once(spec)
    optimizer = spec["optimizer"]
    state = 2 if optimizer["name"] == "adam" else (1 if optimizer.get("momentum") else 0)
    copies = 2 + state + (1 if at_once > 1 else 0)  # weights, gradients, optimizer state, the per-seed modules
    n_parameters = parameter_count(arch, params, data.input_shape, outputs)
    per_example = activation_count(arch, params, data.input_shape, outputs)
    evaluated = inference_count(arch, params, data.input_shape, outputs)  # no gradients: layers freed as it goes
    input_values = math.prod(data.input_shape)
    rows = min(spec["batch_size"] or data.n_train, data.n_train)
    example_bytes = input_values * BYTES + LABEL_BYTES
    return MemoryEstimate(
        parts={
            "runtime": RUNTIME_BYTES,
            "parameters": n_parameters * copies * seeds * BYTES,
            # kept values, their gradients and a temporary (x3, measured); a minibatch's inputs are a gathered copy
            "activations": rows * (3 * per_example + (input_values if rows < data.n_train else 0)) * at_once * BYTES,
            "evaluation": min(IMAGE_BATCH if data.streamed else EVAL_CHUNK, data.n_examples)
            * (evaluated + input_values)
            * at_once
            * BYTES,
            "dataset": (2 * data.n_examples * LABEL_BYTES + STREAM_BATCHES * rows * input_values * BYTES)
            if data.streamed
            else 2 * data.n_examples * example_bytes * (1 if shared_dataset else seeds),
            # `ntk_every`: one seed's kernel at a time, on its sample, while the training holds the rest
            **(
                {
                    "kernel": kernel_bytes(
                        min(TRAINING_EXAMPLES, data.n_train),
                        parameters=n_parameters,
                        largest_tensor=largest_tensor(arch, params, data.input_shape, outputs),
                        input_values=input_values,
                        activations=per_example,
                    )
                }
                if spec.get("ntk_every")
                else {}
            ),
        }
    )


def estimate_sweep_memory(spec: dict, stack: int, data: DataSize, *, shared_dataset: bool = False) -> MemoryEstimate:
    """A sweep trains its stacks one after another and saves and frees each stack's networks as it ends
    (`training.sweep`): a train job of the widest stack's `stack` settings as its seeds, and `saving`, the two copies
    of those networks' weights that saving makes (a deep copy, and its TorchScript)."""
    one_stack = {**spec, "seeds": list(range(stack))}
    estimate = estimate_train_memory(one_stack, data, shared_dataset=shared_dataset)
    arch, params = spec["model"]["arch"], {k: v for k, v in spec["model"].items() if k != "arch"}
    weights = parameter_count(arch, params, data.input_shape, output_count(data.num_classes)) * BYTES
    return MemoryEstimate(parts={**estimate.parts, "saving": 2 * stack * weights})


def check_train_budget(
    spec: dict, budget_bytes: int, data: DataSize, *, shared_dataset: bool = False, sweep_stack: int | None = None
) -> MemoryEstimate:
    """The estimate of the resolved `spec` on `data` (`data_size`, or `datasets.registered_size` with
    `shared_dataset`), or `OverBudget` naming the field that dominates. `sweep_stack`: the spec is a sweep's whose
    widest stack trains that many settings at once (`estimate_sweep_memory`); its size then comes from `grid`.

    The architecture is checked against its bounds for this dataset's input shape first (`check_arch_params`: a
    `ParamError` naming model.<param>).
    """
    arch, params = spec["model"]["arch"], {k: v for k, v in spec["model"].items() if k != "arch"}
    check_arch_params(
        arch, params, input_shape=data.input_shape, num_outputs=output_count(data.num_classes), field="model"
    )
    if sweep_stack is None:
        what, fewer, counted = "this train job", "seeds", spec
        estimate = estimate_train_memory(spec, data, shared_dataset=shared_dataset)
    else:
        what, fewer = f"this sweep (its widest stack trains {sweep_stack} settings at once)", "grid values"
        counted = {**spec, "seeds": list(range(sweep_stack))}
        estimate = estimate_sweep_memory(spec, sweep_stack, data, shared_dataset=shared_dataset)
    if estimate.total_bytes <= budget_bytes:
        return estimate
    field = dominant_field(counted, data, shared_dataset=shared_dataset)
    if sweep_stack is not None and field == "seeds":
        field = "grid"
    raise OverBudget(
        f"{what} would need about {_gib(estimate.total_bytes)} of memory (parameters and "
        f"optimizer {_gib(estimate.parts['parameters'])}, activations "
        f"{_gib(estimate.parts['activations'])}, data {_gib(estimate.parts['dataset'])}"
        + (f", NTK alignments {_gib(estimate.parts['kernel'])}" if "kernel" in estimate.parts else "")
        + f"); the worker's "
        f"budget is {_gib(budget_bytes)}. Most of it comes from {field}: make it smaller "
        f"(or set batch_size, or use fewer {fewer}).",
        field,
        estimate,
        budget_bytes,
    )


def dominant_field(spec: dict, data: DataSize, *, shared_dataset: bool = False) -> str:
    """The spec field whose reset to a small value leaves the smallest estimate (ties: the first listed)."""
    cls = arch_class(spec["model"]["arch"])
    widths = cls.WIDTHS
    size_param = (
        datasets.DATASETS[spec["dataset"]["name"]].SIZE_PARAM if spec["dataset"]["name"] in datasets.DATASETS else None
    )
    small_data = dataclasses.replace(
        data,
        n_train=min(data.n_train, SMALL_DATASET),
        n_examples=max(1, data.n_examples * min(data.n_train, SMALL_DATASET) // max(data.n_train, 1)),
    )
    candidates = [
        (f"model.{widths}", {**spec, "model": {**spec["model"], widths: cls.PARAMS[widths].default}}, data),
        ("batch_size", {**spec, "batch_size": min(spec["batch_size"] or SMALL_BATCH, SMALL_BATCH)}, data),
        (f"dataset.params.{size_param}" if size_param else "dataset", spec, small_data),
        ("seeds", {**spec, "seeds": spec["seeds"][:1]}, data),
        *([("ntk_every", {**spec, "ntk_every": None}, data)] if spec.get("ntk_every") else []),
    ]
    remaining = [
        (estimate_train_memory(s, d, shared_dataset=shared_dataset).total_bytes, index, field)
        for index, (field, s, d) in enumerate(candidates)
    ]
    return min(remaining)[2]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.0f} MiB"
