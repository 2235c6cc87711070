"""Train classifiers from a plain spec: one model per seed, metrics through a callback, checkpoints to a folder.

Two ways to run a job's seeds, chosen by the spec's `execution`, with the same metrics and checkpoints:
sequential (`_train_seed`, one seed after another; the reference) and batched (`_train_batched`, every seed as
one stacked model, `starvation.ensemble`). Each loop reads top to bottom; one optimizer update is `train_step`
or `stacked_train_step`. Step `t` in the metrics is the model after `t` updates: evaluated at 0, every
`eval_every`, and at `steps` (the saved model). Between evaluations the loops never wait on the device.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import pathlib
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from starvation import datasets
from starvation import params as P
from starvation.datasets import Dataset, Split
from starvation.ensemble import StackedMLP, seed_losses, unsupported_reason
from starvation.errors import SpecError
from starvation.export import CheckpointFile, save_checkpoint
from starvation.methods import Method, build_method, cross_entropy, method_class
from starvation.networks import Network, build_network, output_count, resolve_arch_params
from starvation.presets import PRESETS

STARVED_GRADIENT = 1e-3  # an example is "starved" when its loss gradient w.r.t. the logit is below this
EVAL_CHUNK = 8192  # examples per forward pass when evaluating
MAX_SEED = 2**31 - 1
# Above this many multiply-adds per seed and update, a batched job on the CPU runs each seed's matmuls on its own
# (`per_seed_matmuls`). On a 2-core CPU (docs/performance.md) one batched matmul over 10 seeds is 1.4x slower than
# 10 separate ones at 830M (CMNIST, full batch), even at 53M (CMNIST, batches of 256), faster at 0.45M (two moons).
CPU_PER_SEED_MATMUL_MACS = 50_000_000

DEFAULTS: dict[str, Any] = {
    "preset": None,
    "dataset": None,  # required: from the spec or its preset
    "model": {"arch": "mlp", "hidden": [300, 300]},
    "method": {"name": "erm"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "steps": 1000,
    "batch_size": None,  # full batch, as the paper
    "seeds": [0],
    "eval_every": 50,
    "execution": "auto",  # "batched": all seeds as one stacked model; "sequential": one after another; see EXECUTIONS
    "precision": "fp32",  # of the training updates; see PRECISIONS
    "cuda_graphs": False,  # on a CUDA device: replay each update from a CUDA graph (`GraphedUpdates`)
    "device": "auto",  # for the worker's placement; `train` uses its `device` argument
    "audit": True,  # for the worker: audit each trained checkpoint
}
EXECUTIONS = {
    "auto": "batched for several seeds (where the architecture allows), otherwise sequential",
    "batched": "every seed in one stacked model (MLPs; other architectures run sequentially, and the result says why)",
    "sequential": "one seed after another (the reference)",
}
PRECISIONS = {  # evaluation (the metrics) always runs in IEEE float32
    "fp32": "IEEE float32 everywhere (TF32 off, cuDNN convolutions included)",
    "tf32": "TensorFloat-32 matmuls and convolutions in the training updates (CUDA only; the CPU stays float32)",
    "bf16": "bfloat16 autocast of the forward pass in the training updates; weights, optimizer and loss in float32",
}
SECTION_IDENTITY = {"dataset": "name", "model": "arch", "method": "name", "optimizer": "name"}

OPTIMIZERS: dict[str, dict[str, P.Param]] = {
    "adam": {
        "lr": P.Param(1e-3, "learning rate", P.positive),
        "betas": P.Param([0.9, 0.999], "Adam's (beta1, beta2)", P.list_of(P.probability, length=2)),
        "eps": P.Param(1e-8, "Adam's epsilon (it is why the CMNIST SD recipe's loss scale matters)", P.positive),
    },
    "sgd": {
        "lr": P.Param(1e-2, "learning rate", P.positive),
        "momentum": P.Param(0.0, "heavy-ball momentum", P.probability),
    },
}


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


# ---- the spec ------------------------------------------------------------------------------

def resolve_train_spec(spec: dict, *, user_datasets: Collection[str] = ()) -> dict:
    """The complete, validated train spec: defaults < preset < `spec`. Raises SpecError for a person.

    `user_datasets`: names besides the built-ins that `dataset.name` may take (registered datasets, no params).
    """
    if not isinstance(spec, dict):
        raise SpecError("the train spec must be a JSON object")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"unknown train spec field(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEFAULTS)}")
    merged = copy.deepcopy(DEFAULTS)
    preset_name = spec.get("preset")
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise SpecError(f"unknown preset {preset_name!r}; presets: {', '.join(sorted(PRESETS))}")
        preset = {k: v for k, v in copy.deepcopy(PRESETS[preset_name]).items() if k != "source"}
        merged = _merge_spec(merged, preset)
    merged = _merge_spec(merged, copy.deepcopy(spec))

    if merged["dataset"] is None:
        raise SpecError("the train spec needs a dataset, e.g. {\"name\": \"colored_mnist\"}, or a preset")
    dataset = _resolve_dataset(merged["dataset"], user_datasets)
    num_classes = datasets.DATASETS[dataset["name"]].NUM_CLASSES if dataset["name"] in datasets.DATASETS else None
    return {
        "preset": preset_name,
        "dataset": dataset,
        "model": _resolve_model(merged["model"]),
        "method": _resolve_method(merged["method"], num_classes),
        "optimizer": _resolve_optimizer(merged["optimizer"]),
        "steps": _field("steps", P.positive_int, merged["steps"]),
        "batch_size": _field("batch_size", P.optional(P.positive_int), merged["batch_size"]),
        "seeds": _resolve_seeds(merged["seeds"]),
        "eval_every": _field("eval_every", P.positive_int, merged["eval_every"]),
        "execution": _field("execution", P.one_of(*EXECUTIONS), merged["execution"]),
        "precision": _field("precision", P.one_of(*PRECISIONS), merged["precision"]),
        "cuda_graphs": _field("cuda_graphs", P.boolean, merged["cuda_graphs"]),
        "device": _resolve_device_name(merged["device"]),
        "audit": _field("audit", P.boolean, merged["audit"]),
    }


def _merge_spec(base: dict, override: dict) -> dict:
    """Deep merge; a section whose name/arch changes is replaced, not merged (no stale hyper-parameters)."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        identity = SECTION_IDENTITY.get(key)
        same_kind = identity is None or (isinstance(value, dict) and isinstance(old, dict)
                                         and value.get(identity, old.get(identity)) == old.get(identity))
        merged[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) and same_kind else value
    return merged


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _field(name: str, check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except (ValueError, TypeError) as error:
        raise SpecError(f"{name} {error} (got {value!r})") from None


def _section(name: str, value: Any, identity: str) -> tuple[Any, dict]:
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be an object with a {identity!r} field")
    rest = {k: v for k, v in value.items() if k != identity}
    return value.get(identity), rest


def _resolve_dataset(section: Any, user_datasets: Collection[str]) -> dict:
    name, rest = _section("dataset", section, "name")
    extra = sorted(set(rest) - {"params"})
    if extra:
        raise SpecError(f"dataset has unknown field(s) {', '.join(map(repr, extra))}; it takes name and params")
    params = rest.get("params") or {}
    if not isinstance(params, dict):
        raise SpecError("dataset.params must be an object")
    if name in datasets.DATASETS:
        return {"name": name, "params": datasets.resolve_params(name, params)}
    if isinstance(name, str) and name in user_datasets:
        if params:
            raise SpecError(f"dataset {name!r} is a registered dataset and takes no params")
        return {"name": name, "params": {}}
    raise SpecError(f"unknown dataset {name!r}; built-in datasets: {', '.join(sorted(datasets.DATASETS))}")


def _resolve_model(section: Any) -> dict:
    arch, params = _section("model", section, "arch")
    return {"arch": arch, **resolve_arch_params(arch, params)}


def _resolve_method(section: Any, num_classes: int | None) -> dict:
    name, params = _section("method", section, "name")
    resolved = {"name": name, **method_class(name)(params).params}
    _check_gamma(resolved, num_classes)
    return resolved


def _check_gamma(method: dict, num_classes: int | None) -> None:
    gamma = method.get("sd_gamma")
    if isinstance(gamma, list) and num_classes is not None and len(gamma) != num_classes:
        raise SpecError(f"method.sd_gamma has {len(gamma)} values; the dataset has {num_classes} classes "
                        "(give one per class, or a scalar)")


def _resolve_optimizer(section: Any) -> dict:
    name, params = _section("optimizer", section, "name")
    if name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r}; optimizers: {', '.join(sorted(OPTIMIZERS))}")
    if name == "adam" and params.get("momentum", 0.0) in (0, 0.0, None):
        params.pop("momentum", None)  # API.md's example carries momentum 0.0 for either optimizer
    return {"name": name, **P.resolve(f"optimizer {name!r}", OPTIMIZERS[name], params)}


