"""The training loops: `train`, each seed on its own (`_train_seed`) or all stacked (`_train_batched`), one update."""

from __future__ import annotations

import contextlib
import functools
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from starvation import datasets
from starvation.checkpoints.save import CheckpointFile, save_checkpoint
from starvation.datasets import Dataset, ImageFiles, batches_of
from starvation.ensemble import StackedMLP, seed_losses, unsupported_reason
from starvation.errors import SpecError
from starvation.methods import Method, build_method, method_class
from starvation.networks import Network, build_network, load_initial_weights, output_count
from starvation.ntk import KernelSample
from starvation.training.acceleration import GraphedUpdates, PhaseCompiled, forward_precision, tf32_matmuls
from starvation.training.evaluation import (
    EVAL_CHUNK,
    _summarise,
    _to,
    as_logits,
    bias_conflicting,
    evaluate,
    evaluate_stacked,
    evaluation_splits,
    pooled_slices,
    predictions,
    stacked_logits,
    stacked_splits,
)
from starvation.training.spec import (
    ResolvedTrainSpec,
    _check_gamma,
    build_optimizer,
    resolve_device,
    resolve_train_spec,
)

# Above this many multiply-adds per seed and update, a batched job on the CPU runs each seed's matmuls on its own
# (`per_seed_matmuls`). On a 2-core CPU (docs/performance.md) one batched matmul over 10 seeds is 1.4x slower than
# 10 separate ones at 830M (CMNIST, full batch), even at 53M (CMNIST, batches of 256), faster at 0.45M (two moons).
CPU_PER_SEED_MATMUL_MACS = 50_000_000
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
    spec: dict,
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

    `init_weights`: a state dict every seed starts from (`networks.load_initial_weights`: torchvision's names or
    ours; the backbone strictly, the head where it fits); the result's `init` says what was loaded.
    """
    started = time.perf_counter()
    section = spec.get("dataset") if isinstance(spec, dict) else None
    named = section.get("name") if isinstance(section, dict) else None
    if not isinstance(spec, ResolvedTrainSpec):
        spec = resolve_train_spec(
            spec, user_datasets=(named,) if dataset is not None and isinstance(named, str) else ()
        )
    torch_device = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = spec["seeds"]

    def load(seed: int) -> Dataset:
        data = (
            dataset
            if dataset is not None
            else datasets.build(spec["dataset"]["name"], spec["dataset"]["params"], seed=seed, data_dir=data_dir)
        )
        _check_gamma(spec["method"], data.num_classes)
        return datasets.hold_out(data, spec["holdout"])

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
    shape = _shape_of(spec, first)
    execution, why = choose_execution(spec, shape)
    streamed = isinstance(first.splits[first.train_splits[0]].x, ImageFiles)
    if streamed:
        if not spec["batch_size"]:
            raise SpecError(
                f"dataset {spec['dataset']['name']!r} is an image folder, read from disk in minibatches: "
                "set batch_size (full-batch training would hold every image in memory)"
            )
        execution, why = "sequential", "an image folder streams from disk, one seed at a time"
    per_seed = execution == "batched" and per_seed_matmuls(shape, rows, torch_device)
    graphs = spec["cuda_graphs"] and torch_device.type == "cuda" and not streamed
    compiled = spec["compile"] and execution == "batched"
    # what the initial weights fill (checked here, before any training: a wrong shape is a SpecError naming the key)
    init = load_initial_weights(_init_network(spec, first, seeds[0]), init_weights) if init_weights else None
    resumed: dict[int, int] = {}
    with tf32_matmuls(spec["precision"] == "tf32"):  # evaluation switches it off again: metrics in float32
        if execution == "batched":
            networks, histories, clock = _train_batched(
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
            networks, histories, clock = [], [], _Clock(torch_device)
            saved = Resume(pathlib.Path(resume_dir), spec["save_every"]) if resume_dir is not None else None
            for index, seed in enumerate(seeds):
                data = first if index == 0 else load(seed)
                network, history = _train_seed(
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
            arch=spec["model"]["arch"],
            arch_params=_arch_params(spec),
            input_shape=first.input_shape,
            num_outputs=output_count(first.num_classes),
        )
        for seed, network in zip(seeds, networks)
    ]
    finals = {seed: history[-1] for seed, history in zip(seeds, histories)}
    result = {
        "splits": _summarise(finals),
        "seeds": list(seeds),
        "dataset": dict(first.info),
        "starved_fraction": {
            "first": float(np.mean([h[0][("train", "starved_fraction")] for h in histories])),
            "last": float(np.mean([h[-1][("train", "starved_fraction")] for h in histories])),
        },
        "execution": {
            "requested": spec["execution"],
            "used": execution,
            "why": why,
            "precision": spec["precision"],
            "per_seed_matmuls": per_seed,
            "cuda_graphs": graphs,
            "compile": compiled,
        },
        "timing": clock.summary(spec["steps"], total_s=time.perf_counter() - started),
    }
    if resumed:
        result["resumed"] = {str(seed): step for seed, step in resumed.items()}
    if init is not None:
        result["init"] = init
    return TrainOutcome(result=result, checkpoints=checkpoints, dataset_info=dict(first.info))


def choose_execution(spec: dict, network: Network) -> tuple[str, str]:
    """("batched" | "sequential", why) for the resolved `spec`; `network` shows the architecture (no weights)."""
    requested = spec["execution"]
    if requested == "sequential":
        return "sequential", "requested"
    reason = unsupported_reason(network) or method_class(spec["method"]["name"]).SEQUENTIAL_ONLY
    if reason is not None:
        return "sequential", f"cannot batch: {reason}"
    if requested == "batched":
        return "batched", "requested"
    if len(spec["seeds"]) == 1:
        return "sequential", "auto: one seed"
    return "batched", "auto: several seeds"


def update_rows(spec: dict, data: Dataset) -> int:
    """Examples per update: the spec's batch size, or every pooled training example (full batch)."""
    n_train = sum(len(data.splits[name]) for name in data.train_splits)
    return min(spec["batch_size"] or n_train, n_train)


