"""Sweeps: a grid of a train spec's method, optimizer and model parameters x its seeds, trained as one job, one
setting chosen by a named rule.

Settings that differ only in parameters the method's loss uses as plain numbers (`Method.TENSOR_PARAMS`: SD's
lambda and gamma, weight decay) ride in one stacked model, one member per setting, each with its own values
(`member_params`); one stack per seed, every member of it on that seed's data and minibatches. Settings that
differ in anything else (the learning rate, a warm-up length, the network's widths or depth: what changes the
optimizer, the loss's branches or the network's shape) form stacks of their own, trained in turn. A setting's models are the models a train job of that setting would make: same init,
data, minibatches and updates (tests/science/test_sweep.py checks it).

Selection (DomainBed's practice): `train_domain_validation` scores each setting on a part of the training
environments held out from training (the spec's `holdout`, a split of its own), by worst-group accuracy where the
dataset has an attribute, else accuracy; the test split is never read to choose. `oracle` scores on the test
split and is marked as leaking it.
"""

from __future__ import annotations

import functools
import itertools
import math
import pathlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from starvation import datasets
from starvation.checkpoints.save import CheckpointFile, save_checkpoint
from starvation.datasets import Dataset, Split, batched
from starvation.errors import SpecError
from starvation.methods import method_class
from starvation.networks import ARCHS, output_count
from starvation.params import ParamError
from starvation.training.evaluation import EVAL_CHUNK, as_logits, predictions
from starvation.training.execution import choose_execution, init_network, network_shape, per_seed_matmuls, update_rows
from starvation.training.loop import Metric, train_batched, train_seed
from starvation.training.resolved import ResolvedTrainSpec
from starvation.training.spec import resolve_device, resolve_train_spec
from starvation.training.state import Clock
from starvation.weights import load_initial_weights

SELECTIONS = {
    "train_domain_validation": "a part of the training environments held out from training (holdout); "
    "worst-group accuracy on it where the dataset has an attribute, else accuracy",
    "oracle": "the test split (leaks the test set into the choice: for comparison only)",
}
DEFAULT_HOLDOUT = 0.2  # train_domain_validation's hold-out when the spec does not set one
MAX_SETTINGS = 64
MAX_VALUES = 16  # per grid parameter
OPTIMIZER_GRID = ("lr",)


@dataclass
class SweepOutcome:
    result: dict  # JSON-able: selection, chosen, settings with their scores, execution, timing
    checkpoints: list[list[CheckpointFile]] = field(default_factory=list)  # per setting, one per seed


def resolve_sweep_spec(spec: dict, *, user_datasets: Collection[str] = ()) -> dict:
    """{"base": the train spec, "grid", "selection", "settings": [{"params", "spec"}]}: every setting resolved as
    a train spec of its own (the grid's values checked as a train job checks them). SpecError names the field."""
    if not isinstance(spec, dict):
        raise SpecError("the sweep spec must be a JSON object")
    rest = {k: v for k, v in spec.items() if k not in ("grid", "selection")}
    selection = spec.get("selection", "train_domain_validation")
    if selection not in SELECTIONS:
        raise ParamError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}", "selection")
    if selection == "train_domain_validation":
        if "holdout" not in rest:
            rest["holdout"] = DEFAULT_HOLDOUT
        elif rest["holdout"] == 0:
            raise ParamError(
                "train_domain_validation chooses on held-out training data: holdout must be above 0", "holdout"
            )
    base = resolve_train_spec(rest, user_datasets=user_datasets)
    grid = _check_grid(spec.get("grid"), base)
    settings = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        try:
            resolved = resolve_train_spec(_apply(rest, params), user_datasets=user_datasets)
        except SpecError as error:
            raise ParamError(f"grid setting {params}: {error}", "grid") from None
        settings.append({"params": params, "spec": resolved})
    return {"base": base, "grid": grid, "selection": selection, "settings": settings}


def _check_grid(grid: Any, base: dict) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise ParamError(
            'grid must be a non-empty object of parameter -> list of values, e.g. {"method.sd_lambda": [0.5, 1.0]}',
            "grid",
        )
    known = [f"method.{name}" for name in method_class(base["method"]["name"]).PARAMS]
    known += [f"optimizer.{name}" for name in OPTIMIZER_GRID]
    known += [f"model.{name}" for name in ARCHS[base["model"]["arch"]].PARAMS]  # other shapes: stacks of their own
    count = 1
    for key, values in grid.items():
        if key not in known:
            raise ParamError(
                f"grid parameter {key!r} is not one a sweep of method {base['method']['name']!r} can "
                f"vary; it can vary: {', '.join(known)}",
                f"grid.{key}",
            )
        if not isinstance(values, list) or not values or len(values) > MAX_VALUES:
            raise ParamError(f"grid.{key} must be a list of 1 to {MAX_VALUES} values", f"grid.{key}")
        count *= len(values)
    if count > MAX_SETTINGS:
        raise ParamError(f"the grid has {count} settings; the limit is {MAX_SETTINGS}", "grid")
    return {key: list(values) for key, values in grid.items()}


