"""The training loops: `train`, each seed on its own (`train_seed`) or all stacked (`train_batched`), one update."""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from starvation import datasets
from starvation.checkpoints.save import CheckpointFile, save_checkpoint
from starvation.datasets import Dataset, ImageFiles, batches_of
from starvation.ensemble import StackedMLP
from starvation.errors import SpecError
from starvation.methods import build_method
from starvation.networks import Network, output_count
from starvation.training.acceleration import GraphedUpdates, PhaseCompiled, tf32_matmuls
from starvation.training.evaluation import (
    EVAL_CHUNK,
    as_logits,
    bias_conflicting,
    evaluate,
    evaluate_stacked,
    evaluation_splits,
    kernel_alignments,
    kernel_sample,
    ntk_due,
    pooled_slices,
    predictions,
    split_to,
    stacked_splits,
    summarise_seeds,
)
from starvation.training.execution import (
    choose_execution,
    init_network,
    network_shape,
    per_seed_matmuls,
    update_rows,
)
from starvation.training.resolved import ResolvedTrainSpec
from starvation.training.spec import (
    build_optimizer,
    check_gamma,
    resolve_device,
    resolve_train_spec,
)
from starvation.training.state import Batches, Clock, Resume
from starvation.training.update import memberships, stacked_losses, stacked_train_step, train_step, update_inputs
from starvation.weights import load_initial_weights

# On a GPU, a batched job's hidden widths are padded to a multiple of this with units that stay zero
# (`StackedMLP`'s pad_to): 16-byte rows for bf16 and float32 alike, so cuBLAS can use its fastest kernels.
GPU_WIDTH_MULTIPLE = 8


class TrainingStopped(Exception):
    """`should_stop()` returned True: training ended early on request (no checkpoint for the seed in progress)."""


@dataclass
class Metric:
    step: int
    name: str  # "loss" | "accuracy" | "mean_abs_logit" | "starved_fraction"
    value: float
    seed: int | None
    split: str | None


@dataclass
class TrainOutcome:
    result: dict  # JSON-able summary: per-split mean/std over seeds, seeds, dataset info, starved fraction
    checkpoints: list[CheckpointFile] = field(default_factory=list)
    dataset_info: dict = field(default_factory=dict)


# ---- training ------------------------------------------------------------------------------

# (step, values per seed, progress): how the loops hand each evaluation's metrics and the progress to `train`
ProgressCallback = Callable[[int, dict[int, dict[tuple[str, str], float]], float], None]


