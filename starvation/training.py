"""Train classifiers from a plain spec: one model per seed, metrics through a callback, checkpoints to a folder.

The loop reads top to bottom in `_train_seed`; one optimizer update is `train_step`. Step `t` in the
metrics is the model after `t` updates: evaluated at 0, every `eval_every`, and at `steps` (the saved model).
"""
from __future__ import annotations

import copy
import math
import pathlib
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from starvation import datasets
from starvation import params as P
from starvation.datasets import Dataset, Split
from starvation.errors import SpecError
from starvation.export import CheckpointFile, save_checkpoint
from starvation.methods import Method, build_method, cross_entropy, method_class
from starvation.networks import build_network, output_count, resolve_arch_params
from starvation.presets import PRESETS

STARVED_GRADIENT = 1e-3  # an example is "starved" when its loss gradient w.r.t. the logit is below this
EVAL_CHUNK = 8192  # examples per forward pass when evaluating
MAX_SEED = 2**31 - 1

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
    "device": "auto",  # for the worker's placement; `train` uses its `device` argument
    "audit": True,  # for the worker: audit each trained checkpoint
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


def build_optimizer(section: dict, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if section["name"] == "adam":
        return torch.optim.Adam(parameters, lr=section["lr"], betas=tuple(section["betas"]), eps=section["eps"])
    return torch.optim.SGD(parameters, lr=section["lr"], momentum=section["momentum"])


# ---- training ------------------------------------------------------------------------------

def train(spec: dict, *, out_dir: pathlib.Path, device: str = "cpu", data_dir: str | None = None,
          on_metrics: Callable[[list[Metric]], None] | None = None,
          on_progress: Callable[[float], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          dataset: Dataset | None = None) -> TrainOutcome:
    """Train one model per seed of `spec` (resolved here) and save each under `out_dir`.

    Each seed draws its own built-in dataset (`build(name, params, seed=seed)`: the paper's restarts redraw
    label noise and colours). A registered dataset is passed as `dataset` (spec's dataset.name then names it)
    and serves every seed. Raises SpecError for a bad spec, TrainingStopped when `should_stop()` says so.
    """
    section = spec.get("dataset") if isinstance(spec, dict) else None
    named = section.get("name") if isinstance(section, dict) else None
    spec = resolve_train_spec(spec, user_datasets=(named,) if dataset is not None and isinstance(named, str) else ())
    torch_device = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds, steps = spec["seeds"], spec["steps"]
    finals: dict[int, dict[tuple[str, str], float]] = {}
    starved: dict[int, tuple[float, float]] = {}
    checkpoints: list[CheckpointFile] = []
    dataset_info: dict = {}

    for index, seed in enumerate(seeds):
        data = dataset if dataset is not None else datasets.build(
            spec["dataset"]["name"], spec["dataset"]["params"], seed=seed, data_dir=data_dir)
        _check_gamma(spec["method"], data.num_classes)
        dataset_info = dict(data.info)

        def report(step: int, metrics: list[Metric], _index: int = index) -> None:
            if on_metrics is not None:
                on_metrics(metrics)
            if on_progress is not None:
                on_progress((_index * steps + step) / (len(seeds) * steps))

        model, history = _train_seed(spec, data, seed, torch_device, report, should_stop)
        finals[seed] = history[-1]
        starved[seed] = (history[0][("train", "starved_fraction")], history[-1][("train", "starved_fraction")])
        checkpoints.append(save_checkpoint(model, out_dir, seed=seed, arch=spec["model"]["arch"],
                                           arch_params=_arch_params(spec), input_shape=data.input_shape,
                                           num_outputs=output_count(data.num_classes)))

    result = {
        "splits": _summarise(finals),
        "seeds": list(seeds),
        "dataset": dataset_info,
        "starved_fraction": {"first": float(np.mean([s[0] for s in starved.values()])),
                             "last": float(np.mean([s[1] for s in starved.values()]))},
    }
    return TrainOutcome(result=result, checkpoints=checkpoints, dataset_info=dataset_info)


def _train_seed(spec: dict, data: Dataset, seed: int, device: torch.device,
                report: Callable[[int, list[Metric]], None],
                should_stop: Callable[[], bool] | None) -> tuple[nn.Module, list[dict[tuple[str, str], float]]]:
    """One model: init under `seed`, full-batch or minibatch updates, evaluation on schedule."""
    splits = {name: _to(split, device) for name, split in evaluation_splits(data).items()}
    train_split = splits["train"]
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        model = build_network(spec["model"]["arch"], _arch_params(spec), data.input_shape,
                              output_count(data.num_classes))
    model.to(device)
    method = build_method(spec["method"])
    optimizer = build_optimizer(spec["optimizer"], model.parameters())
    batches = Batches(len(train_split), spec["batch_size"], seed=seed, device=device)
    steps, eval_every = spec["steps"], spec["eval_every"]
    history = []

    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            values = evaluate(model, splits)
            history.append(values)
            report(step, [Metric(step=step, name=name, value=value, seed=seed, split=split)
                          for (split, name), value in values.items()])
        if step == steps:
            break
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step} of seed {seed}")
        rows = batches.next()
        x, y = (train_split.x, train_split.y) if rows is None else (train_split.x[rows], train_split.y[rows])
        train_step(model, optimizer, method, x, y, step)
    return model, history


def _arch_params(spec: dict) -> dict:
    return {k: v for k, v in spec["model"].items() if k != "arch"}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, x: torch.Tensor,
               y: torch.Tensor, step: int) -> torch.Tensor:
    """One optimizer update on (x, y) with the method's loss at `step`; returns that loss (detached, no sync)."""
    model.train()
    loss = method.loss(as_logits(model(x)), y, step, model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """A network's output as the methods take it: [N] for one logit, [N, k] for k."""
    return output.squeeze(1) if output.ndim == 2 and output.shape[1] == 1 else output


class Batches:
    """Row indices of each minibatch: a fresh seeded permutation per epoch; None means full batch."""

    def __init__(self, n: int, batch_size: int | None, *, seed: int, device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next(self) -> torch.Tensor | None:
        if self.batch_size is None or self.batch_size >= self.n:
            return None
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return rows.to(self.device)


# ---- evaluation ----------------------------------------------------------------------------

def evaluation_splits(data: Dataset) -> dict[str, Split]:
    """'train' (the training splits pooled) and every named split (a split named 'train' is the pooled one)."""
    splits = {"train": data.train_data()}
    splits.update({name: split for name, split in data.splits.items() if name != "train"})
    return splits


def _to(split: Split, device: torch.device) -> Split:
    return Split(name=split.name, x=split.x.to(device), y=split.y.to(device), attribute=split.attribute.to(device))


@torch.no_grad()
def evaluate(model: nn.Module, splits: dict[str, Split]) -> dict[tuple[str, str], float]:
    """{(split, metric): value}: loss, accuracy, mean_abs_logit per split; starved_fraction for 'train'."""
    model.eval()
    values = {}
    for name, split in splits.items():
        logits = torch.cat([as_logits(model(split.x[i:i + EVAL_CHUNK])) for i in range(0, len(split), EVAL_CHUNK)])
        values[(name, "loss")] = float(cross_entropy(logits, split.y))
        values[(name, "accuracy")] = float((predictions(logits) == split.y).float().mean())
        values[(name, "mean_abs_logit")] = float(logits.abs().mean())
        if name == "train":
            values[(name, "starved_fraction")] = float(starved(logits, split.y).float().mean())
    return values


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