def _apply(spec: dict, params: dict[str, Any]) -> dict:
    """`spec` with each "section.name" of `params` set (new dicts; `spec` is not changed)."""
    applied = dict(spec)
    for key, value in params.items():
        section, name = key.split(".", 1)
        applied[section] = {**(applied.get(section) or {}), name: value}
    return applied


def stacks(settings: list[dict]) -> list[list[int]]:
    """The settings' indexes grouped into stacks: settings whose specs are equal apart from the method's
    `TENSOR_PARAMS` train as one stacked model (per seed)."""
    groups: dict[str, list[int]] = {}
    for index, setting in enumerate(settings):
        spec = setting["spec"]
        tensor_params = method_class(spec["method"]["name"]).TENSOR_PARAMS
        key = repr({**spec, "method": {k: v for k, v in spec["method"].items() if k not in tensor_params}})
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def member_params(specs: Sequence[ResolvedTrainSpec], num_classes: int) -> dict[str, torch.Tensor]:
    """The method's `TENSOR_PARAMS` that differ between `specs`, one row per member ([M] or [M, classes])."""
    varying = {}
    for name in method_class(specs[0].method.name).TENSOR_PARAMS:
        values = [spec.method.params[name] for spec in specs]
        if any(value != values[0] for value in values):
            if name == "sd_gamma":  # a scalar is the same target for every class
                classes = max(num_classes, 2)
                values = [value if isinstance(value, list) else [value] * classes for value in values]
            varying[name] = torch.tensor(values, dtype=torch.float32)
    return varying