def _resolve_seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"seeds must be a non-empty list of integers (got {value!r})")
    seeds = [_field("each seed", P.non_negative_int, s) for s in value]
    if max(seeds) > MAX_SEED:
        raise SpecError(f"seeds must be at most {MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise SpecError("seeds must be distinct: the same seed trains the same model")
    return seeds


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _resolve_device_name(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise SpecError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {value!r})")
    return value


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; SpecError when that device is not here."""
    name = _resolve_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpecError(f"device {name!r} requested but this machine has no CUDA device")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SpecError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def build_optimizer(section: dict, parameters: Iterable[nn.Parameter], *,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """`capturable`: the optimizer's step may be captured in a CUDA graph (Adam keeps its step count on the GPU)."""
    parameters = list(parameters)
    if section["name"] == "adam":
        # On a GPU the fused Adam: one kernel per step for every tensor, the same update (its default there is a
        # multi-tensor loop of several kernels); on the CPU the default, so CPU results stay as they were.
        fused = bool(parameters) and parameters[0].is_cuda
        return torch.optim.Adam(parameters, lr=section["lr"], betas=tuple(section["betas"]), eps=section["eps"],
                                fused=fused, capturable=capturable)
    return torch.optim.SGD(parameters, lr=section["lr"], momentum=section["momentum"])


# ---- training ------------------------------------------------------------------------------

Report = Callable[[int, dict[int, dict[tuple[str, str], float]], float], None]  # (step, values per seed, progress)


def train(spec: dict, *, out_dir: pathlib.Path, device: str = "cpu", data_dir: str | None = None,
          on_metrics: Callable[[list[Metric]], None] | None = None,
          on_progress: Callable[[float], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          dataset: Dataset | None = None) -> TrainOutcome:
    """Train one model per seed of `spec` (resolved here) and save each under `out_dir`.

    Each seed draws its own built-in dataset (`build(name, params, seed=seed)`: the paper's restarts redraw
    label noise and colours). A registered dataset is passed as `dataset` (spec's dataset.name then names it)
    and serves every seed. Raises SpecError for a bad spec, TrainingStopped when `should_stop()` says so.
    The result says how the seeds ran (`execution`) and how long the updates took (`timing`).
    """
    started = time.perf_counter()
    section = spec.get("dataset") if isinstance(spec, dict) else None
    named = section.get("name") if isinstance(section, dict) else None
    spec = resolve_train_spec(spec, user_datasets=(named,) if dataset is not None and isinstance(named, str) else ())
    torch_device = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = spec["seeds"]

    def load(seed: int) -> Dataset:
        data = dataset if dataset is not None else datasets.build(
            spec["dataset"]["name"], spec["dataset"]["params"], seed=seed, data_dir=data_dir)
        _check_gamma(spec["method"], data.num_classes)
        return data

    def report(step: int, values_by_seed: dict[int, dict[tuple[str, str], float]], done: float) -> None:
        if on_metrics is not None:
            for seed, values in values_by_seed.items():
                on_metrics([Metric(step=step, name=name, value=value, seed=seed, split=split)
                            for (split, name), value in values.items()])
        if on_progress is not None:
            on_progress(done)

    first = load(seeds[0])
    n_train = sum(len(first.splits[name]) for name in first.train_splits)
    rows = min(spec["batch_size"] or n_train, n_train)
    shape = _shape_of(spec, first)
    execution, why = choose_execution(spec, shape)
    per_seed = execution == "batched" and per_seed_matmuls(shape, rows, torch_device)
    graphs = spec["cuda_graphs"] and torch_device.type == "cuda"
    with tf32_matmuls(spec["precision"] == "tf32"):  # evaluation switches it off again: metrics in float32
        if execution == "batched":
            networks, histories, clock = _train_batched(spec, [first] + [load(seed) for seed in seeds[1:]],
                                                        torch_device, report, should_stop,
                                                        shared_data=dataset is not None,
                                                        matmuls_per_seed=per_seed, graphs=graphs)
        else:
            networks, histories, clock = [], [], _Clock(torch_device)
            for index, seed in enumerate(seeds):
                data = first if index == 0 else load(seed)
                network, history = _train_seed(spec, data, seed, torch_device, clock, should_stop,
                                               functools.partial(_report_seed, report, index, len(seeds)),
                                               graphs=graphs)
                networks.append(network)
                histories.append(history)

    checkpoints = [save_checkpoint(network, out_dir, seed=seed, arch=spec["model"]["arch"],
                                   arch_params=_arch_params(spec), input_shape=first.input_shape,
                                   num_outputs=output_count(first.num_classes))
                   for seed, network in zip(seeds, networks)]
    finals = {seed: history[-1] for seed, history in zip(seeds, histories)}
    result = {
        "splits": _summarise(finals),
        "seeds": list(seeds),
        "dataset": dict(first.info),
        "starved_fraction": {
            "first": float(np.mean([h[0][("train", "starved_fraction")] for h in histories])),
            "last": float(np.mean([h[-1][("train", "starved_fraction")] for h in histories]))},
        "execution": {"requested": spec["execution"], "used": execution, "why": why, "precision": spec["precision"],
                      "per_seed_matmuls": per_seed, "cuda_graphs": graphs},
        "timing": clock.summary(spec["steps"], total_s=time.perf_counter() - started),
    }
    return TrainOutcome(result=result, checkpoints=checkpoints, dataset_info=dict(first.info))


def choose_execution(spec: dict, network: Network) -> tuple[str, str]:
    """("batched" | "sequential", why) for the resolved `spec`; `network` shows the architecture (no weights)."""
    requested = spec["execution"]
    if requested == "sequential":
        return "sequential", "requested"
    reason = unsupported_reason(network)
    if reason is not None:
        return "sequential", f"cannot batch: {reason}"
    if requested == "batched":
        return "batched", "requested"
    if len(spec["seeds"]) == 1:
        return "sequential", "auto: one seed"
    return "batched", "auto: several seeds"


def per_seed_matmuls(network: Network, rows: int, device: torch.device) -> bool:
    """Whether a batched job runs each seed's matmuls on its own (`StackedMLP`): on the CPU, for large updates.

    `rows`: examples per update (the batch, or all). On a GPU one batched matmul always pays (one launch, not S).
    """
    macs = rows * sum(p.numel() for p in network.parameters() if p.ndim > 1)
    return device.type == "cpu" and macs > CPU_PER_SEED_MATMUL_MACS


def _shape_of(spec: dict, data: Dataset) -> Network:
    """The spec's network for `data`, without weights (built on the meta device: no RNG drawn, no memory)."""
    with torch.device("meta"):
        return build_network(spec["model"]["arch"], _arch_params(spec), data.input_shape,
                             output_count(data.num_classes))


def _init_network(spec: dict, data: Dataset, seed: int) -> Network:
    """Seed `seed`'s initial network; the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(spec["model"]["arch"], _arch_params(spec), data.input_shape,
                             output_count(data.num_classes))


def _report_seed(report: Report, index: int, count: int, step: int, steps: int, seed: int,
                 values: dict[tuple[str, str], float]) -> None:
    """Sequential progress: seed `index` of `count` is at `step` of `steps`."""
    report(step, {seed: values}, (index * steps + step) / (count * steps))


def _train_seed(spec: dict, data: Dataset, seed: int, device: torch.device, clock: _Clock,
                should_stop: Callable[[], bool] | None,
                report: Callable[[int, int, int, dict[tuple[str, str], float]], None], *, graphs: bool
                ) -> tuple[nn.Module, list[dict[tuple[str, str], float]]]:
    """One model: init under `seed`, full-batch or minibatch updates, evaluation on schedule."""
    splits = {name: _to(split, device) for name, split in evaluation_splits(data).items()}
    train_split = splits["train"]
    model = _init_network(spec, data, seed).to(device)
    method = build_method(spec["method"])
    optimizer = build_optimizer(spec["optimizer"], model.parameters(), capturable=graphs)
    batches = Batches(len(train_split), spec["batch_size"], seeds=[seed], device=device)
    steps, eval_every, precision = spec["steps"], spec["eval_every"], spec["precision"]
    history = []

    def update(rows: torch.Tensor | None, step: int) -> None:
        x, y = (train_split.x, train_split.y) if rows is None else (train_split.x[rows[0]], train_split.y[rows[0]])
        train_step(model, optimizer, method, x, y, step, precision=precision)
    if graphs:
        update = GraphedUpdates(update, method, device)

    clock.start()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with clock.evaluating(), tf32_matmuls(False):
                values = evaluate(model, splits)
                history.append(values)
                report(step, steps, seed, values)
        if step == steps:
            break
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step} of seed {seed}")
        update(batches.next(), step)
    return model, history


def _train_batched(spec: dict, data: list[Dataset], device: torch.device, report: Report,
                   should_stop: Callable[[], bool] | None, *, shared_data: bool, matmuls_per_seed: bool,
                   graphs: bool) -> tuple[list[nn.Module], list[list[dict[tuple[str, str], float]]], _Clock]:
    """Every seed at once as a StackedMLP: per seed the same init, data, minibatches and updates as `_train_seed`."""
    seeds = spec["seeds"]
    splits = stacked_splits(data, device, shared=shared_data)
    first = data[0]
    del data  # the stacked copy is all that training needs
    train_split = splits["train"]
    networks = [_init_network(spec, first, seed) for seed in seeds]
    model = StackedMLP(networks, per_seed_matmuls=matmuls_per_seed).to(device)
    method = build_method(spec["method"])
    optimizer = build_optimizer(spec["optimizer"], model.parameters(), capturable=graphs)
    batches = Batches(train_split.x.shape[1], spec["batch_size"], seeds=seeds, device=device)
    seed_rows = torch.arange(len(seeds), device=device).unsqueeze(1)
    steps, eval_every, precision = spec["steps"], spec["eval_every"], spec["precision"]

    def update(rows: torch.Tensor | None, step: int) -> None:
        x, y = ((train_split.x, train_split.y) if rows is None
                else (train_split.x[seed_rows, rows], train_split.y[seed_rows, rows]))
        stacked_train_step(model, optimizer, method, x, y, step, precision=precision)
    if graphs:
        update = GraphedUpdates(update, method, device)
    # Progress between evaluations too, about as often as the sequential path reports it, but at most ~100 times
    # a job: in the worker each report is a database write on this thread.
    progress_every = max(1, eval_every // len(seeds), steps // 100)
    histories: list[list[dict[tuple[str, str], float]]] = [[] for _ in seeds]
    clock = _Clock(device)

    clock.start()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with clock.evaluating(), tf32_matmuls(False):
                per_seed = evaluate_stacked(model, splits)
                for history, values in zip(histories, per_seed):
                    history.append(values)
                report(step, dict(zip(seeds, per_seed)), step / steps)
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


def _arch_params(spec: dict) -> dict:
    return {k: v for k, v in spec["model"].items() if k != "arch"}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, x: torch.Tensor,
               y: torch.Tensor, step: int, *, precision: str = "fp32") -> torch.Tensor:
    """One optimizer update on (x, y) with the method's loss at `step`; returns that loss (detached, no sync)."""
    model.train()
    with forward_precision(precision, x.device):
        output = model(x)
    loss = method.loss(as_logits(output).float(), y, step, model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def stacked_train_step(model: StackedMLP, optimizer: torch.optim.Optimizer, method: Method, x: torch.Tensor,
                       y: torch.Tensor, step: int, *, precision: str = "fp32") -> torch.Tensor:
    """One update of every seed on its own rows x [S, B, ...], y [S, B]; returns the seeds' losses [S] (no sync).

    The sum of the seeds' losses is minimised: each seed's gradient is its own (`starvation.ensemble`).
    """
    model.train()
    with forward_precision(precision, x.device):
        output = model(x)
    per_seed = seed_losses(method, stacked_logits(output).float(), y, step, list(model.parameters()))
    optimizer.zero_grad(set_to_none=True)
    per_seed.sum().backward()
    optimizer.step()
    return per_seed.detach()


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """A network's output as the methods take it: [N] for one logit, [N, k] for k."""
    return output.squeeze(1) if output.ndim == 2 and output.shape[1] == 1 else output


def stacked_logits(output: torch.Tensor) -> torch.Tensor:
    """A stacked network's output [S, N, outputs] as each seed's logits: [S, N] for one logit, [S, N, k] for k."""
    return output.squeeze(2) if output.shape[2] == 1 else output


class Batches:
    """Each seed's minibatch rows: a fresh permutation per epoch from the seed's own generator; None: full batch.

    `next()` gives [seeds, batch_size] indices on the device; an epoch's order is copied there once, not per step.
    """

    def __init__(self, n: int, batch_size: int | None, *, seeds: Sequence[int], device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.order = torch.empty(len(seeds), 0, dtype=torch.long)
        self.position = 0

    def next(self) -> torch.Tensor | None:
        if self.batch_size is None or self.batch_size >= self.n:
            return None
        if self.position + self.batch_size > self.order.shape[1]:
            order = torch.stack([torch.randperm(self.n, generator=generator) for generator in self.generators])
            self.order, self.position = _to_device(order, self.device), 0
        rows = self.order[:, self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return rows


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory, without making the host wait."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class GraphedUpdates:
    """A loop's update, `update(rows, step)`, replayed from CUDA graphs: one launch a step instead of dozens.

    Per phase of the method's loss (`Method.phase`: SD before and after its warm-up), the first WARMUP updates
    run eagerly on a side stream (lazy initialisations, the optimizer's state), the next one is captured and then
    replayed, with each step's minibatch rows copied into the captured rows tensor. The captured update reads the
    same data and parameter tensors and writes the same parameters, so evaluation between replays sees the model
    as it is. The optimizer must be capturable (`build_optimizer(..., capturable=True)`). The phases' graphs share
    one memory pool: they never run at once, and each computes every temporary it reads.
    """

    WARMUP = 3

    def __init__(self, update: Callable[[torch.Tensor | None, int], None], method: Method,
                 device: torch.device) -> None:
        self.update, self.method, self.device = update, method, device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.eager: dict[Any, int] = {}

    def __call__(self, rows: torch.Tensor | None, step: int) -> None:
        with torch.cuda.device(self.device):  # streams and replays on the training device, whichever is current
            self._step(rows, step)

    def _step(self, rows: torch.Tensor | None, step: int) -> None:
        phase = self.method.phase(step)
        if phase in self.graphs:
            graph, static_rows = self.graphs[phase]
            if static_rows is not None:
                static_rows.copy_(rows)
            graph.replay()
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.eager.get(phase, 0) < self.WARMUP:
                self.eager[phase] = self.eager.get(phase, 0) + 1
                self.update(rows, step)
            else:
                static_rows = None if rows is None else rows.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    self.update(static_rows, step)
                self.graphs[phase] = graph, static_rows
                graph.replay()  # capturing recorded this step's update without running it
        torch.cuda.current_stream().wait_stream(self.stream)


# ---- precision and timing -------------------------------------------------------------------

@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TensorFloat-32 for CUDA matmuls and convolutions on or off (cuDNN's default is on); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def forward_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a training update's forward pass runs: bf16 autocast, or as it is (tf32 is set for the whole run)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)  # a cache breaks CUDA graphs
    return contextlib.nullcontext()


class _Clock:
    """Wall time of the updates and of the evaluations, split at evaluations (where the device is synced anyway).

    Update time includes what runs between evaluations (should_stop, progress reports); evaluation time includes
    reporting its metrics.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_s = self.eval_s = 0.0
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
        return {"step_ms": 1000 * self.train_s / steps, "train_s": self.train_s, "eval_s": self.eval_s,
                "total_s": total_s}


# ---- evaluation ----------------------------------------------------------------------------

def evaluation_splits(data: Dataset) -> dict[str, Split]:
    """'train' (the training splits pooled) and every named split (a split named 'train' is the pooled one)."""
    splits = {"train": data.train_data()}
    splits.update({name: split for name, split in data.splits.items() if name != "train"})
    return splits


def _to(split: Split, device: torch.device) -> Split:
    return Split(name=split.name, x=split.x.to(device), y=split.y.to(device), attribute=split.attribute.to(device))


def stacked_splits(data: Sequence[Dataset], device: torch.device, *, shared: bool = False) -> dict[str, Split]:
    """`evaluation_splits` of each seed's dataset, stacked: x [S, N, ...], y and attribute [S, N], on `device`.

    The training splits are views into the pooled 'train' tensor (one copy of the training data, not two).
    `shared`: every seed trains on the same `data[0]` (a registered dataset): expanded over the seeds, not copied.
    """
    first, count = data[0], len(data)

    def stack(split_of: Callable[[Dataset], Split], name: str) -> Split:
        if shared:
            one = _to(split_of(first), device)
            return Split(name=name, **{k: getattr(one, k).unsqueeze(0).expand(count, *getattr(one, k).shape)
                                       for k in ("x", "y", "attribute")})
        parts = [split_of(d) for d in data]
        return Split(name=name, **{k: torch.stack([getattr(p, k) for p in parts]).to(device)
                                   for k in ("x", "y", "attribute")})

    pooled = stack(Dataset.train_data, "train")
    splits = {"train": pooled}
    start = 0
    for name in first.train_splits:  # in the order train_data() pools them
        end = start + len(first.splits[name])
        if name != "train":
            splits[name] = Split(name=name, x=pooled.x[:, start:end], y=pooled.y[:, start:end],
                                 attribute=pooled.attribute[:, start:end])
        start = end
    names = ["train"] + [name for name in first.splits if name != "train"]  # evaluation_splits' order
    for name in names:
        if name not in splits:
            splits[name] = stack(lambda d, name=name: d.splits[name], name)
    return {name: splits[name] for name in names}


def split_metrics(logits: torch.Tensor, y: torch.Tensor, *, with_starved: bool) -> torch.Tensor:
    """[loss, accuracy, mean_abs_logit(, starved_fraction)] of one split's logits, as one tensor (no sync)."""
    values = [cross_entropy(logits, y), (predictions(logits) == y).float().mean(), logits.abs().mean()]
    if with_starved:
        values.append(starved(logits, y).float().mean())
    return torch.stack(values)


def _metric_names(split: str) -> list[tuple[str, str]]:
    names = ["loss", "accuracy", "mean_abs_logit"] + (["starved_fraction"] if split == "train" else [])
    return [(split, name) for name in names]


@torch.no_grad()
def evaluate(model: nn.Module, splits: dict[str, Split]) -> dict[tuple[str, str], float]:
    """{(split, metric): value}: loss, accuracy, mean_abs_logit per split; starved_fraction for 'train'."""
    model.eval()
    values = {}
    for name, split in splits.items():
        logits = torch.cat([as_logits(model(split.x[i:i + EVAL_CHUNK])) for i in range(0, len(split), EVAL_CHUNK)])
        values.update(zip(_metric_names(name), split_metrics(logits, split.y, with_starved=name == "train").tolist()))
    return values


@torch.no_grad()
def evaluate_stacked(model: StackedMLP, splits: dict[str, Split]) -> list[dict[tuple[str, str], float]]:
    """`evaluate` for every seed of a stacked model on stacked splits: one dict per seed, one host sync in all."""
    model.eval()
    names, columns = [], []
    for name, split in splits.items():
        size = split.x.shape[1]
        logits = torch.cat([stacked_logits(model(split.x[:, i:i + EVAL_CHUNK])) for i in range(0, size, EVAL_CHUNK)],
                           dim=1)
        columns.append(vmap(functools.partial(split_metrics, with_starved=name == "train"))(logits, split.y))
        names += _metric_names(name)
    return [dict(zip(names, row)) for row in torch.cat(columns, dim=1).tolist()]


def predictions(logits: torch.Tensor) -> torch.Tensor:
    return (logits > 0).long() if logits.ndim == 1 else logits.argmax(dim=1)


def starved(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the cross-entropy's gradient w.r.t. the logit(s) is below STARVED_GRADIENT in magnitude."""
    if logits.ndim == 1:
        return (torch.sigmoid(logits) - y.to(logits.dtype)).abs() < STARVED_GRADIENT
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return torch.linalg.vector_norm(torch.softmax(logits, dim=1) - onehot, dim=1) < STARVED_GRADIENT


def _summarise(finals: dict[int, dict[tuple[str, str], float]]) -> dict:
    """Mean and (population) std over seeds of the final accuracy and loss per split."""
    splits = sorted({split for values in finals.values() for split, _ in values}, key=_split_order)
    summary = {}
    for split in splits:
        summary[split] = {}
        for name in ("accuracy", "loss"):
            per_seed = [values[(split, name)] for values in finals.values()]
            summary[split][name] = {"mean": _json_float(np.mean(per_seed)), "std": _json_float(np.std(per_seed))}
    return summary


def _split_order(split: str) -> tuple[int, str]:
    return (0 if split == "train" else 2 if split == "test" else 1, split)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
