"""Evaluation: each split's loss, accuracy, mean |logit|; starvation on the way (the training split's starved
fraction and the share of its gradient that bias-conflicting examples carry, the core-only corner's margin); the
summary over seeds."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from starvation.datasets import Dataset, ImageFiles, Split, batches_of
from starvation.ensemble import StackedMLP
from starvation.errors import SpecError
from starvation.methods import cross_entropy
from starvation.ntk import KernelSample

STARVED_GRADIENT = 1e-3  # an example is "starved" when its loss gradient w.r.t. the logit is below this
CORE_ONLY = "core_only"  # the test split's core-only corner, evaluated with the splits where a dataset builds it
EVAL_CHUNK = 8192  # examples per forward pass when evaluating


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """A network's output as the methods take it: [N] for one logit, [N, k] for k."""
    return output.squeeze(1) if output.ndim == 2 and output.shape[1] == 1 else output


def stacked_logits(output: torch.Tensor) -> torch.Tensor:
    """A stacked network's output [S, N, outputs] as each seed's logits: [S, N] for one logit, [S, N, k] for k."""
    return output.squeeze(2) if output.shape[2] == 1 else output


# ---- evaluation ----------------------------------------------------------------------------


def evaluation_splits(data: Dataset) -> dict[str, Split]:
    """'train' (the training splits pooled), every named split (a split named 'train' is the pooled one), and
    `CORE_ONLY` where the dataset builds it (`core_only_corner`)."""
    splits = {"train": data.train_data()}
    splits.update({name: split for name, split in data.splits.items() if name != "train"})
    corner = core_only_corner(data)
    if corner is not None:
        splits[CORE_ONLY] = corner
    return splits


def core_only_corner(data: Dataset) -> Split | None:
    """The paper's core-only corner of the test split (Colored MNIST: the grey digit, no colour), labelled with the
    clean core label where the dataset knows it: what the core feature alone earns, followed over training. None
    where the dataset has no four corners (or holds a split of that name)."""
    test = data.splits.get(data.test_split)
    if not data.has_four_corners or test is None or not isinstance(test.x, torch.Tensor) or CORE_ONLY in data.splits:
        return None
    corner = data.four_corners(test)["core_only"]
    label = corner.core_label if corner.core_label is not None else corner.y
    return Split(name=CORE_ONLY, x=corner.x, y=label, attribute=corner.attribute, core_label=corner.core_label)


def bias_conflicting(data: Dataset) -> torch.Tensor | None:
    """Per example of the pooled training split (`Dataset.train_data()`'s order): its attribute is not the one most
    common among the training examples of its label (Colored MNIST: the colour disagrees with the label). None
    where the dataset has no attribute or its training data one value of it (nothing conflicts)."""
    y, attribute = data.train_labels()
    if data.attribute_name is None or bool((attribute == attribute[0]).all()):
        return None
    attributes, classes = int(attribute.max()) + 1, int(y.max()) + 1
    counts = torch.bincount(y * attributes + attribute, minlength=classes * attributes)
    majority = counts.view(classes, attributes).argmax(dim=1)
    return attribute != majority[y]


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


def split_to(split: Split, device: torch.device) -> Split:
    """`split` on `device` (an image folder's files stay files: batches go to the device as they are read)."""
    x = split.x.to(device) if isinstance(split.x, torch.Tensor) else split.x
    return Split(name=split.name, x=x, y=split.y.to(device), attribute=split.attribute.to(device))