def sweep(
    spec: dict,
    *,
    out_dir: pathlib.Path,
    device: str = "cpu",
    data_dir: str | None = None,
    on_metrics: Callable[[list[Metric]], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dataset: Dataset | None = None,
    user_datasets: Collection[str] = (),
    init_weights: Mapping[str, torch.Tensor] | None = None,
) -> SweepOutcome:
    """Train every setting of the sweep `spec` (resolved here unless it is already) for every seed, score each
    setting, choose one. Metrics name their split "s{setting}/{split}". Each stack's networks are saved as the stack
    ends and dropped, so memory holds one stack at a time. `init_weights`: a state dict every network starts from,
    as in `train`. Raises SpecError, TrainingStopped."""
    started = time.perf_counter()
    if "settings" not in spec:
        spec = resolve_sweep_spec(spec, user_datasets=user_datasets)
    settings = [ResolvedTrainSpec.of(setting["spec"]) for setting in spec["settings"]]
    base = ResolvedTrainSpec.of(spec["base"])
    torch_device = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    seeds = list(base.seeds)
    groups = stacks(spec["settings"])
    saved: dict[tuple[int, int], CheckpointFile] = {}
    finals: dict[tuple[int, int], dict] = {}
    executions, clock, runs_done, runs = [], Clock(torch_device), 0, len(groups) * len(seeds)
    init: dict[str, Any] | None = None

    for seed in seeds:
        data = (
            dataset
            if dataset is not None
            else datasets.build(base.dataset.name, dict(base.dataset.params), seed=seed, data_dir=data_dir)
        )
        data = datasets.hold_out(data, base.holdout)
        if init_weights is not None and init is None:  # what the weights fill, checked before any training
            init = load_initial_weights(init_network(settings[0], data, seed), init_weights)
        for group in groups:
            specs = [settings[i] for i in group]
            lead = specs[0].replace(seeds=[seed])

            def report(
                step: int,
                values: dict[int, dict],
                done: float,
                group: list[int] = group,
                seed: int = seed,
                runs_done: int = runs_done,
            ) -> None:
                rows = [
                    Metric(step=step, name=name, value=value, seed=seed, split=f"s{group[member]}/{split}")
                    for member, by_name in values.items()
                    for (split, name), value in by_name.items()
                ]
                if on_metrics is not None and rows:
                    on_metrics(rows)
                if on_progress is not None:
                    on_progress((runs_done + done) / runs)

            shape, graphs = network_shape(lead, data), lead.cuda_graphs and torch_device.type == "cuda"
            execution, why = choose_execution(lead.replace(seeds=[seed] * len(group)), shape)
            if execution == "batched":
                trained, histories, run_clock = train_batched(
                    lead,
                    [data] * len(group),
                    torch_device,
                    report,
                    should_stop,
                    shared_data=True,
                    matmuls_per_seed=per_seed_matmuls(shape, update_rows(lead, data), torch_device),
                    graphs=graphs,
                    compiled=lead.compile,
                    seeds=[seed] * len(group),
                    member_params=member_params(specs, data.num_classes),
                    init_weights=init_weights,
                )
                clock.train_s += run_clock.train_s
                clock.eval_s += run_clock.eval_s
            else:
                trained, histories = [], []
                for member, setting_spec in enumerate(specs):
                    network, history = train_seed(
                        setting_spec,
                        data,
                        seed,
                        torch_device,
                        clock,
                        should_stop,
                        functools.partial(_report_member, report, member, len(specs)),
                        graphs=graphs,
                        init_weights=init_weights,
                    )
                    trained.append(network)
                    histories.append(history)
            executions.append({"seed": seed, "settings": group, "used": execution, "why": why})
            for index, network in zip(group, trained):
                finals[index, seed] = scores(network, data, torch_device)
                setting_spec = settings[index]
                saved[index, seed] = save_checkpoint(
                    network,
                    out_dir / f"setting{index}",
                    seed=seed,
                    arch=setting_spec.model.arch,
                    arch_params=dict(setting_spec.model.params),
                    input_shape=data.input_shape,
                    num_outputs=output_count(data.num_classes),
                )
            del trained, network  # saved: one stack's networks in memory at a time, as the budget at submit counts
            runs_done += 1

    checkpoints = [[saved[index, seed] for seed in seeds] for index in range(len(settings))]
    result = choose(spec, finals, seeds)
    result["execution"] = executions
    if init is not None:
        result["init"] = init
    result["timing"] = {"train_s": clock.train_s, "eval_s": clock.eval_s, "total_s": time.perf_counter() - started}
    return SweepOutcome(result=result, checkpoints=checkpoints)


@torch.no_grad()
def scores(network: nn.Module, data: Dataset, device: torch.device) -> dict[str, dict[str, float | None]]:
    """{"holdout"?: ..., "test": ...}: accuracy and worst-group accuracy (None without an attribute) of a
    trained network, in float32."""
    network = network.to(device).eval()
    named = {"test": data.splits[data.test_split]}
    if datasets.HOLDOUT_SPLIT in data.splits:
        named["holdout"] = data.splits[datasets.HOLDOUT_SPLIT]
    return {
        name: split_scores(network, split, device, with_groups=data.attribute_name is not None)
        for name, split in named.items()
    }


def split_scores(
    network: Callable[[torch.Tensor], torch.Tensor], split: Split, device: torch.device, *, with_groups: bool
) -> dict[str, float | None]:
    """Accuracy and worst-group accuracy (None `with_groups` off) on `split` of `network` (or a logits function)."""
    predicted = predictions(as_logits(batched(network, split.x, device, EVAL_CHUNK)))
    correct = (predicted == split.y).float()
    worst = None
    if with_groups:
        groups = split.y * (int(split.attribute.max()) + 1) + split.attribute
        worst = min(float(correct[groups == group].mean()) for group in groups.unique())
    return {"accuracy": float(correct.mean()), "worst_group_accuracy": worst}


def choose(spec: dict, finals: dict[tuple[int, int], dict], seeds: list[int]) -> dict:
    """The result: each setting's scores (mean and std over seeds), and the setting chosen by the spec's rule."""
    selection, settings = spec["selection"], spec["settings"]
    scored = "holdout" if selection == "train_domain_validation" else "test"
    summaries: list[dict[str, Any]] = []
    for index, setting in enumerate(settings):
        summary: dict[str, Any] = {"params": setting["params"]}
        for part, name in (("holdout", "validation"), ("test", "test")):
            per_seed = [finals[index, seed][part] for seed in seeds if part in finals[index, seed]]
            summary[name] = (
                None
                if len(per_seed) < len(seeds)  # no holdout
                else {
                    metric: _mean_std([values[metric] for values in per_seed])
                    for metric in ("accuracy", "worst_group_accuracy")
                }
            )
        summaries.append(summary)
    section = "validation" if scored == "holdout" else "test"
    metric = "worst_group_accuracy" if summaries[0][section]["worst_group_accuracy"] is not None else "accuracy"
    values = [s[section][metric]["mean"] for s in summaries]
    chosen = int(np.argmax([-math.inf if v is None else v for v in values]))  # ties: the first setting
    return {
        "selection": selection,
        "scored_on": section,
        "metric": metric,
        "leaks_test": selection == "oracle",
        "chosen": chosen,
        "chosen_params": settings[chosen]["params"],
        "seeds": list(seeds),
        "holdout": spec["base"]["holdout"],
        "settings": summaries,
    }


def _mean_std(values: list[float | None]) -> dict[str, float | None] | None:
    present = [value for value in values if value is not None]
    if len(present) < len(values):
        return None
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


def _report_member(
    report: Callable[[int, dict[int, dict], float], None],
    member: int,
    members: int,
    step: int,
    steps: int,
    seed: int,
    values: dict[tuple[str, str], float],
) -> None:
    """Sequential progress of a sweep's stack: member `member` of `members` is at `step` of `steps`."""
    report(step, {member: values}, (member * steps + step) / (members * steps))


__all__ = [
    "DEFAULT_HOLDOUT",
    "MAX_SETTINGS",
    "SELECTIONS",
    "SweepOutcome",
    "choose",
    "member_params",
    "resolve_sweep_spec",
    "scores",
    "stacks",
    "sweep",
]