def per_seed_matmuls(network: Network, rows: int, device: torch.device) -> bool:
    """Whether a batched job runs each seed's matmuls on its own (`StackedMLP`): on the CPU, for large updates.

    `rows`: examples per update (the batch, or all). On a GPU one batched matmul always pays (one launch, not S).
    """
    macs = rows * sum(p.numel() for p in network.parameters() if p.ndim > 1)
    return device.type == "cpu" and macs > CPU_PER_SEED_MATMUL_MACS


def _shape_of(spec: dict, data: Dataset) -> Network:
    """The spec's network for `data`, without weights (built on the meta device: no RNG drawn, no memory)."""
    with torch.device("meta"):
        return build_network(
            spec["model"]["arch"], _arch_params(spec), data.input_shape, output_count(data.num_classes)
        )


def _init_network(
    spec: dict, data: Dataset, seed: int, init_weights: Mapping[str, torch.Tensor] | None = None
) -> Network:
    """Seed `seed`'s initial network (filled from `init_weights` where given); the caller's global RNG is left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(
            spec["model"]["arch"], _arch_params(spec), data.input_shape, output_count(data.num_classes)
        )
    if init_weights is not None:
        load_initial_weights(network, init_weights)
    return network


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


def _train_seed(
    spec: dict,
    data: Dataset,
    seed: int,
    device: torch.device,
    clock: _Clock,
    should_stop: Callable[[], bool] | None,
    report: Callable[[int, int, int, dict[tuple[str, str], float]], None],
    *,
    graphs: bool,
    resume: Resume | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict[tuple[str, str], float]]]:
    """One model: init under `seed`, full-batch or minibatch updates, evaluation on schedule.

    `resume`: the seed goes on from the state an earlier run saved there (or is taken as it finished), and saves
    its own every `resume.every` steps."""
    splits = {name: _to(split, device) for name, split in evaluation_splits(data).items()}
    pooled = pooled_slices(data)
    train_split = splits["train"]
    conflicting = bias_conflicting(data)
    conflicting = conflicting.to(device) if conflicting is not None else None
    model = _init_network(spec, data, seed, init_weights).to(device)
    method = build_method(spec["method"])
    optimizer = build_optimizer(spec["optimizer"], model.parameters(), capturable=graphs)
    steps, eval_every, precision = spec["steps"], spec["eval_every"], spec["precision"]
    streamed = isinstance(train_split.x, ImageFiles)
    batches = Batches(
        len(train_split), spec["batch_size"], seeds=[seed], device=torch.device("cpu") if streamed else device
    )
    start, history = 0, []
    state = resume.load(seed) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        history = [{(split, name): value for split, name, value in values} for values in state["history"]]
        if state["finished"]:
            return model, history
        optimizer.load_state_dict(state["optimizer"])
        batches.restore(state["batches"])
        start = resume.resumed[seed] = state["step"]
    found = {}
    if method.IDENTIFICATION_STEPS is not None:  # JTT: its identification model first (not for a finished seed)
        found["error_set"] = identification_errors(
            spec, data, seed, device, method.params[method.IDENTIFICATION_STEPS], should_stop
        )
    groups = {name: tensor.to(device) for name, tensor in memberships(data, method.NEEDS, **found).items()}
    kernel = kernel_sample(spec, data, seed)
    drawn_before: dict[int, dict] = {}  # the minibatch order as it was before the rows of a step to save at

    def rows_of_steps() -> Iterator[list[int]]:
        for step in range(start, steps):
            if resume is not None and resume.due(step):
                drawn_before[step] = batches.state()
            yield batches.next()[0].tolist()

    if streamed:  # the same rows in the same order as in memory, read from disk (ahead) by the loader's workers
        stream = iter(train_split.x.loader(rows_of_steps()))
    train_x = None if streamed else update_inputs(train_split.x, precision)

    def update(rows: torch.Tensor | None, step: int) -> None:
        if streamed:
            images, picked = next(stream)
            x, picked = images.to(device, non_blocking=True), picked.to(device)
            y, given = train_split.y[picked], {name: tensor[picked] for name, tensor in groups.items()}
        elif rows is None:
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
                if kernel is not None and (step % spec["ntk_every"] == 0 or step == steps):
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


def _train_batched(
    spec: dict,
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
) -> tuple[list[nn.Module], list[list[dict[tuple[str, str], float]]], _Clock]:
    """Every seed at once as a StackedMLP: per seed the same init, data, minibatches and updates as `_train_seed`.

    `seeds`: one per member of the stack (default the spec's); a sweep repeats a seed, one member per setting,
    and gives each member its own values of the method's `TENSOR_PARAMS` in `member_params` ([members, ...]).
    `report` then gets each evaluation keyed by member index, not by seed.
    """
    keys = list(range(len(seeds))) if seeds is not None else spec["seeds"]
    seeds = list(seeds) if seeds is not None else spec["seeds"]
    member_params = {name: value.to(device) for name, value in (member_params or {}).items()}
    splits = stacked_splits(data, device, shared=shared_data)
    pooled = pooled_slices(data[0])
    method = build_method(spec["method"])
    distinct = data[: 1 if shared_data else len(data)]  # a registered dataset serves every seed
    per_seed_groups = [memberships(d, method.NEEDS) for d in distinct]
    groups = {
        name: torch.stack([g[name] for g in per_seed_groups]).expand(len(seeds), -1, -1).to(device)
        for name in method.NEEDS
    }
    masks = [bias_conflicting(d) for d in distinct]
    conflicting = None if any(m is None for m in masks) else torch.stack(masks).expand(len(seeds), -1).to(device)
    first = data[0]
    kernels = [kernel_sample(spec, data[0 if shared_data else index], seed) for index, seed in enumerate(seeds)]
    del data  # the stacked copy is all that training needs
    train_split = splits["train"]
    networks = [_init_network(spec, first, seed, init_weights) for seed in seeds]
    model = StackedMLP(
        networks, per_seed_matmuls=matmuls_per_seed, pad_to=GPU_WIDTH_MULTIPLE if device.type == "cuda" else 1
    ).to(device)
    optimizer = build_optimizer(spec["optimizer"], model.parameters(), capturable=graphs)
    stacked = functools.partial(stacked_losses, model, method, precision=spec["precision"], member_params=member_params)
    batches = Batches(train_split.x.shape[1], spec["batch_size"], seeds=seeds, device=device)
    seed_rows = torch.arange(len(seeds), device=device).unsqueeze(1)
    steps, eval_every, precision = spec["steps"], spec["eval_every"], spec["precision"]
    train_x = update_inputs(train_split.x, precision)
    clock = _Clock(device)

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
        shaped = (
            None
            if batches.full
            else torch.arange(batches.batch_size, device=device).expand(len(seeds), batches.batch_size)
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
                if kernels[0] is not None and (step % spec["ntk_every"] == 0 or step == steps):
                    for index, (network, values) in enumerate(zip(networks, per_seed)):
                        network.load_state_dict(model.network_state(index))
                        values.update(kernel_alignments(kernels[index], network.to(device)))
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


def kernel_sample(spec: dict, data: Dataset, seed: int) -> KernelSample | None:
    """The fixed sample a seed's NTK alignments follow (`ntk_every`), or None."""
    if not spec.get("ntk_every"):
        return None
    train = data.train_data()
    if isinstance(train.x, ImageFiles):
        raise SpecError("ntk_every needs a dataset held in memory, not an image folder")
    return KernelSample.of(train, seed=seed)


def kernel_alignments(kernel: KernelSample, model: nn.Module) -> dict[tuple[str, str], float]:
    with torch.enable_grad():
        return {("train", f"ntk_alignment_{name}"): value for name, value in kernel.alignments(model).items()}


def memberships(
    data: Dataset, needs: Sequence[str], *, error_set: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What a method's loss needs of each pooled training example besides its label (`Method.NEEDS`), in the
    order of `Dataset.train_data()`, one-hot float: `environment` [N, training splits] (the split it came from);
    `group` [N, classes x attribute values] (its (label, attribute) pair, at label * attribute values + attribute);
    `error_set` [N] as given (`identification_errors`).
    """
    known = {"environment", "group"} | ({"error_set"} if error_set is not None else set())
    unknown = sorted(set(needs) - known)
    if unknown:
        raise ValueError(f"a method needs {', '.join(unknown)}; the training loop supplies {', '.join(sorted(known))}")
    given = {"error_set": error_set.float()} if "error_set" in needs else {}
    if "environment" in needs:
        sizes = torch.tensor([len(data.splits[name]) for name in data.train_splits])
        environment = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        given["environment"] = torch.nn.functional.one_hot(environment, len(sizes)).float()
    if "group" in needs:
        y, attribute = data.train_labels()
        values = int(attribute.max()) + 1
        group = y * values + attribute
        given["group"] = torch.nn.functional.one_hot(group, data.num_classes * values).float()
    return given


def identification_errors(
    spec: dict, data: Dataset, seed: int, device: torch.device, steps: int, should_stop: Callable[[], bool] | None
) -> torch.Tensor:
    """JTT's error set: an ERM model trained for `steps` from the seed's initialisation (the spec's model, optimizer,
    batch size and precision), then which pooled training examples it gets wrong, [N] float (1: wrong)."""
    identify = ResolvedTrainSpec({**spec, "method": {"name": "erm"}, "steps": steps, "eval_every": steps})
    model, _ = _train_seed(identify, data, seed, device, _Clock(device), should_stop, lambda *_: None, graphs=False)
    model.eval()
    train = data.train_data()
    with torch.no_grad():
        logits = torch.cat([as_logits(model(batch.to(device))) for batch in batches_of(train.x, EVAL_CHUNK)])
    return (predictions(logits).cpu() != train.y).float()


def _arch_params(spec: dict) -> dict:
    return {k: v for k, v in spec["model"].items() if k != "arch"}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    *,
    precision: str = "fp32",
    memberships: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer update on (x, y) with the method's loss at `step`; returns that loss (detached, no sync).

    `memberships`: what the method `NEEDS` of these rows (`memberships(data, method.NEEDS)`, rows selected).
    """
    model.train()
    with forward_precision(precision, x.device):
        output = model(x)
    loss = method.loss(as_logits(output).float(), y, step, model, **(memberships or {}))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def stacked_losses(
    model: StackedMLP,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    memberships: dict[str, torch.Tensor] | None = None,
    *,
    step: int,
    precision: str = "fp32",
    member_params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every seed's loss [S] on its own rows x [S, B, ...], y [S, B]: the forward pass and the method's loss
    (`member_params`: as `seed_losses` takes them)."""
    with forward_precision(precision, x.device):
        output = model(x)
    return seed_losses(
        method, stacked_logits(output).float(), y, step, list(model.parameters()), memberships, member_params
    )


def stacked_train_step(
    model: StackedMLP,
    optimizer: torch.optim.Optimizer,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    *,
    precision: str = "fp32",
    memberships: dict[str, torch.Tensor] | None = None,
    losses: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One update of every seed on its own rows x [S, B, ...], y [S, B]; returns the seeds' losses [S] (no sync).

    The sum of the seeds' losses is minimised: each seed's gradient is its own (`starvation.ensemble`).
    `losses`: what computes them, called as `stacked_losses` is without its first two arguments (a
    `PhaseCompiled` of it); default `stacked_losses` itself.
    """
    model.train()
    if losses is None:
        losses = functools.partial(stacked_losses, model, method, precision=precision)
    per_seed = losses(x, y, memberships, step=step)
    optimizer.zero_grad(set_to_none=True)
    per_seed.sum().backward()
    optimizer.step()
    return per_seed.detach()


def update_inputs(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The training inputs the updates read: under bf16, a bfloat16 copy made once (autocast would otherwise cast
    the inputs again at every update; it casts the float32 master weights each time, which are far smaller).
    A registered dataset's inputs, expanded over the seeds (stride 0), stay one copy, expanded again."""
    if precision != "bf16":
        return x
    if x.ndim > 1 and x.stride(0) == 0:
        return x[0].to(torch.bfloat16).unsqueeze(0).expand_as(x)
    return x.to(torch.bfloat16)


class Batches:
    """Each seed's minibatch rows: a fresh permutation per epoch from the seed's own generator; None: full batch.

    `next()` gives [seeds, batch_size] indices on the device; an epoch's order is copied there once, not per step.
    """

    def __init__(self, n: int, batch_size: int | None, *, seeds: Sequence[int], device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.order = torch.empty(len(seeds), 0, dtype=torch.long)
        self.position = 0

    @property
    def full(self) -> bool:
        """Every update sees all n examples (no batch size, or one at least n): `next()` gives None."""
        return self.batch_size is None or self.batch_size >= self.n

    def state(self) -> dict:
        """Where the epochs stand: restored with `restore`, the rows that follow are the same."""
        return {
            "order": self.order.cpu().clone(),
            "position": self.position,
            "generators": [generator.get_state() for generator in self.generators],
        }

    def restore(self, state: dict) -> None:
        self.order, self.position = _to_device(state["order"], self.device), int(state["position"])
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)

    def next(self) -> torch.Tensor | None:
        if self.full:
            return None
        if self.position + self.batch_size > self.order.shape[1]:
            order = torch.stack([torch.randperm(self.n, generator=generator) for generator in self.generators])
            self.order, self.position = _to_device(order, self.device), 0
        rows = self.order[:, self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return rows


class Resume:
    """A sequential run's resumable states, one file per seed in `folder`: the weights, the optimizer, the step and
    the minibatch order every `every` steps, and the weights and history once the seed is finished. Saved with
    plain tensors and numbers only, and read back with `torch.load(weights_only=True)`. `resumed`: the seeds this
    run went on with, and the step each went on from."""

    def __init__(self, folder: pathlib.Path, every: int | None) -> None:
        self.folder, self.every = folder, every
        self.resumed: dict[int, int] = {}

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def path(self, seed: int) -> pathlib.Path:
        return self.folder / f"seed{seed}.pt"

    def load(self, seed: int) -> dict | None:
        path = self.path(seed)
        return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None

    def save(
        self,
        seed: int,
        *,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        history: list[dict[tuple[str, str], float]],
        batches: dict | None,
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "finished": optimizer is None,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "batches": batches,
            "history": [[[split, name, value] for (split, name), value in values.items()] for values in history],
        }
        partial = self.path(seed).with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path(seed))  # a worker killed mid-save leaves the last whole state

    @staticmethod
    def reported(folder: pathlib.Path) -> dict[int, int | None]:
        """Per seed with a saved state, the step before which its metrics stand (None: finished, all of them):
        what a run resuming from `folder` will not report again."""
        reported = {}
        for path in sorted(folder.glob("seed*.pt")):
            state = torch.load(path, weights_only=True, map_location="cpu")
            reported[int(path.stem.removeprefix("seed"))] = None if state["finished"] else state["step"]
        return reported


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory, without making the host wait."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class _Clock:
    """Wall time of the updates and of the evaluations, split at evaluations (where the device is synced anyway).

    Update time includes what runs between evaluations (should_stop, progress reports); evaluation time includes
    reporting its metrics.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_s = self.eval_s = 0.0
        self.compile_s = 0.0  # torch.compile before training (`PhaseCompiled.prepare`), outside train_s
        self.mark = time.perf_counter()

    def start(self) -> None:
        self.mark = time.perf_counter()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        self.train_s += began - self.mark
        yield
        self.mark = time.perf_counter()
        self.eval_s += self.mark - began

    def summary(self, steps: int, *, total_s: float) -> dict[str, float]:
        """step_ms: wall time to move every seed of the job one update (batched: one stacked update)."""
        return {
            "step_ms": 1000 * self.train_s / steps,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "compile_s": self.compile_s,
            "total_s": total_s,
        }