def stacked_splits(data: Sequence[Dataset], device: torch.device, *, shared: bool = False) -> dict[str, Split]:
    """`evaluation_splits` of each seed's dataset, stacked: x [S, N, ...], y and attribute [S, N], on `device`.

    The training splits are views into the pooled 'train' tensor (one copy of the training data, not two).
    `shared`: every seed trains on the same `data[0]` (a registered dataset): expanded over the seeds, not copied.
    """
    first, count = data[0], len(data)

    def stack(split_of: Callable[[Dataset], Split | None], name: str) -> Split:
        if shared:
            one = split_to(_present(split_of(first), name), device)
            return Split(
                name=name,
                **{
                    k: getattr(one, k).unsqueeze(0).expand(count, *getattr(one, k).shape)
                    for k in ("x", "y", "attribute")
                },
            )
        parts = [_present(split_of(d), name) for d in data]
        return Split(
            name=name, **{k: torch.stack([getattr(p, k) for p in parts]).to(device) for k in ("x", "y", "attribute")}
        )

    pooled = stack(Dataset.train_data, "train")
    splits = {"train": pooled}
    for name, rows in pooled_slices(first).items():
        splits[name] = Split(name=name, x=pooled.x[:, rows], y=pooled.y[:, rows], attribute=pooled.attribute[:, rows])
    names = ["train"] + [name for name in first.splits if name != "train"]  # evaluation_splits' order
    for name in names:
        if name not in splits:
            splits[name] = stack(functools.partial(_split_named, name=name), name)
    if core_only_corner(first) is not None:
        names.append(CORE_ONLY)
        splits[CORE_ONLY] = stack(core_only_corner, CORE_ONLY)
    return {name: splits[name] for name in names}


def split_metrics(
    logits: torch.Tensor, y: torch.Tensor, conflicting: torch.Tensor | None = None, *, split: str
) -> torch.Tensor:
    """One split's `_metric_names`, as one tensor (no sync). `conflicting`: the training split's bias-conflicting
    examples (`bias_conflicting`), where the dataset has an attribute."""
    values = [cross_entropy(logits, y), (predictions(logits) == y).float().mean(), logits.abs().mean()]
    if split == "train":
        gradient = logit_gradient(logits, y)  # once: the starved fraction and the conflicting share both read it
        values.append((gradient < STARVED_GRADIENT).float().mean())
        if conflicting is not None:
            values.append((gradient * conflicting).sum() / gradient.sum().clamp_min(torch.finfo(gradient.dtype).tiny))
    elif split == CORE_ONLY:
        values.append(signed_margin(logits, y).mean())
    return torch.stack(values)


def _metric_names(split: str, conflicting: bool = False) -> list[tuple[str, str]]:
    """loss, accuracy, mean_abs_logit; for 'train' the starved fraction and, given the bias-conflicting examples,
    the share of the cross-entropy's logit gradient they carry; for `CORE_ONLY` the mean signed margin."""
    names = ["loss", "accuracy", "mean_abs_logit"]
    if split == "train":
        names += ["starved_fraction"] + (["conflicting_gradient_share"] if conflicting else [])
    elif split == CORE_ONLY:
        names.append("margin")
    return [(split, name) for name in names]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    splits: dict[str, Split],
    pooled: dict[str, slice] | None = None,
    conflicting: torch.Tensor | None = None,
) -> dict[tuple[str, str], float]:
    """{(split, metric): value}: each split's `_metric_names`.

    `pooled` (`pooled_slices`): the splits whose logits are sliced from 'train''s, which comes first.
    `conflicting`: 'train''s bias-conflicting examples (`bias_conflicting`), or None (no attribute).
    """
    model.eval()
    values: dict[tuple[str, str], float] = {}
    computed: dict[str, torch.Tensor] = {}
    for name, split in splits.items():
        if pooled and name in pooled:
            logits = computed["train"][pooled[name]]
        else:
            logits = torch.cat(
                [
                    as_logits(model(batch.to(split.y.device, non_blocking=True)))
                    for batch in batches_of(split.x, EVAL_CHUNK)
                ]
            )
        computed[name] = logits
        given = conflicting if name == "train" else None
        values.update(
            zip(_metric_names(name, given is not None), split_metrics(logits, split.y, given, split=name).tolist())
        )
    return values