def train(
    spec: ResolvedTrainSpec | dict[str, Any],
    *,
    out_dir: pathlib.Path,
    device: str = "cpu",
    data_dir: str | None = None,
    on_metrics: Callable[[list[Metric]], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dataset: Dataset | None = None,
    resume_dir: pathlib.Path | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> TrainOutcome:
    """Train one model per seed of `spec` and save each under `out_dir`.

    `spec`: a `ResolvedTrainSpec` runs as it is; anything else is resolved here first (`resolve_train_spec`).

    Each seed draws its own built-in dataset (`build(name, params, seed=seed)`: the paper's restarts redraw
    label noise and colours). A registered dataset is passed as `dataset` (spec's dataset.name then names it)
    and serves every seed. Raises SpecError for a bad spec, TrainingStopped when `should_stop()` says so.
    The result says how the seeds ran (`execution`) and how long the updates took (`timing`).

    `resume_dir`: where sequential training keeps its resumable states (`save_every`, `Resume`); a run given the
    folder of an earlier run that stopped goes on from its last saved step, and skips the seeds it finished. The
    result's `resumed` says, per seed, the step it went on from.

    `init_weights`: a state dict every seed starts from (`weights.load_initial_weights`: torchvision's names or
    ours; the backbone strictly, the head where it fits); the result's `init` says what was loaded.
    """
    started = time.perf_counter()
    if not isinstance(spec, ResolvedTrainSpec):
        section = spec.get("dataset") if isinstance(spec, dict) else None
        named = section.get("name") if isinstance(section, dict) else None
        registered = (named,) if dataset is not None and isinstance(named, str) else ()
        spec = ResolvedTrainSpec.of(resolve_train_spec(spec, user_datasets=registered))
    torch_device = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = spec.seeds

    def load(seed: int) -> Dataset:
        data = (
            dataset
            if dataset is not None
            else datasets.build(spec.dataset.name, dict(spec.dataset.params), seed=seed, data_dir=data_dir)
        )
        check_gamma(spec.method.params, data.num_classes)
        return datasets.hold_out(data, spec.holdout)

    def report(step: int, values_by_seed: dict[int, dict[tuple[str, str], float]], done: float) -> None:
        rows = [
            Metric(step=step, name=name, value=value, seed=seed, split=split)
            for seed, values in values_by_seed.items()
            for (split, name), value in values.items()
        ]
        if on_metrics is not None and rows:  # one batch per evaluation, every seed in it; none for progress alone
            on_metrics(rows)
        if on_progress is not None:
            on_progress(done)

    first = load(seeds[0])
    rows = update_rows(spec, first)
    shape = network_shape(spec, first)
    execution, why = choose_execution(spec, shape)
    streamed = isinstance(first.splits[first.train_splits[0]].x, ImageFiles)
    if streamed:
        if not spec.batch_size:
            raise SpecError(
                f"dataset {spec.dataset.name!r} is an image folder, read from disk in minibatches: "
                "set batch_size (full-batch training would hold every image in memory)"
            )
        execution, why = "sequential", "an image folder streams from disk, one seed at a time"
    per_seed = execution == "batched" and per_seed_matmuls(shape, rows, torch_device)
    graphs = spec.cuda_graphs and torch_device.type == "cuda" and not streamed
    compiled = spec.compile and execution == "batched"
    # what the initial weights fill (checked here, before any training: a wrong shape is a SpecError naming the key)
    init = load_initial_weights(init_network(spec, first, seeds[0]), init_weights) if init_weights else None
    resumed: dict[int, int] = {}
    with tf32_matmuls(spec.precision == "tf32"):  # evaluation switches it off again: metrics in float32
        if execution == "batched":
            networks, histories, clock = train_batched(
                spec,
                [first] + [load(seed) for seed in seeds[1:]],
                torch_device,
                report,
                should_stop,
                shared_data=dataset is not None,
                matmuls_per_seed=per_seed,
                graphs=graphs,
                compiled=compiled,
                init_weights=init_weights,
            )
        else:
            networks, histories, clock = [], [], Clock(torch_device)
            saved = Resume(pathlib.Path(resume_dir), spec.save_every) if resume_dir is not None else None
            for index, seed in enumerate(seeds):
                data = first if index == 0 else load(seed)
                network, history = train_seed(
                    spec,
                    data,
                    seed,
                    torch_device,
                    clock,
                    should_stop,
                    functools.partial(_report_seed, report, index, len(seeds)),
                    graphs=graphs,
                    resume=saved,
                    init_weights=init_weights,
                )
                networks.append(network)
                histories.append(history)
            resumed = saved.resumed if saved is not None else {}

    checkpoints = [
        save_checkpoint(
            network,
            out_dir,
            seed=seed,
            arch=spec.model.arch,
            arch_params=dict(spec.model.params),
            input_shape=first.input_shape,
            num_outputs=output_count(first.num_classes),
        )
        for seed, network in zip(seeds, networks)
    ]
    finals = {seed: history[-1] for seed, history in zip(seeds, histories)}
    result = {
        "splits": summarise_seeds(finals),
        "seeds": list(seeds),
        "dataset": dict(first.info),
        "starved_fraction": {
            "first": float(np.mean([h[0][("train", "starved_fraction")] for h in histories])),
            "last": float(np.mean([h[-1][("train", "starved_fraction")] for h in histories])),
        },
        "execution": {
            "requested": spec.execution,
            "used": execution,
            "why": why,
            "precision": spec.precision,
            "per_seed_matmuls": per_seed,
            "cuda_graphs": graphs,
            "compile": compiled,
        },
        "timing": clock.summary(spec.steps, total_s=time.perf_counter() - started),
    }
    if resumed:
        result["resumed"] = {str(seed): step for seed, step in resumed.items()}
    if init is not None:
        result["init"] = init
    return TrainOutcome(result=result, checkpoints=checkpoints, dataset_info=dict(first.info))


def _report_seed(
    report: ProgressCallback,
    index: int,
    count: int,
    step: int,
    steps: int,
    seed: int,
    values: dict[tuple[str, str], float],
) -> None:
    """Sequential progress: seed `index` of `count` is at `step` of `steps`."""
    report(step, {seed: values}, (index * steps + step) / (count * steps))


def train_seed(
    spec: ResolvedTrainSpec,
    data: Dataset,
    seed: int,
    device: torch.device,
    clock: Clock,
    should_stop: Callable[[], bool] | None,
    report: Callable[[int, int, int, dict[tuple[str, str], float]], None],
    *,
    graphs: bool,
    resume: Resume | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Network, list[dict[tuple[str, str], float]]]:
    """One model: init under `seed`, full-batch or minibatch updates, evaluation on schedule.

    `resume`: the seed goes on from the state an earlier run saved there (or is taken as it finished), and saves
    its own every `resume.every` steps."""
    splits = {name: split_to(split, device) for name, split in evaluation_splits(data).items()}
    pooled = pooled_slices(data)
    train_split = splits["train"]
    conflicting = bias_conflicting(data)
    conflicting = conflicting.to(device) if conflicting is not None else None
    model = init_network(spec, data, seed, init_weights).to(device)
    method = build_method(spec.method.to_dict())
    optimizer = build_optimizer(spec.optimizer.to_dict(), model.parameters(), capturable=graphs)
    steps, eval_every, precision = spec.steps, spec.eval_every, spec.precision
    streamed = isinstance(train_split.x, ImageFiles)
    batches = Batches(
        len(train_split), spec.batch_size, seeds=[seed], device=torch.device("cpu") if streamed else device
    )
    start, history = 0, []
    state = resume.load(seed) if resume is not None else None
    if resume is not None and state is not None:
        model.load_state_dict(state["model"])
        history = [{(split, name): value for split, name, value in values} for values in state["history"]]
        if state["finished"]:
            return model, history
        optimizer.load_state_dict(state["optimizer"])
        batches.restore(state["batches"])
        start = resume.resumed[seed] = state["step"]
    prepared = method.prepare(SeedPreparation(spec, data, seed, device, should_stop))  # not for a finished seed
    groups = {name: tensor.to(device) for name, tensor in memberships(data, method.NEEDS, prepared).items()}
    kernel = kernel_sample(spec.ntk_every, data, seed)
    drawn_before: dict[int, dict] = {}  # the minibatch order as it was before the rows of a step to save at

    def rows_of_steps() -> Iterator[list[int]]:
        for step in range(start, steps):
            if resume is not None and resume.due(step):
                drawn_before[step] = batches.state()
            rows = batches.next()
            yield rows[0].tolist() if rows is not None else list(range(len(train_split)))  # None: a batch of all

    if isinstance(train_split.x, ImageFiles):  # the same rows in the same order as in memory, read from disk
        stream = iter(train_split.x.loader(rows_of_steps()))  # (ahead) by the loader's workers

        def update(rows: torch.Tensor | None, step: int) -> None:
            images, picked = next(stream)
            x, picked = images.to(device, non_blocking=True), picked.to(device)
            y, given = train_split.y[picked], {name: tensor[picked] for name, tensor in groups.items()}
            train_step(model, optimizer, method, x, y, step, precision=precision, memberships=given)

    else:
        train_x = update_inputs(train_split.x, precision)

        def update(rows: torch.Tensor | None, step: int) -> None:
            if rows is None:
                x, y, given = train_x, train_split.y, groups
            else:
                x, y = train_x[rows[0]], train_split.y[rows[0]]
                given = {name: tensor[rows[0]] for name, tensor in groups.items()}
            train_step(model, optimizer, method, x, y, step, precision=precision, memberships=given)

    if graphs:
        update = GraphedUpdates(update, method, device)

    clock.start()
    for step in range(start, steps + 1):
        if resume is not None and step > start and resume.due(step):  # before this step's evaluation is reported
            resume.save(
                seed,
                step=step,
                model=model,
                optimizer=optimizer,
                history=history,
                batches=drawn_before.pop(step, None) or batches.state(),
            )
        if step % eval_every == 0 or step == steps:
            with clock.evaluating(), tf32_matmuls(False):
                values = evaluate(model, splits, pooled, conflicting)
                if kernel is not None and ntk_due(spec.ntk_every, step, steps):
                    values.update(kernel_alignments(kernel, model))
                history.append(values)
                report(step, steps, seed, values)
        if step == steps:
            break
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step} of seed {seed}")
        update(None if streamed else batches.next(), step)
    if resume is not None and resume.every:
        resume.save(seed, step=steps, model=model, optimizer=None, history=history, batches=None)
    return model, history


def train_batched(
    spec: ResolvedTrainSpec,
    data: list[Dataset],
    device: torch.device,
    report: ProgressCallback,
    should_stop: Callable[[], bool] | None,
    *,
    shared_data: bool,
    matmuls_per_seed: bool,
    graphs: bool,
    compiled: bool,
    seeds: Sequence[int] | None = None,
    member_params: dict[str, torch.Tensor] | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[Network], list[list[dict[tuple[str, str], float]]], Clock]:
    """Every seed at once as a StackedMLP: per seed the same init, data, minibatches and updates as `train_seed`.

    `seeds`: one per member of the stack (default the spec's); a sweep repeats a seed, one member per setting,
    and gives each member its own values of the method's `TENSOR_PARAMS` in `member_params` ([members, ...]).
    `report` then gets each evaluation keyed by member index, not by seed.
    """
    keys = list(range(len(seeds))) if seeds is not None else spec.seeds
    seeds = list(seeds) if seeds is not None else spec.seeds
    member_params = {name: value.to(device) for name, value in (member_params or {}).items()}
    splits = stacked_splits(data, device, shared=shared_data)
    pooled = pooled_slices(data[0])
    method = build_method(spec.method.to_dict())
    distinct = data[: 1 if shared_data else len(data)]  # a registered dataset serves every seed
    per_seed_groups = [memberships(d, method.NEEDS) for d in distinct]
    groups = {
        name: torch.stack([g[name] for g in per_seed_groups]).expand(len(seeds), -1, -1).to(device)
        for name in method.NEEDS
    }
    masks = [mask for mask in (bias_conflicting(d) for d in distinct) if mask is not None]
    conflicting = torch.stack(masks).expand(len(seeds), -1).to(device) if len(masks) == len(distinct) else None
    first = data[0]
    kernels = [
        kernel_sample(spec.ntk_every, data[0 if shared_data else index], seed) for index, seed in enumerate(seeds)
    ]
    del data  # the stacked copy is all that training needs
    train_split = splits["train"]
    networks = [init_network(spec, first, seed, init_weights) for seed in seeds]
    model = StackedMLP(
        networks, per_seed_matmuls=matmuls_per_seed, pad_to=GPU_WIDTH_MULTIPLE if device.type == "cuda" else 1
    ).to(device)
    optimizer = build_optimizer(spec.optimizer.to_dict(), model.parameters(), capturable=graphs)
    stacked = functools.partial(stacked_losses, model, method, precision=spec.precision, member_params=member_params)
    batches = Batches(train_split.x.shape[1], spec.batch_size, seeds=seeds, device=device)
    seed_rows = torch.arange(len(seeds), device=device).unsqueeze(1)
    steps, eval_every, precision = spec.steps, spec.eval_every, spec.precision
    if not isinstance(train_split.x, torch.Tensor):  # `train` streams an image folder one seed at a time
        raise ValueError("a stacked model trains on inputs held in memory, not an image folder")
    train_x = update_inputs(train_split.x, precision)
    clock = Clock(device)

    def inputs(rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if rows is None:
            return train_x, train_split.y, groups
        return (
            train_x[seed_rows, rows],
            train_split.y[seed_rows, rows],
            {name: tensor[seed_rows, rows] for name, tensor in groups.items()},
        )

    losses = None
    if compiled:
        losses = PhaseCompiled(stacked, method)
        size = batches.batch_size
        shaped = (
            None if size is None or batches.full else torch.arange(size, device=device).expand(len(seeds), size)
        )  # rows of a minibatch's shape: what the compiled loss will be given
        clock.compile_s = losses.prepare(steps, list(model.parameters()), *inputs(shaped))

    def update(rows: torch.Tensor | None, step: int) -> None:
        x, y, given = inputs(rows)
        stacked_train_step(
            model, optimizer, method, x, y, step, precision=precision, memberships=given, losses=losses or stacked
        )

    if graphs:
        update = GraphedUpdates(update, method, device)
    # Progress between evaluations too, about as often as the sequential path reports it, but at most ~100 times
    # a job: in the worker each report is a database write on this thread.
    progress_every = max(1, eval_every // len(seeds), steps // 100)
    histories: list[list[dict[tuple[str, str], float]]] = [[] for _ in seeds]

    clock.start()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with clock.evaluating(), tf32_matmuls(False):
                per_seed = evaluate_stacked(model, splits, pooled, conflicting)
                if ntk_due(spec.ntk_every, step, steps):
                    for index, (network, values, kernel) in enumerate(zip(networks, per_seed, kernels)):
                        if kernel is not None:
                            network.load_state_dict(model.network_state(index))
                            values.update(kernel_alignments(kernel, network.to(device)))
                for history, values in zip(histories, per_seed):
                    history.append(values)
                report(step, dict(zip(keys, per_seed)), step / steps)
        elif step % progress_every == 0:
            report(step, {}, step / steps)
        if step == steps:
            break
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step} of seeds {', '.join(map(str, seeds))}")
        update(batches.next(), step)

    for index, network in enumerate(networks):  # each seed back as an ordinary module, for its checkpoint
        network.load_state_dict(model.network_state(index))
    return networks, histories, clock


@dataclass
class SeedPreparation:
    """What `train_seed` offers a method before the method's own run (`Method.prepare`, `methods.Preparation`):
    runs of other methods from the seed's initialisation, on its data, with the spec's model, optimizer, batch size
    and precision."""

    spec: ResolvedTrainSpec
    data: Dataset
    seed: int
    device: torch.device
    should_stop: Callable[[], bool] | None

    @property
    def labels(self) -> torch.Tensor:
        return self.data.train_data().y

    def train_predictions(self, method: dict[str, Any], steps: int) -> torch.Tensor:
        """The class each pooled training example gets from a model of `method` trained `steps` updates, [N]."""
        spec = self.spec.replace(method=method, steps=steps, eval_every=steps)
        device = self.device
        model, _ = train_seed(
            spec, self.data, self.seed, device, Clock(device), self.should_stop, lambda *_: None, graphs=False
        )
        model.eval()
        with torch.no_grad():
            logits = torch.cat(
                [as_logits(model(batch.to(device))) for batch in batches_of(self.data.train_data().x, EVAL_CHUNK)]
            )
        return predictions(logits).cpu()
