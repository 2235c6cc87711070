"""Evaluation: each split's loss, accuracy, mean |logit| and starved fraction, and the summary over seeds."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from starvation.datasets import Dataset, Split, batches_of
from starvation.ensemble import StackedMLP
from starvation.methods import cross_entropy

STARVED_GRADIENT = 1e-3  # an example is "starved" when its loss gradient w.r.t. the logit is below this
EVAL_CHUNK = 8192  # examples per forward pass when evaluating


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """A network's output as the methods take it: [N] for one logit, [N, k] for k."""
    return output.squeeze(1) if output.ndim == 2 and output.shape[1] == 1 else output


def stacked_logits(output: torch.Tensor) -> torch.Tensor:
    """A stacked network's output [S, N, outputs] as each seed's logits: [S, N] for one logit, [S, N, k] for k."""
    return output.squeeze(2) if output.shape[2] == 1 else output


# ---- evaluation ----------------------------------------------------------------------------

def evaluation_splits(data: Dataset) -> dict[str, Split]:
    """'train' (the training splits pooled) and every named split (a split named 'train' is the pooled one)."""
    splits = {"train": data.train_data()}
    splits.update({name: split for name, split in data.splits.items() if name != "train"})
    return splits


def pooled_slices(data: Dataset) -> dict[str, slice]:
    """Where each training split lies in the pooled 'train' split (`Dataset.train_data()`'s order); a split named
    'train' is the pool itself. Evaluation slices these splits' logits from the pool's instead of recomputing."""
    slices, start = {}, 0
    for name in data.train_splits:
        end = start + len(data.splits[name])
        if name != "train":
            slices[name] = slice(start, end)
        start = end
    return slices


def _to(split: Split, device: torch.device) -> Split:
    """`split` on `device` (an image folder's files stay files: batches go to the device as they are read)."""
    x = split.x.to(device) if isinstance(split.x, torch.Tensor) else split.x
    return Split(name=split.name, x=x, y=split.y.to(device), attribute=split.attribute.to(device))


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
    for name, rows in pooled_slices(first).items():
        splits[name] = Split(name=name, x=pooled.x[:, rows], y=pooled.y[:, rows], attribute=pooled.attribute[:, rows])
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
def evaluate(model: nn.Module, splits: dict[str, Split],
             pooled: dict[str, slice] | None = None) -> dict[tuple[str, str], float]:
    """{(split, metric): value}: loss, accuracy, mean_abs_logit per split; starved_fraction for 'train'.

    `pooled` (`pooled_slices`): the splits whose logits are sliced from 'train''s, which comes first.
    """
    model.eval()
    values, computed = {}, {}
    for name, split in splits.items():
        if pooled and name in pooled:
            logits = computed["train"][pooled[name]]
        else:
            logits = torch.cat([as_logits(model(batch.to(split.y.device, non_blocking=True)))
                                for batch in batches_of(split.x, EVAL_CHUNK)])
        computed[name] = logits
        values.update(zip(_metric_names(name), split_metrics(logits, split.y, with_starved=name == "train").tolist()))
    return values


@torch.no_grad()
def evaluate_stacked(model: StackedMLP, splits: dict[str, Split],
                     pooled: dict[str, slice] | None = None) -> list[dict[tuple[str, str], float]]:
    """`evaluate` for every seed of a stacked model on stacked splits: one dict per seed, one host sync in all."""
    model.eval()
    names, columns, computed = [], [], {}
    for name, split in splits.items():
        if pooled and name in pooled:
            logits = computed["train"][:, pooled[name]]
        else:
            logits = torch.cat([stacked_logits(model(split.x[:, i:i + EVAL_CHUNK]))
                                for i in range(0, split.x.shape[1], EVAL_CHUNK)], dim=1)
        computed[name] = logits
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