@torch.no_grad()
def evaluate_stacked(
    model: StackedMLP,
    splits: dict[str, Split],
    pooled: dict[str, slice] | None = None,
    conflicting: torch.Tensor | None = None,
) -> list[dict[tuple[str, str], float]]:
    """`evaluate` for every seed of a stacked model on stacked splits (`conflicting` [S, N]): one dict per seed,
    one host sync in all."""
    model.eval()
    names: list[tuple[str, str]] = []
    columns: list[torch.Tensor] = []
    computed: dict[str, torch.Tensor] = {}
    for name, split in splits.items():
        if pooled and name in pooled:
            logits = computed["train"][:, pooled[name]]
        else:
            logits = torch.cat(
                [stacked_logits(model(split.x[:, i : i + EVAL_CHUNK])) for i in range(0, split.x.shape[1], EVAL_CHUNK)],
                dim=1,
            )
        computed[name] = logits
        given = (conflicting,) if name == "train" and conflicting is not None else ()
        columns.append(vmap(functools.partial(split_metrics, split=name))(logits, split.y, *given))
        names += _metric_names(name, bool(given))
    return [dict(zip(names, row)) for row in torch.cat(columns, dim=1).tolist()]


def _split_named(data: Dataset, name: str) -> Split:
    return data.splits[name]


def _present(split: Split | None, name: str) -> Split:
    """A split every seed's dataset has (the core-only corner exists for all or none)."""
    if split is None:
        raise ValueError(f"a seed's dataset has no split {name!r}")
    return split


def predictions(logits: torch.Tensor) -> torch.Tensor:
    return (logits > 0).long() if logits.ndim == 1 else logits.argmax(dim=1)


def logit_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the magnitude of the cross-entropy's gradient w.r.t. its logit(s), |sigmoid(f) - y| or
    ||softmax(f) - onehot(y)||: how much the example still teaches the network."""
    if logits.ndim == 1:
        return (torch.sigmoid(logits) - y.to(logits.dtype)).abs()
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return torch.linalg.vector_norm(torch.softmax(logits, dim=1) - onehot, dim=1)


def signed_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: how far the logit(s) favour the label y, f for 1 and -f for 0 (one logit), or f_y minus the
    largest other logit (k logits); negative when the prediction is wrong."""
    if logits.ndim == 1:
        return torch.where(y == 1, logits, -logits)
    right = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return right - others


def summarise_seeds(finals: dict[int, dict[tuple[str, str], float]]) -> dict:
    """Mean and (population) std over seeds of the final accuracy and loss per split."""
    splits = sorted({split for values in finals.values() for split, _ in values}, key=_split_order)
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for split in splits:
        summary[split] = {}
        for name in ("accuracy", "loss"):
            per_seed = [values[(split, name)] for values in finals.values()]
            summary[split][name] = {
                "mean": _json_float(float(np.mean(per_seed))),
                "std": _json_float(float(np.std(per_seed))),
            }
    return summary


def _split_order(split: str) -> tuple[int, str]:
    return (0 if split == "train" else 2 if split == "test" else 1, split)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def kernel_sample(ntk_every: int | None, data: Dataset, seed: int) -> KernelSample | None:
    """The fixed sample a seed's NTK alignments follow (the spec's `ntk_every`), or None."""
    if not ntk_every:
        return None
    train = data.train_data()
    if isinstance(train.x, ImageFiles):
        raise SpecError("ntk_every needs a dataset held in memory, not an image folder")
    return KernelSample.of(train, seed=seed)


def kernel_alignments(kernel: KernelSample, model: nn.Module) -> dict[tuple[str, str], float]:
    """The metrics ntk_alignment_label, _attribute, _core of `model` on the sample (split train)."""
    with torch.enable_grad():
        return {("train", f"ntk_alignment_{name}"): value for name, value in kernel.alignments(model).items()}


def ntk_due(ntk_every: int | None, step: int, steps: int) -> bool:
    """Whether the evaluation at `step` of `steps` records the NTK alignments: every `ntk_every`, and the last."""
    return ntk_every is not None and (step % ntk_every == 0 or step == steps)
